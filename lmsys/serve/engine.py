"""The inference engine: jitted prefill and decode over a paged KV cache, continuous batching.

    engine = Engine(params, model_cfg, tokenizer, EngineConfig(max_slots=8, num_pages=64))
    engine.warmup()                                   # compiles every shape bucket once
    outs = engine.generate(["def fib(", "import os"], GenerationOptions(max_tokens=32))

## The page pool (the contract with lmsys.kernels' paged attention)

    k_pages, v_pages: [n_layers, num_pages, page_size, n_kv_heads, head_dim], the compute dtype
    page_table:       [rows, pages] int32 (one row per sequence in a call; `pages` is at most
                      max_seq_len / page_size, and a decode call passes only as many as the
                      longest sequence in it needs, rounded up to a bucket)

Token p of a sequence lives in page `page_table[row, p // page_size]`, slot `p % page_size`.
Page ids are indices into the pool's second axis; every page is usable. Entries of a row past
the sequence's last page are 0 and never read (attention masks keys at positions above the
query's). Pages are allocated on demand, freed when a request ends or is preempted, and reused.
With a mesh, KV heads are split over `tensor` like the attention weights.

## Scheduling

Between model calls the scheduler admits waiting requests into free slots (up to
`max_slots`). Each iteration runs at most one prefill chunk (of the oldest request still
prefilling; a prompt of n tokens prefills its first n-1 in chunks of at most `prefill_chunk`)
and then one decode step for every request whose next input is a single token (a prompt's last
token, or the token sampled last). So a long prompt never stalls running decodes for more than
one chunk. When the pool runs out of pages, the newest running request is preempted: its pages
are freed and it goes back to the front of the queue, to be recomputed from its prompt plus
the tokens it already generated (sampling is seeded per token, so the text is unchanged).

Shapes are padded to buckets (prefill: chunk lengths; decode: batch size x pages per row,
powers of two, so a decode step attends over the pages in use, not the whole context), so the
compilations are exactly `len(prefill_buckets) + len(decode_buckets)`, all done by `warmup()`. In batch-invariant mode there is one bucket of each, the largest, so a request's
numbers never depend on what else is running.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lmsys.config import ModelConfig
from lmsys.models import llama
from lmsys.parallel import Rules
from lmsys.serve.sampling import SamplingParams, next_token_logprobs, sample
from lmsys.serve.stops import IncrementalDetokenizer, StopChecker

MAX_TOP_LOGPROBS = 5  # OpenAI's limit for `logprobs` on completions


class RequestError(ValueError):
    """A request the engine can never serve (too long for the context or the page pool)."""


@dataclass
class EngineConfig:
    max_slots: int = 8  # requests decoded together at most
    page_size: int = 16  # tokens per page
    num_pages: int = 0  # pages in the pool; 0 = from memory_fraction (or enough for all slots)
    memory_fraction: float = 0.5  # of free device memory for the pool, when num_pages == 0
    max_seq_len: int = 512  # prompt + generated tokens of one request
    prefill_chunk: int = 64  # tokens per prefill call at most
    batch_invariant: bool = False
    dtype: str = "float32"
    quantize: str = "none"  # weight-only: "int8" or "fp8" (lmsys.serve.quantize)


@dataclass
class GenerationOptions:
    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # top alternatives per generated token (0..5); None = no logprobs
    prompt_logprobs: int | None = None  # the same for prompt tokens (OpenAI `echo`)


@dataclass
class Event:
    """What one step produced for a request: new text, its tokens, and whether it finished."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[dict[int, float]]
    finish_reason: str | None = None  # "stop" | "length" | "abort" when finished


@dataclass
class Request:
    id: int
    prompt_ids: list[int]
    options: GenerationOptions
    on_event: Callable[[Event], None] | None = None
    arrival: float = field(default_factory=time.perf_counter)
    # progress
    generated: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose keys/values are in the cache
    pages: list[int] = field(default_factory=list)
    text: str = ""
    token_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_token_logprobs: list[float | None] = field(default_factory=list)
    prompt_top_logprobs: list[dict[int, float] | None] = field(default_factory=list)
    finish_reason: str | None = None
    preemptions: int = 0
    first_token_time: float | None = None
    detok: IncrementalDetokenizer | None = None
    stops: StopChecker | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.generated

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def _buckets(limit: int) -> list[int]:
    out, b = [], 1
    while b < limit:
        out.append(b)
        b *= 2
    return out + [limit]


class PagePool:
    """Host-side bookkeeping of the pool's pages: a free list."""

    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self.free_pages = deque(range(num_pages))

    @property
    def num_free(self) -> int:
        return len(self.free_pages)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self.free_pages)

    def allocate(self, n: int) -> list[int]:
        assert n <= len(self.free_pages)
        return [self.free_pages.popleft() for _ in range(n)]

    def release(self, pages: list[int]) -> None:
        self.free_pages.extend(pages)


class Engine:
    def __init__(self, params, model: ModelConfig, tokenizer, config: EngineConfig | None = None,
                 rules: Rules | None = None, eos_token_id: int | None = None):
        self.cfg = config or EngineConfig()
        self.model, self.tokenizer, self.rules = model, tokenizer, rules
        self.eos_token_id = eos_token_id
        c = self.cfg
        if c.max_seq_len % c.page_size:
            raise ValueError(f"max_seq_len {c.max_seq_len} must be a multiple of page_size {c.page_size}")
        self.pages_per_seq = c.max_seq_len // c.page_size
        self.dtype = jnp.dtype(c.dtype)  # "float32" | "bfloat16" | "float16"
        self.num_pages = c.num_pages or self._pages_from_memory()
        self.pool = PagePool(self.num_pages)
        if c.batch_invariant:
            self.prefill_buckets = [c.prefill_chunk]
            self.decode_buckets = [(c.max_slots, self.pages_per_seq)]
        else:
            self.prefill_buckets = [b for b in _buckets(c.prefill_chunk) if b >= min(8, c.prefill_chunk)]
            self.decode_buckets = [(b, p) for b in _buckets(c.max_slots) for p in _buckets(self.pages_per_seq)]

        if rules is not None:
            shardings = rules.tree_shardings(llama.param_axes(model), llama.param_shapes(model))
            params = jax.device_put(params, shardings)
            kv = rules.sharding((None, None, None, "kv_heads", None),
                                (1, 1, 1, model.n_kv_heads, model.head_dim))
            self._kv_sharding = kv
        if c.quantize != "none":
            from lmsys.serve.quantize import quantize_params

            params = jax.jit(quantize_params, static_argnums=1)(params, c.quantize)
        self.params = params
        shape = (model.n_layers, self.num_pages, c.page_size, model.n_kv_heads, model.head_dim)
        self._empty_pages = jax.jit(lambda: jnp.zeros(shape, self.dtype),
                                    out_shardings=None if rules is None else self._kv_sharding)
        self.reset_cache()
        self._prefill = jax.jit(self._prefill_fn, donate_argnums=1)
        self._decode = jax.jit(self._decode_fn, donate_argnums=1, static_argnums=3)

        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._ids = itertools.count()
        self.lock = threading.Lock()
        self.stats = {"decode_steps": 0, "prefill_chunks": 0, "max_decode_batch": 0,
                      "preemptions": 0, "generated_tokens": 0, "finished": 0}

    def reset_cache(self) -> None:
        """A fresh, empty page pool (e.g. after a failed step that had been handed the old one);
        requests that held pages must have been aborted."""
        self.kv = (self._empty_pages(), self._empty_pages())

    # ------------------------------------------------------------------ memory

    def _pages_from_memory(self) -> int:
        """Pages that fit in `memory_fraction` of the first device's free memory; on a backend
        without memory statistics (CPU), enough pages for every slot at full length."""
        c, m = self.cfg, self.model
        page_bytes = 2 * m.n_layers * c.page_size * m.n_kv_heads * m.head_dim * jnp.dtype(self.dtype).itemsize
        stats = jax.devices()[0].memory_stats() or {}
        if "bytes_limit" in stats:
            free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
            return max(1, int(free * c.memory_fraction) // page_bytes)
        return c.max_slots * self.pages_per_seq

    # ------------------------------------------------------------------ jitted functions

    def _forward(self, params, kv, tokens_BT, positions_BT, page_table_BP):
        cache = {"k": kv[0], "v": kv[1], "page_table": page_table_BP}
        logits_BTV, aux = llama.forward(params, tokens_BT, positions_BT, cfg=self.model,
                                        rules=self.rules, dtype=self.dtype, cache=cache)
        return logits_BTV, (aux["cache"]["k"], aux["cache"]["v"])

    def _prefill_fn(self, params, kv, tokens_1C, positions_1C, targets_1C, page_table_1P):
        """One chunk of one prompt: fills the cache; returns the log-probs of each next prompt
        token (for `echo`) with the top alternatives."""
        logits_1CV, kv = self._forward(params, kv, tokens_1C, positions_1C, page_table_1P)
        return next_token_logprobs(logits_1CV, targets_1C, MAX_TOP_LOGPROBS), kv

    def _decode_fn(self, params, kv, inputs, num_top):
        tokens_B, positions_B, page_table_BP, sampling = inputs
        logits_B1V, kv = self._forward(params, kv, tokens_B[:, None], positions_B[:, None], page_table_BP)
        return sample(logits_B1V[:, 0], sampling, num_top), kv

    # ------------------------------------------------------------------ requests

    def add_request(self, prompt_ids: list[int], options: GenerationOptions | None = None,
                    on_event: Callable[[Event], None] | None = None) -> Request:
        """Queues a request; raises RequestError if it can never be served."""
        options = options or GenerationOptions()
        prompt_ids = list(prompt_ids)
        total = len(prompt_ids) + options.max_tokens
        if not prompt_ids:
            raise RequestError("the prompt is empty; send at least one token")
        if any(not 0 <= t < self.model.vocab_size for t in prompt_ids):
            raise RequestError(f"prompt token ids must be in [0, {self.model.vocab_size})")
        if total > self.cfg.max_seq_len:
            raise RequestError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({options.max_tokens}) = {total} "
                f"exceeds the context of {self.cfg.max_seq_len} tokens; shorten the prompt or "
                f"lower max_tokens")
        if math.ceil(total / self.cfg.page_size) > self.num_pages:
            raise RequestError(
                f"the request needs {math.ceil(total / self.cfg.page_size)} KV pages but the pool "
                f"has {self.num_pages}; lower max_tokens or give the server more pages")
        if options.logprobs is not None and not 0 <= options.logprobs <= MAX_TOP_LOGPROBS:
            raise RequestError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {options.logprobs}")
        stop_ids = set(options.stop_token_ids)
        if self.eos_token_id is not None and not options.ignore_eos:
            stop_ids.add(self.eos_token_id)
        with self.lock:
            req = Request(next(self._ids), prompt_ids, options, on_event,
                          detok=IncrementalDetokenizer(self.tokenizer, prompt_ids),
                          stops=StopChecker(options.stop, stop_ids))
            self.waiting.append(req)
        return req

    def abort(self, req: Request) -> None:
        """Stops a request now (e.g. its client went away) and frees its pages."""
        with self.lock:
            if req in self.waiting:
                self.waiting.remove(req)
            if req in self.running:
                self.running.remove(req)
            self.pool.release(req.pages)
            req.pages = []
            if not req.done:
                req.finish_reason = "abort"

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ scheduling

    def _pages_for(self, req: Request, num_tokens: int) -> int:
        return max(0, math.ceil(num_tokens / self.cfg.page_size) - len(req.pages))

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.pool.release(req.pages)
        req.pages, req.num_computed = [], 0
        req.preemptions += 1
        self.stats["preemptions"] += 1
        self.waiting.appendleft(req)

    def _reserve(self, req: Request, num_tokens: int) -> bool:
        """Gives `req` pages for `num_tokens`, preempting newer requests if the pool is short;
        False if even that is not enough (then `req` waits; if it is the newest, it is
        preempted itself)."""
        need = self._pages_for(req, num_tokens)
        while need > self.pool.num_free:
            newer = [r for r in self.running if r.arrival > req.arrival or
                     (r.arrival == req.arrival and r.id > req.id)]
            if not newer:
                return False
            self._preempt(max(newer, key=lambda r: (r.arrival, r.id)))
        req.pages += self.pool.allocate(need)
        return True

    def _page_row(self, req: Request) -> np.ndarray:
        row = np.zeros(self.pages_per_seq, np.int32)
        row[:len(req.pages)] = req.pages
        return row

    def step(self) -> None:
        """One scheduling iteration: admit, at most one prefill chunk, one decode step."""
        with self.lock:
            while self.waiting and len(self.running) < self.cfg.max_slots:
                self.running.append(self.waiting.popleft())
            prefilling = [r for r in self.running if len(r.tokens) - r.num_computed > 1]
            if prefilling:
                self._prefill_chunk(min(prefilling, key=lambda r: (r.arrival, r.id)))
            decoding = sorted((r for r in self.running if len(r.tokens) - r.num_computed == 1),
                              key=lambda r: (r.arrival, r.id))
            ready = [r for r in decoding if r in self.running and self._reserve(r, r.num_computed + 1)]
            ready = [r for r in ready if r in self.running]  # a later reservation may preempt
            if ready:
                self._decode_batch(ready)

    def _prefill_chunk(self, req: Request) -> None:
        tokens = req.tokens
        n = min(self.cfg.prefill_chunk, len(tokens) - 1 - req.num_computed)
        if not self._reserve(req, req.num_computed + n):
            return
        C = next(b for b in self.prefill_buckets if b >= n)
        start = req.num_computed
        toks = np.zeros((1, C), np.int32)
        pos = np.full((1, C), -1, np.int32)
        tgt = np.zeros((1, C), np.int32)
        toks[0, :n] = tokens[start:start + n]
        pos[0, :n] = np.arange(start, start + n)
        tgt[0, :n] = tokens[start + 1:start + n + 1]
        out, self.kv = self._prefill(self.params, self.kv, toks, pos, tgt, self._page_row(req)[None])
        if req.options.prompt_logprobs is not None and start + n <= len(req.prompt_ids) - 1:
            lp, top_ids, top_lps = jax.device_get(out)
            if start == 0 and not req.prompt_token_logprobs:
                req.prompt_token_logprobs.append(None)  # the first token has no prefix
                req.prompt_top_logprobs.append(None)
            k = req.options.prompt_logprobs
            for i in range(n):
                if len(req.prompt_token_logprobs) < len(req.prompt_ids):
                    req.prompt_token_logprobs.append(float(lp[0, i]))
                    req.prompt_top_logprobs.append(
                        {int(t): float(v) for t, v in zip(top_ids[0, i, :k], top_lps[0, i, :k])})
        req.num_computed += n
        self.stats["prefill_chunks"] += 1

    def _decode_batch(self, batch: list[Request]) -> None:
        need = max(len(r.pages) for r in batch)
        B, P = next((b, p) for b, p in self.decode_buckets if b >= len(batch) and p >= need)
        toks = np.zeros(B, np.int32)
        pos = np.full(B, -1, np.int32)
        table = np.zeros((B, P), np.int32)
        temp, top_k, top_p = np.zeros(B, np.float32), np.zeros(B, np.int32), np.ones(B, np.float32)
        seed, step = np.zeros(B, np.uint32), np.zeros(B, np.int32)
        for i, r in enumerate(batch):
            o = r.options
            toks[i], pos[i], table[i] = r.tokens[-1], r.num_computed, self._page_row(r)[:P]
            temp[i], top_k[i], top_p[i] = o.temperature, o.top_k, o.top_p
            seed[i], step[i] = o.seed % 2**32, len(r.generated)
        sampling = SamplingParams(temp, top_k, top_p, seed, step)
        out, self.kv = self._decode(self.params, self.kv, (toks, pos, table, sampling), MAX_TOP_LOGPROBS)
        out = jax.device_get(out)
        self.stats["decode_steps"] += 1
        self.stats["max_decode_batch"] = max(self.stats["max_decode_batch"], len(batch))
        for i, r in enumerate(batch):
            r.num_computed += 1
            self._append(r, int(out.tokens_B[i]), float(out.logprobs_B[i]),
                         {int(t): float(v) for t, v in zip(out.top_tokens_BK[i], out.top_logprobs_BK[i])})

    def _append(self, req: Request, token: int, logprob: float, top: dict[int, float]) -> None:
        """Records a sampled token, applies the stop rules, emits the new text."""
        o, stops = req.options, req.stops
        if req.first_token_time is None:
            req.first_token_time = time.perf_counter()
        req.generated.append(token)
        self.stats["generated_tokens"] += 1
        text = stops.add(token, req.detok.add(token))
        finish = None
        if not stops.stopped and len(req.generated) >= o.max_tokens:
            text += stops.add(token, req.detok.flush())
            if not stops.stopped:
                text, finish = text + stops.flush(), "length"
        if stops.stopped:
            finish = "stop"
        kept = [] if stops.matched == token else [token]  # a stop token is not part of the output
        new_lp, new_top = [], []
        if o.logprobs is not None and kept:
            new_lp, new_top = [logprob], [dict(itertools.islice(top.items(), o.logprobs))]
            req.token_logprobs += new_lp
            req.top_logprobs += new_top
        req.text += text
        if finish:
            req.finish_reason = finish
            self.running.remove(req)
            self.pool.release(req.pages)
            req.pages = []
            self.stats["finished"] += 1
        if req.on_event:
            req.on_event(Event(text, kept, new_lp, new_top, finish))

    # ------------------------------------------------------------------ offline use

    def warmup(self, progress: bool = True) -> int:
        """Compiles every prefill and decode bucket now; returns how many were compiled."""
        shapes = [("prefill", c, self.pages_per_seq) for c in self.prefill_buckets]
        shapes += [("decode", b, p) for b, p in self.decode_buckets]
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(shapes), desc="warm-up (compiling)", unit="shape")
        for kind, n, pages in shapes:
            table = np.zeros((1 if kind == "prefill" else n, pages), np.int32)
            if kind == "prefill":
                z = np.zeros((1, n), np.int32)
                _, self.kv = self._prefill(self.params, self.kv, z, z - 1, z, table)
            else:
                z = np.zeros(n, np.int32)
                sampling = SamplingParams(np.zeros(n, np.float32), z, np.ones(n, np.float32),
                                          np.zeros(n, np.uint32), z)
                _, self.kv = self._decode(self.params, self.kv, (z, z - 1, table, sampling),
                                          MAX_TOP_LOGPROBS)
            if bar:
                bar.update(1)
        if bar:
            bar.close()
        jax.block_until_ready(self.kv)
        return len(shapes)

    def generate(self, prompts: list[str | list[int]], options: GenerationOptions | None = None) -> list[Request]:
        """Runs prompts (text or token ids) to completion; returns the finished requests."""
        reqs = [self.add_request(self.encode(p) if isinstance(p, str) else p, options) for p in prompts]
        while self.has_work():
            self.step()
        return reqs

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids
