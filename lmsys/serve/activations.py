"""A model's inner activations on request: the `return_hidden_states` extension field of
`POST /v1/completions` and `POST /v1/chat/completions`, and `Activations`, the engine's prefill path without KV pages capturing
per-layer tensors (lmsys.models.llama.forward's `capture`).

    {"prompt": "...", "return_hidden_states": {"layers": [0, 5], "positions": "last", "kind": "residual"}}

answers each choice with `"hidden_states": {"kind", "layers", "positions", "shape": [layers,
positions, d_model], "dtype": "float32", "data": base64 of the little-endian float32 array}`,
over the choice's whole sequence: its prompt (on chat, the rendered conversation's tokens) and
generated tokens (an end-of-text token that ended it included). kind "residual" is the residual stream after each block (transformers'
`output_hidden_states[i + 1]`; HF's last entry is the last block's after the final norm),
"attn" / "mlp" what each block's attention / MLP adds to it. The activations are computed after
the choice is generated, by a separate call between engine steps (the decode and prefill
programs stay exactly as without capture); each new padded length (a power of two) compiles once.
The values one request may ask for (choices x layers x positions x d_model, positions counted at
their most: prompt + max_tokens) are bounded by `Limits.max_hidden_values` (a 400 beyond).
"""

from __future__ import annotations

import asyncio
import base64
from functools import partial

import jax
import numpy as np

from lmsys.serve.api import APIError, HiddenStatesRequest


class Activations:
    """Per-layer activations of one token sequence through the engine's model, between its steps."""

    def __init__(self, engine):
        self.engine = engine
        self._call = jax.jit(partial(engine.calls.activations, rules=engine.rules), static_argnames="capture")

    def __call__(self, tokens: list[int], kind: str = "residual", layers=None, last: bool = False) -> np.ndarray:
        """[len(layers), 1 if last else len(tokens), d_model] float32."""
        T = 1 << max(0, len(tokens) - 1).bit_length()
        rows = self.engine.rules.mesh.size if self.engine.rules is not None else 1
        padded = np.zeros((rows, T), np.int32)
        padded[0, :len(tokens)] = tokens
        with self.engine.lock:  # between engine steps
            out = self._call(self.engine.params, padded, capture=(kind,))[kind]
        out = np.asarray(jax.device_get(out))[:, 0, :len(tokens)]
        out = out if layers is None else out[list(layers)]
        return out[:, -1:] if last else out


def check(body, engine, limits, prompt_lengths: list[int], max_tokens: int) -> None:
    """400 unless the body's `return_hidden_states` can be answered within the server's limit."""
    h = body.return_hidden_states
    if h is None:
        return
    L = engine.model.n_layers
    if bad := [i for i in h.layers if not 0 <= i < L]:
        raise APIError(400, f"return_hidden_states.layers: this model's layers are 0..{L - 1}, got {bad}",
                       param="return_hidden_states")
    if body.stream:
        raise APIError(400, "return_hidden_states is answered with the whole completion, not with stream",
                       param="return_hidden_states")
    positions = [1 if h.positions == "last" else n + max_tokens for n in prompt_lengths]
    values = body.n * len(h.layers) * sum(positions) * engine.model.d_model
    if values > limits.max_hidden_values:
        raise APIError(400, f"return_hidden_states: {values} values asked (choices x layers x positions x "
                            f"d_model, positions at most prompt + max_tokens); this server returns at most "
                            f"{limits.max_hidden_values} per request", param="return_hidden_states")


async def attach(activations: Activations, h: HiddenStatesRequest | None, reqs, choices: list[dict]) -> None:
    """Adds each choice's `hidden_states` (computed off the event loop); nothing if `h` is None."""
    for req, choice in zip(reqs, choices) if h is not None else ():
        x = await asyncio.to_thread(activations, req.tokens, h.kind, h.layers, h.positions == "last")
        choice["hidden_states"] = {"kind": h.kind, "layers": h.layers, "positions": h.positions,
                                   "shape": list(x.shape), "dtype": "float32",
                                   "data": base64.b64encode(x.astype("<f4").tobytes()).decode()}
