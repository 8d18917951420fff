"""Embeddings: `POST /v1/embeddings` (OpenAI's API) and `Embedder`, the engine's prefill path
without KV pages pooled to one vector per input.

    vectors = Embedder(engine)([[1, 2, 3], [4, 5]], pooling="mean")     # [2, d_model] float32

An input is a string (tokenized as completions' prompts are, no special tokens added) or token
ids; the model runs it causally (`ModelCalls.embed`) and pools its final-normed hidden states,
the mean over its tokens or its last token's (`pooling`): the model's own (`model.embed_pooling`,
read from the sentence-transformers Pooling config of an imported HF model, or set in an lmsys
run's config), which the server's `--embed-pooling` overrides; "last" when neither says, as
decoder embedding models such as e5-mistral and gte-Qwen are trained. Inputs are
sorted by length and run in batches of at most EMBED_TOKENS padded tokens, at shapes padded to
powers of two (each new shape compiles once, on first use), between engine steps (the engine's
lock). `dimensions` keeps the first N values, then the vector is L2-normalized (unless
`normalize: false`, an extension as vLLM's); `encoding_format: "base64"` sends each vector's
little-endian float32 bytes, as OpenAI does.
"""

from __future__ import annotations

import asyncio
import base64
from functools import partial
from typing import Literal

import jax
import numpy as np
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from pydantic import BaseModel, ConfigDict, Field

from lmsys.serve.api import INT32_MAX, APIError, TokenId, check_fields, check_text

POOLINGS = ("last", "mean")
EMBED_TOKENS = 8192  # padded tokens (rows x length) of one embedding call at most
MAX_INPUTS = 2048  # inputs of one request at most (OpenAI's limit)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class Embedder:
    """Pooled embeddings of token sequences through the engine's model, between its steps."""

    def __init__(self, engine):
        self.engine = engine
        self._call = jax.jit(partial(engine.calls.embed, rules=engine.rules), static_argnames="pooling")
        mesh = engine.rules.mesh if engine.rules is not None else None
        self.min_rows = mesh.size if mesh is not None else 1  # rows split over the mesh's batch axes

    def pooling(self, override: str | None = None) -> str:
        """`override` (the server's flag) if given, else the model's own, else "last"."""
        return override or self.engine.model.embed_pooling or "last"

    def __call__(self, inputs: list[list[int]], pooling: str | None = None) -> np.ndarray:
        pooling = self.pooling(pooling)
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        out = np.zeros((len(inputs), self.engine.model.d_model), np.float32)
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
        while order:
            T = _pow2(len(inputs[order[0]]))
            rows = [order[0]]  # the shortest first: the batch's width grows with its longest
            for i in order[1:]:
                width = _pow2(len(inputs[i]))
                if max(_pow2(len(rows) + 1), self.min_rows) * width > max(EMBED_TOKENS, width):
                    break
                rows.append(i)
                T = width
            order = order[len(rows):]
            B = max(_pow2(len(rows)), self.min_rows)
            tokens = np.zeros((B, T), np.int32)
            lengths = np.ones(B, np.int32)
            for r, i in enumerate(rows):
                tokens[r, :len(inputs[i])] = inputs[i]
                lengths[r] = len(inputs[i])
            with self.engine.lock:  # between engine steps
                pooled = self._call(self.engine.params, tokens, lengths, pooling=pooling)
            out[rows] = np.asarray(jax.device_get(pooled))[:len(rows)]
        return out


def finish(vectors: np.ndarray, dimensions: int | None, normalize: bool) -> np.ndarray:
    """`dimensions` truncation, then L2 normalization (as OpenAI's shortened embeddings)."""
    if dimensions is not None:
        vectors = vectors[:, :dimensions]
    if normalize:
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return vectors


class EmbeddingBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    model: str | None = None
    input: str | list[TokenId] | list[str | list[TokenId]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, le=INT32_MAX)
    normalize: bool = True  # extension (vLLM's name)


def _inputs(routes, body: EmbeddingBody) -> list[list[int]]:
    """The body's inputs as token ids (off the event loop); 400 naming what is wrong."""
    check_fields(body)
    items = body.input
    if isinstance(items, str) or (items and isinstance(items[0], int)):
        items = [items]
    if not items:
        raise APIError(400, "input is empty; send a string, a list of strings or token ids", param="input")
    if len(items) > MAX_INPUTS:
        raise APIError(400, f"input: at most {MAX_INPUTS} inputs per request, got {len(items)}", param="input")
    check_text(items, "input")
    engine, out = routes.engine, []
    if body.dimensions is not None and body.dimensions > engine.model.d_model:
        raise APIError(400, f"dimensions: this model's embeddings have {engine.model.d_model}, got "
                            f"{body.dimensions}", param="dimensions")
    for i, item in enumerate(items):
        ids = engine.encode(item) if isinstance(item, str) else list(item)
        if not ids:
            raise APIError(400, f"input[{i}] is empty", param="input")
        if any(t >= engine.model.vocab_size for t in ids):
            raise APIError(400, f"input[{i}]: token ids must be in [0, {engine.model.vocab_size})", param="input")
        if len(ids) > engine.cfg.max_seq_len:
            raise APIError(400, f"input[{i}] has {len(ids)} tokens; this model embeds at most "
                                f"{engine.cfg.max_seq_len}", param="input")
        out.append(ids)
    return out


def add_embedding_routes(app: FastAPI, routes) -> None:
    """`POST /v1/embeddings` over `routes`' engine (lmsys.serve.routes.Routes), pooling by
    `routes.limits.embed_pooling` if set, else by the model's."""
    from lmsys.serve.http_run import Run

    embedder = Embedder(routes.engine)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingBody, request: HTTPRequest):
        routes.check_model(body.model)
        if routes.loop.dead:
            routes.loop.check_admission()  # the 503 of a dead engine
        pooling = embedder.pooling(routes.limits.embed_pooling)
        if pooling.startswith("unsupported:"):
            modes = pooling.removeprefix("unsupported:")
            raise APIError(400, f"this model's sentence-transformers pooling ({modes}) is not one lmsys implements; "
                                f"start the server with --embed-pooling last or mean to choose one")
        ids = await asyncio.to_thread(_inputs, routes, body)
        vectors = finish(await asyncio.to_thread(embedder, ids, pooling),
                         body.dimensions, body.normalize)
        n = sum(len(x) for x in ids)
        Run(routes, request).count_tokens("prompt", n)
        data = [{"object": "embedding", "index": i,
                 "embedding": (base64.b64encode(v.astype("<f4").tobytes()).decode()
                               if body.encoding_format == "base64" else v.tolist())}
                for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": routes.model_name,
                "usage": {"prompt_tokens": n, "total_tokens": n}}
