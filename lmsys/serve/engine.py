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
query's). Pages are allocated on demand, freed when a request ends or is preempted (or kept by
the prefix cache until the pool needs them: `lmsys.serve.prefix_cache`), and reused.

With a mesh (`rules`), the pool is laid out by the rule table like every other array: KV heads
over `tensor` (as the attention weights) and pages over the mesh axes of `kv_pages` (`data` by
default; their product D is the data-parallel size). Serving is then data-parallel: data shard
g owns pages [g * num_pages/D, (g+1) * num_pages/D) (num_pages is rounded up to a multiple of
D) and slot group g (max_slots/D slots; max_slots must be a multiple of D). A request admitted
into group g gets pages only from shard g's range (one free list per shard), and every call runs
as a `jax.shard_map` manual over those axes: rows [g * B/D, (g+1) * B/D) of a batch of B rows
belong to group g and run on shard g against its local pages, with page ids local to the shard
(`page_table` holds global id - g * num_pages/D), so no device reads another shard's pages.
Inside, the model runs with the rules minus the manual axes (`Rules.manual`): `tensor` (and
`fsdp`) stay compiler-partitioned. Preemption and refusal work per shard: a request that needs
more pages than one shard holds is refused.

## Scheduling

`lmsys.serve.scheduler` decides, between model calls, which requests run, which pages they
hold and what each call carries (admission, chunked and batched prefill, preemption by
recompute, shape buckets); the engine runs the calls: their jitted device side is
`lmsys.serve.model_calls`, a request's host side (options, stop rules, output, events)
`lmsys.serve.outputs`. Each iteration is one batched prefill
call and one decode step. The prefill call computes the output projection only when one of its
rows asks for prompt log-probs (`echo`; a `lax.cond` inside the one compiled function), else
only the KV cache. The decode step computes the log-softmax and top log-probs over the
vocabulary only when one of its rows asks for them (`logprobs`).

A request's host-side work after each step (stop strings, detokenizing, its callback) runs
isolated: if it raises, that request alone ends with finish_reason "error". Options the step
cannot represent (top_k >= 2^31, a non-finite temperature, ...) are refused by `add_request`
(RequestError naming the option). `max_tokens=0` prefills the prompt (with `prompt_logprobs`:
scores it) and ends with "length" without a decode step.

With `speculative="ngram"` or `"draft"` the decode step is a verification call of [last token,
drafts] per row when a row has drafts (`lmsys.serve.speculative`; every step in batch-invariant
mode); a draft model runs beside the target on its own pool (`lmsys.serve.draft`).

Shapes are padded to the scheduler's buckets, so the compilations are exactly
`len(prefill_buckets) + len(decode_buckets)` (plus `len(decode_buckets)` verification calls
with speculation; a draft model's prefill and draft calls: one more per bucket of each), all
done by `warmup()`. In batch-invariant mode
there is one bucket of each, so every call has one shape whatever runs beside a request, and a
request's chunks are always the same slices of its prompt: its numbers never depend on what
else is running.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import threading
from dataclasses import dataclass
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lmsys.config import ModelConfig
from lmsys.models import llama, lora
from lmsys.parallel import Rules
from lmsys.parallel.sharded_kernels import POOL_AXES
from lmsys.serve.constrained import advance, all_allowed
from lmsys.serve.model_calls import ModelCalls
from lmsys.serve.outputs import add_prompt_logprobs, append_token, check_options, finish_scoring
from lmsys.serve.sampling import SamplingParams
from lmsys.serve.speculative import SPECULATIVE, speculate, warm_verify
from lmsys.serve.scheduler import Event, GenerationOptions, PagePool, Request, RequestError, Scheduler
from lmsys.serve.stops import IncrementalDetokenizer, StopChecker
from lmsys.serve.window_pages import recycling_window

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    max_slots: int = 8  # requests decoded together at most
    page_size: int = 16  # tokens per page
    num_pages: int = 0  # pages in the pool; 0 = from memory_fraction (or enough for all slots)
    memory_fraction: float = 0.5  # of free device memory for the pool, when num_pages == 0
    max_seq_len: int = 512  # prompt + generated tokens of one request
    prefill_chunk: int = 64  # prompt tokens of one request per prefill call at most
    # padded prompt tokens (rows x chunk bucket) of one prefill call per data shard at most;
    # 0 = 4 * prefill_chunk
    prefill_tokens: int = 0
    batch_invariant: bool = False
    # prefill chunk widths at powers of two and 1.5x between them: less padding for
    # throughput-bound scoring (`lmsys eval`), at the price of more compiled shapes
    fine_prefill_widths: bool = False
    dtype: str = "float32"
    quantize: str = "none"  # weight-only: "int8" or "fp8" (lmsys.serve.quantize)
    prefix_cache: bool = True  # automatic prefix caching (lmsys.serve.prefix_cache)
    # "ngram" or "draft" (a draft model): speculative decoding (lmsys.serve.speculative)
    speculative: str = "none"
    num_speculative_tokens: int = 4  # drafted tokens per request and step at most


class Engine:
    drafter = None  # lmsys.serve.draft.Drafter with speculative="draft"

    def __init__(self, params, model: ModelConfig, tokenizer, config: EngineConfig | None = None,
                 rules: Rules | None = None, eos_token_id: int | None = None, adapters=None, draft=None):
        """adapters: a lmsys.serve.lora.AdapterBank of LoRA adapters requests pick by name;
        draft: the lmsys.serve.draft.DraftModel of speculative="draft"."""
        self.cfg = config or EngineConfig()
        self.model, self.tokenizer, self.rules = model, tokenizer, rules
        self.eos_token_id = eos_token_id
        c = self.cfg
        self.dtype = jnp.dtype(c.dtype)  # "float32" | "bfloat16" | "float16"
        # the mesh axes that split the pool's pages: one slot group and page range per shard
        self.shard_axes = () if rules is None else tuple(
            a for a in rules.table.get("kv_pages", ()) if rules.mesh.shape[a] > 1)
        D = self.num_shards = math.prod(rules.mesh.shape[a] for a in self.shard_axes) if rules else 1
        num_pages = -(-c.num_pages // D) * D if c.num_pages else self._pages_from_memory()
        self.scheduler = Scheduler(
            num_pages, D, max_slots=c.max_slots, page_size=c.page_size, max_seq_len=c.max_seq_len,
            prefill_chunk=c.prefill_chunk, prefill_tokens=c.prefill_tokens,
            batch_invariant=c.batch_invariant, fine_widths=c.fine_prefill_widths,
            shard_axes=self.shard_axes, window=recycling_window(model), prefix_cache=c.prefix_cache)
        self.num_pages = num_pages

        if rules is not None:
            shardings = rules.tree_shardings(llama.param_axes(model), llama.param_shapes(model))
            params = jax.device_put(params, shardings)
            self._kv_sharding = rules.sharding(POOL_AXES, self._pool_shape)
        self._quantize = None  # the weight-only quantizer of new base weights (and set_params')
        if c.quantize != "none":
            from lmsys.serve.quantize import quantize_params

            self._quantize = jax.jit(partial(quantize_params, mode=c.quantize))
            params = self._quantize(params)
        self.adapters = adapters
        self._adapter_versions: dict[str, int] = {}  # bumped by set_adapter: the prefix cache's salt
        self.weights_version = 0  # bumped by set_params: part of every request's cache salt
        if adapters is not None:  # the bank beside the base weights (lmsys.serve.lora)
            params = lora.with_adapters(params, adapters.device_arrays(rules, self.dtype))
        self.params = params
        self._empty_pages = jax.jit(lambda: jnp.zeros(self._pool_shape, self.dtype),
                                    out_shardings=None if rules is None else self._kv_sharding)
        self.reset_cache()
        self.calls = ModelCalls(model, rules, self.dtype, self.shard_axes)
        self._prefill = self.calls.jit(self.calls.prefill)
        self._decode = self.calls.jit(self.calls.decode)
        if c.speculative not in SPECULATIVE or c.num_speculative_tokens < 1:
            raise ValueError(f"speculative must be one of {', '.join(SPECULATIVE)} with "
                             f"num_speculative_tokens >= 1, got {c.speculative!r} and "
                             f"{c.num_speculative_tokens}")
        self._verify = self.calls.jit(self.calls.verify)
        if (c.speculative == "draft") != (draft is not None):
            raise ValueError("speculative='draft' goes with a draft model: Engine(..., draft=DraftModel(...))")
        if draft is not None:
            from lmsys.serve.draft import Drafter
            self.drafter = Drafter(self, draft)

        self.grammars = None  # lmsys.serve.constrained.Grammars, made for the first grammar
        self._ids = itertools.count()
        self.lock = threading.Lock()

    # the scheduler's state, read by the server's metrics, the benchmarks and tests
    @property
    def pool(self) -> PagePool:
        return self.scheduler.pool

    @property
    def waiting(self):
        return self.scheduler.waiting

    @property
    def running(self) -> list[Request]:
        return self.scheduler.running

    @property
    def stats(self) -> dict[str, int]:
        stats = self.scheduler.stats
        stats["prefix_cache_pages"] = getattr(self.pool, "num_cached", 0)
        return stats

    @property
    def prefill_buckets(self) -> list[tuple[int, int]]:
        return self.scheduler.prefill_buckets

    @property
    def decode_buckets(self) -> list[tuple[int, int]]:
        return self.scheduler.decode_buckets

    def reset_cache(self) -> None:
        """A fresh, empty page pool (e.g. after a failed step that had been handed the old one);
        requests that held pages must have been aborted; the prefix cache is forgotten."""
        self.kv = (self._empty_pages(), self._empty_pages())
        if self.drafter is not None:
            self.drafter.reset()
        self._forget_prefix_cache()

    def _forget_prefix_cache(self) -> None:
        if hasattr(self.pool, "clear"):  # a CachingPagePool (lmsys.serve.prefix_cache)
            self.pool.clear()

    # ------------------------------------------------------------------ memory

    @property
    def _pool_shape(self) -> tuple[int, ...]:
        m = self.model
        return (m.n_layers, self.num_pages, self.cfg.page_size, m.n_kv_heads, m.head_dim)

    def _pages_from_memory(self) -> int:
        """Pages that fit in `memory_fraction` of the first device's free memory (each device
        holds 1/D of the pages and its share of the KV heads), a multiple of D; on a backend
        without memory statistics (CPU), enough pages for every slot at full length."""
        c, m, D = self.cfg, self.model, self.num_shards
        shape = (m.n_layers, D, c.page_size, m.n_kv_heads, m.head_dim)  # one page per shard
        if self.rules is not None:  # -> one device's block: one page, its KV heads
            shape = self.rules.sharding(POOL_AXES, shape).shard_shape(shape)
        page_bytes = 2 * math.prod(shape) * self.dtype.itemsize  # keys and values
        stats = jax.devices()[0].memory_stats() or {}
        if "bytes_limit" in stats:
            free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
            return D * max(1, int(free * c.memory_fraction) // page_bytes)
        return c.max_slots * (c.max_seq_len // c.page_size)

    # ------------------------------------------------------------------ requests

    def add_request(self, prompt_ids: list[int], options: GenerationOptions | None = None,
                    on_event: Callable[[Event], None] | None = None) -> Request:
        """Queues a request; raises RequestError if it can never be served."""
        req = self.new_request(prompt_ids, options, on_event)
        self.enqueue(req)
        return req

    def enqueue(self, req: Request) -> None:
        """Queues a request made by `new_request` (waits while a step holds the engine)."""
        with self.lock:
            self.scheduler.add(req)

    def new_request(self, prompt_ids: list[int], options: GenerationOptions | None = None,
                    on_event: Callable[[Event], None] | None = None) -> Request:
        """A checked request, not queued yet (any thread, never waits for a step); raises
        RequestError if it can never be served."""
        options = options or GenerationOptions()
        prompt_ids = list(prompt_ids)
        if not prompt_ids:
            raise RequestError("the prompt is empty; send at least one token")
        if any(not 0 <= t < self.model.vocab_size for t in prompt_ids):
            raise RequestError(f"prompt token ids must be in [0, {self.model.vocab_size})")
        check_options(options)
        if options.adapter and (self.adapters is None or options.adapter not in self.adapters.names):
            raise RequestError(f"the LoRA adapter {options.adapter!r} is not loaded; loaded: "
                               f"{sorted(self.adapters.names) if self.adapters else 'none'}")
        # cached KV pages are shared only within one version of the weights and the adapter
        salt = f"weights:{self.weights_version}\0{options.cache_salt}"
        if options.adapter:
            salt = f"lora:{options.adapter}:{self._adapter_versions.get(options.adapter, 0)}\0{salt}"
        options = dataclasses.replace(options, cache_salt=salt)
        self.scheduler.check_fits(len(prompt_ids), options.max_tokens)
        stop_ids = set(options.stop_token_ids)
        if self.eos_token_id is not None and (not options.ignore_eos or options.grammar is not None):
            stop_ids.add(self.eos_token_id)  # a grammar's end is the end-of-text token
        return Request(next(self._ids), prompt_ids, options, on_event,
                       detok=IncrementalDetokenizer(self.tokenizer, prompt_ids, options.skip_special_tokens),
                       stops=StopChecker(options.stop, stop_ids),
                       matcher=None if options.grammar is None else self.grammar_state(options.grammar))

    def grammar_state(self, grammar: str, param: str = "response_format"):
        """A request's parser state for `grammar` (RequestError if the library rejects it)."""
        if self.grammars is None:
            if self.eos_token_id is None:
                raise RequestError("structured output needs the model's end-of-text token", param=param)
            from lmsys.serve.constrained import Grammars

            self.grammars = Grammars(self.tokenizer, self.model.vocab_size, self.eos_token_id)
        return self.grammars.matcher(grammar, param)

    def abort(self, req: Request) -> None:
        """Stops a request now (e.g. its client went away) and frees its pages."""
        with self.lock:
            self.scheduler.abort(req)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ------------------------------------------------------------------ the model calls

    def _page_row(self, req: Request) -> np.ndarray:
        """The request's page table row, in page ids local to its shard."""
        row = np.zeros(self.scheduler.pages_per_seq, np.int32)
        row[:len(req.pages)] = self.scheduler.local_pages(req)
        return row

    def step(self) -> None:
        """One scheduling iteration: admit, one batched prefill call (at most one chunk per
        request), one decode step."""
        with self.lock:
            self.scheduler.admit()
            chunks = self.scheduler.plan_prefill()
            if chunks:
                self._prefill_chunks(chunks)
            for req in [r for r in self.running if r.options.max_tokens == 0]:
                if len(req.tokens) - 1 - req.num_computed < 1:  # prompt scored: no new token
                    self._isolated(req, finish_scoring, req, self.scheduler)
            if self.cfg.speculative == "none":
                ready = self.scheduler.plan_decode()
                if ready:
                    self._decode_batch(ready)
            else:
                speculate(self)

    def _prefill_chunks(self, chunks: list[tuple[Request, int, int]]) -> None:
        """One prefill call over `chunks`: shard g's rows are [g * R, (g+1) * R) of D * R."""
        B, C = self.scheduler.prefill_shape(chunks)
        toks = np.zeros((B, C), np.int32)
        pos = np.full((B, C), -1, np.int32)
        tgt = np.zeros((B, C), np.int32)
        echo_rows = np.zeros(B, np.int32)  # 1: prompt log-probs, 2: with top alternatives
        table = np.zeros((B, self.scheduler.pages_per_seq), np.int32)
        rows = self.scheduler.rows([r for r, _, _ in chunks], B)
        for i, (req, start, n) in zip(rows, chunks):
            tokens = req.tokens
            toks[i, :n] = tokens[start:start + n]
            pos[i, :n] = np.arange(start, start + n)
            tgt[i, :n] = tokens[start + 1:start + n + 1]
            table[i] = self._page_row(req)
        echo = [(i, c) for i, c in zip(rows, chunks) if c[0].options.prompt_logprobs is not None
                and c[1] + c[2] <= len(c[0].prompt_ids) - 1]
        for i, (req, _, _) in echo:
            echo_rows[i] = 2 if req.options.prompt_logprobs > 0 else 1
        adapter = self._adapter_rows(rows, [r for r, _, _ in chunks], B)
        out, self.kv = self._prefill(self.params, self.kv, (toks, pos, tgt, echo_rows, table, adapter))
        if self.drafter is not None:
            self.drafter.prefill(toks, pos, table)
        lp, greedy, top_ids, top_lps = jax.device_get(out) if echo else (None,) * 4
        for i, (req, start, n) in echo:
            add_prompt_logprobs(req, start, n, lp[i], greedy[i], top_ids[i], top_lps[i])
        for req, _, n in chunks:
            req.num_computed += n
        self.stats["prefill_calls"] += 1
        self.stats["prefill_chunks"] += len(chunks)
        self.stats["max_prefill_rows"] = max(self.stats["max_prefill_rows"], len(chunks))

    def _decode_rows(self, batch: list[Request]):
        """A decode-like call's rows for `batch` (shard g's requests fill rows [g * B/D,
        (g+1) * B/D)): each request's row, the page table, sampling and log-prob flags."""
        B, P = self.scheduler.decode_shape(batch)
        table = np.zeros((B, P), np.int32)
        temp, top_k, top_p = np.zeros(B, np.float32), np.zeros(B, np.int32), np.ones(B, np.float32)
        seed, step = np.zeros(B, np.uint32), np.zeros(B, np.int32)
        want_logprobs = np.zeros(B, bool)
        rows = self.scheduler.rows(batch, B)
        for i, r in zip(rows, batch):
            o = r.options
            table[i] = self._page_row(r)[:P]
            temp[i], top_k[i], top_p[i] = o.temperature, min(o.top_k, self.model.vocab_size), o.top_p
            seed[i], step[i] = o.seed % 2**32, len(r.generated)
            want_logprobs[i] = o.logprobs is not None
        self.stats["decode_steps"] += 1
        self.stats["decode_rows"] += len(batch)
        self.stats["max_decode_batch"] = max(self.stats["max_decode_batch"], len(batch))
        sampling = SamplingParams(temp, top_k, top_p, seed, step)
        return rows, table, sampling, want_logprobs, self._adapter_rows(rows, batch, B)

    def _decode_batch(self, batch: list[Request]) -> None:
        """One decode step of `batch`."""
        rows, table, sampling, want_logprobs, adapter = self._decode_rows(batch)
        B = len(table)
        toks = np.zeros(B, np.int32)
        pos = np.full(B, -1, np.int32)
        for i, r in zip(rows, batch):
            toks[i], pos[i] = r.tokens[-1], r.num_computed
        allowed = (self.grammars.bitmask(rows, batch, B) if self.grammars is not None
                   else all_allowed(B, self.model.vocab_size))
        out, self.kv = self._decode(self.params, self.kv,
                                    (toks, pos, table, sampling, want_logprobs, allowed, adapter))
        out = jax.device_get(out)
        tokens = out.tokens_B.tolist()
        for i, r in zip(rows, batch):
            r.num_computed += 1
            if r.matcher is not None:
                self._isolated(r, advance, r, tokens[i])
                if r.done:
                    continue
            if r.options.logprobs is None:
                self._isolated(r, append_token, r, self.scheduler, tokens[i], 0.0, {})
            else:
                self._isolated(r, append_token, r, self.scheduler, tokens[i], float(out.logprobs_B[i]), dict(zip(
                    out.top_tokens_BK[i].tolist(), out.top_logprobs_BK[i].tolist())))

    def _adapter_rows(self, rows, reqs: list[Request], B: int) -> np.ndarray:
        """Each row's LoRA slot (0: the base)."""
        out = np.zeros(B, np.int32)
        for i, r in zip(rows, reqs):
            out[i] = self.adapters.slot(r.options.adapter) if self.adapters else 0
        return out

    def set_adapter(self, name: str, adapters: dict) -> None:
        """Loads (or replaces) LoRA adapter `name` into the bank between steps; no recompilation."""
        with self.lock:
            self.params = self.adapters.set_adapter(self.params, name, adapters, self.rules)
            self._adapter_versions[name] = self._adapter_versions.get(name, 0) + 1

    def set_params(self, params) -> None:
        """Serves new base weights of the same model (e.g. the trainer's after an RL update),
        resharded on device onto the engine's placement (quantized as the engine's are), between
        steps; the KV pool, the adapter bank and every compiled shape stay (no recompilation).
        Requests in flight go on over KV written by the old weights: call it between
        generations, or once they finish. Cached prefix pages of the old weights are never
        reused: the prefix cache is forgotten (for requests queued before the swap) and the
        weights' version is in every later request's cache salt (for pages of requests in flight)."""
        if self._quantize is not None:
            params = self._quantize(params)
        old = lora.with_adapters(self.params, None)
        params = lora.with_adapters(params, None)
        if jax.tree.structure(params) != jax.tree.structure(old):
            raise ValueError("set_params: the new weights' tree differs from the served model's")
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(old)):
            if a.shape != b.shape or a.dtype != b.dtype:
                raise ValueError(f"set_params: {jax.tree_util.keystr(path)} is {a.dtype}{list(a.shape)}, "
                                 f"the served model's is {b.dtype}{list(b.shape)}")
        params = jax.device_put(params, jax.tree.map(lambda x: x.sharding, old))
        with self.lock:
            self.params = lora.with_adapters(params, lora.adapters_of(self.params))
            self.weights_version += 1
            self._forget_prefix_cache()

    def _isolated(self, req: Request, fn, *args) -> None:
        """Runs one request's host-side work (its stop strings, detokenizing, its callback); if
        that raises, only this request fails (finish_reason "error", logged with its id)."""
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - one request's failure must not fail its neighbours
            log.exception("request %d failed on the host; dropping it (the others go on)", req.id)
            self.stats["failed"] += 1
            req.finish_reason = "error"
            self.scheduler.abort(req)
            if req.on_event:
                with contextlib.suppress(Exception):
                    req.on_event(Event("", [], [], [], "error"))

    # ------------------------------------------------------------------ offline use

    def warmup(self, progress: bool = True) -> int:
        """Compiles every prefill and decode bucket now; returns how many were compiled."""
        shapes = [("prefill", b, c) for b, c in self.prefill_buckets]
        shapes += [("decode", b, p) for b, p in self.decode_buckets]
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(shapes), desc="warm-up (compiling)", unit="shape")
        for kind, n, m in shapes:  # prefill: rows x chunk; decode: rows x pages
            if kind == "prefill":
                z, table = np.zeros((n, m), np.int32), np.zeros((n, self.scheduler.pages_per_seq), np.int32)
                _, self.kv = self._prefill(self.params, self.kv,
                                           (z, z - 1, z, np.zeros(n, np.int32), table, z[:, 0]))
            else:
                z, table = np.zeros(n, np.int32), np.zeros((n, m), np.int32)
                sampling = SamplingParams(np.zeros(n, np.float32), z, np.ones(n, np.float32),
                                          np.zeros(n, np.uint32), z)
                _, self.kv = self._decode(self.params, self.kv, (z, z - 1, table, sampling, np.zeros(n, bool),
                                                                 all_allowed(n, self.model.vocab_size), z))
            if bar:
                bar.update(1)
        if bar:
            bar.close()
        n = len(shapes) + (0 if self.cfg.speculative == "none" else warm_verify(self))
        jax.block_until_ready(self.kv)
        return n

    def generate(self, prompts: list[str | list[int]], options: GenerationOptions | None = None) -> list[Request]:
        """Runs prompts (text or token ids) to completion; returns the finished requests."""
        reqs = [self.add_request(self.encode(p) if isinstance(p, str) else p, options) for p in prompts]
        while self.has_work():
            self.step()
        return reqs

    def encode(self, text: str) -> list[int]:
        # a Hugging Face tokenizer's encode_batch releases the GIL (encode does not: a 3 MB
        # prompt held every other thread of the server for 2 s), with the same ids
        batch = getattr(self.tokenizer, "encode_batch", None)
        return (batch([text], add_special_tokens=False)[0] if batch
                else self.tokenizer.encode(text, add_special_tokens=False)).ids
