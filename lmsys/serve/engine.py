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

Between model calls the scheduler admits waiting requests into free slots (up to
`max_slots`; into the slot group with the fewest requests, then the most free pages). Each
iteration then runs one batched prefill call and one decode step. The prefill call takes the
next chunk of several prefilling requests at once, one row each (a prompt of n tokens prefills
its first n-1 in chunks of at most `prefill_chunk`; at most one chunk per request per
iteration): requests are taken oldest first while the call's padded shape, rows per data shard x
chunk bucket, stays within `prefill_tokens` (like vLLM's `max_num_batched_tokens`, per data
shard; the oldest always fits); a request that does not fit waits for the next iteration. With
D data shards each shard fills its own rows, [g * R, (g+1) * R) of a call of D * R rows. The
call computes the output projection only when one of its rows asks for prompt log-probs
(`echo`; a `lax.cond` inside the one compiled function), else only the KV cache. The
decode step then runs every request whose next input is a single token (a prompt's last
token, or the token sampled last); it computes the log-softmax and top log-probs over the
vocabulary only when one of its rows asks for them (`logprobs`). So running decodes never wait for more than one prefill
call, of at most `prefill_tokens` tokens per shard, however long the prompts. When a shard runs
out of pages, its newest running request is preempted: its pages are freed and it goes back to
the front of the queue, to be recomputed from its prompt plus the tokens it already generated
(sampling is seeded per token, so the text is unchanged).

Shapes are padded to buckets (prefill: rows x chunk length, powers of two with rows x chunk <=
`prefill_tokens`; decode: batch size x pages per row, powers of two per shard, so a decode step
attends over the pages in use, not the whole context), so the compilations are exactly
`len(prefill_buckets) + len(decode_buckets)`, all done by `warmup()`. In batch-invariant mode
there is one bucket of each (decode: the largest; prefill: min(slots per shard, prefill_tokens
// prefill_chunk) rows per shard of `prefill_chunk` tokens), so every call has one shape
whatever runs beside a request, and a request's chunks are always the same slices of its
prompt: its numbers never depend on what else is running.
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
from jax.sharding import PartitionSpec

from lmsys.config import ModelConfig
from lmsys.models import llama
from lmsys.parallel import Rules
from lmsys.parallel.sharded_kernels import POOL_AXES
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
    prefill_chunk: int = 64  # prompt tokens of one request per prefill call at most
    # padded prompt tokens (rows x chunk bucket) of one prefill call per data shard at most;
    # 0 = 4 * prefill_chunk
    prefill_tokens: int = 0
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
    pages: list[int] = field(default_factory=list)  # global page ids, all in shard `shard`
    shard: int = 0  # the data shard (slot group) serving it while it runs
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
    """Host-side bookkeeping of the pool's pages: one free list per data shard; shard g owns
    the page ids [g * pages_per_shard, (g + 1) * pages_per_shard)."""

    def __init__(self, num_pages: int, num_shards: int = 1):
        if num_pages % num_shards:
            raise ValueError(f"{num_pages} pages do not split evenly over {num_shards} shards")
        self.num_pages, self.num_shards = num_pages, num_shards
        self.pages_per_shard = num_pages // num_shards
        self.free_lists = [deque(self.shard_range(g)) for g in range(num_shards)]

    def shard_range(self, shard: int) -> range:
        return range(shard * self.pages_per_shard, (shard + 1) * self.pages_per_shard)

    def num_free_in(self, shard: int) -> int:
        return len(self.free_lists[shard])

    @property
    def num_free(self) -> int:
        return sum(map(len, self.free_lists))

    @property
    def num_used(self) -> int:
        return self.num_pages - self.num_free

    def allocate(self, n: int, shard: int = 0) -> list[int]:
        free = self.free_lists[shard]
        assert n <= len(free)
        return [free.popleft() for _ in range(n)]

    def release(self, pages: list[int]) -> None:
        for page in pages:
            self.free_lists[page // self.pages_per_shard].append(page)


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
        if c.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {c.prefill_chunk}")
        self.prefill_tokens = c.prefill_tokens or 4 * c.prefill_chunk
        if self.prefill_tokens < c.prefill_chunk:
            raise ValueError(
                f"prefill_tokens {c.prefill_tokens} is below prefill_chunk {c.prefill_chunk}: a "
                f"prefill call must hold at least one full chunk; use prefill_tokens >= "
                f"{c.prefill_chunk} (or 0 for 4 * prefill_chunk)")
        self.dtype = jnp.dtype(c.dtype)  # "float32" | "bfloat16" | "float16"
        # the mesh axes that split the pool's pages: one slot group and page range per shard
        self.shard_axes = () if rules is None else tuple(
            a for a in rules.table.get("kv_pages", ()) if rules.mesh.shape[a] > 1)
        D = self.num_shards = math.prod(rules.mesh.shape[a] for a in self.shard_axes) if rules else 1
        if c.max_slots % D:
            raise ValueError(
                f"max_slots {c.max_slots} must be a multiple of the data-parallel size {D} (mesh "
                f"axes {', '.join(self.shard_axes)}): each data shard serves max_slots/{D} slots; "
                f"use max_slots={-(-c.max_slots // D) * D}")
        self.slots_per_shard = c.max_slots // D
        self.num_pages = -(-c.num_pages // D) * D if c.num_pages else self._pages_from_memory()
        self.pool = PagePool(self.num_pages, D)
        # prefill buckets: (rows of all shards, chunk length); decode: (rows of all shards, pages)
        if c.batch_invariant:
            rows = min(self.slots_per_shard, self.prefill_tokens // c.prefill_chunk)
            self.prefill_buckets = [(D * rows, c.prefill_chunk)]
            self.decode_buckets = [(c.max_slots, self.pages_per_seq)]
        else:
            chunks = [b for b in _buckets(c.prefill_chunk) if b >= min(8, c.prefill_chunk)]
            rows = _buckets(min(self.slots_per_shard, self.prefill_tokens // chunks[0]))
            self.prefill_buckets = [(D * r, n) for r in rows for n in chunks
                                    if r * n <= self.prefill_tokens]
            self.decode_buckets = [(D * b, p) for b in _buckets(self.slots_per_shard)
                                   for p in _buckets(self.pages_per_seq)]

        if rules is not None:
            shardings = rules.tree_shardings(llama.param_axes(model), llama.param_shapes(model))
            params = jax.device_put(params, shardings)
            self._kv_sharding = rules.sharding(POOL_AXES, self._pool_shape)
        if c.quantize != "none":
            from lmsys.serve.quantize import quantize_params

            params = jax.jit(quantize_params, static_argnums=1)(params, c.quantize)
        self.params = params
        self._empty_pages = jax.jit(lambda: jnp.zeros(self._pool_shape, self.dtype),
                                    out_shardings=None if rules is None else self._kv_sharding)
        self.reset_cache()
        self._prefill = jax.jit(self._per_shard(self._prefill_fn), donate_argnums=1)
        self._decode = jax.jit(self._per_shard(self._decode_fn), donate_argnums=1)

        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._ids = itertools.count()
        self.lock = threading.Lock()
        self.stats = {"decode_steps": 0, "prefill_calls": 0, "prefill_chunks": 0,
                      "max_prefill_rows": 0, "max_decode_batch": 0, "preemptions": 0,
                      "generated_tokens": 0, "finished": 0}

    def reset_cache(self) -> None:
        """A fresh, empty page pool (e.g. after a failed step that had been handed the old one);
        requests that held pages must have been aborted."""
        self.kv = (self._empty_pages(), self._empty_pages())

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
        return c.max_slots * self.pages_per_seq

    # ------------------------------------------------------------------ jitted functions

    def _per_shard(self, fn):
        """`fn(params, kv, rows, rules) -> (out, kv)` run by each data shard on its own rows
        (every leaf of `rows` and `out` has the batch first) and its own pages: a shard_map
        manual over the page axes (tensor and fsdp stay automatic inside)."""
        if self.num_shards == 1:
            return lambda params, kv, rows: fn(params, kv, rows, self.rules)
        axes = self.shard_axes
        rows, pages = PartitionSpec(axes), PartitionSpec(None, axes)
        # check_vma=False: every output is per shard anyway, and a Pallas kernel's outputs (the
        # paged decode kernel, attention_impl="pallas") carry no manual-axis types
        return jax.shard_map(lambda params, kv, rows: fn(params, kv, rows, self.rules.manual(axes)),
                             mesh=self.rules.mesh, in_specs=(PartitionSpec(), pages, rows),
                             out_specs=(rows, pages), axis_names=set(axes), check_vma=False)

    def _forward(self, params, kv, tokens_BT, positions_BT, page_table_BP, rules):
        """The final hidden states [B, T, D] (no output projection) and the updated pool."""
        cache = {"k": kv[0], "v": kv[1], "page_table": page_table_BP}
        x_BTD, aux = llama.forward(params, tokens_BT, positions_BT, cfg=self.model, rules=rules,
                                   dtype=self.dtype, cache=cache, logits=False)
        return x_BTD, (aux["cache"]["k"], aux["cache"]["v"])

    def _logits(self, params, x_BTD, rules):
        logits_BTV = llama.unembed(params, x_BTD, cfg=self.model, rules=rules, dtype=self.dtype)
        if rules is not None:
            # sampling and log-probs work on whole rows of the vocabulary: gather it here (left
            # to the partitioner inside the data shard_map, jaxlib 0.10.2's SPMD partitioner
            # aborts on their gathers when the vocabulary splits over `tensor` and the rows or
            # positions over `fsdp` or `sequence`)
            logits_BTV = rules.constrain(logits_BTV, ("batch", "seq", None))
        return logits_BTV

    def _prefill_fn(self, params, kv, rows, rules):
        """One chunk of one prompt per row: fills the cache. Only when a row of the call asks
        for them (`echo_B`), also the log-probs of each next prompt token (for `echo`) with the
        top alternatives; otherwise zeros, and the output projection is skipped."""
        tokens_BC, positions_BC, targets_BC, echo_B, page_table_BP = rows
        x_BCD, kv = self._forward(params, kv, tokens_BC, positions_BC, page_table_BP, rules)

        def echo(x_BCD):
            return next_token_logprobs(self._logits(params, x_BCD, rules), targets_BC, MAX_TOP_LOGPROBS)

        def skip(x_BCD):
            return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(echo, x_BCD))

        return jax.lax.cond(jnp.any(echo_B), echo, skip, x_BCD), kv

    def _decode_fn(self, params, kv, rows, rules):
        """One token per row; the log-probs (and top alternatives) only when a row of the call
        asks for them (`logprobs_B`), else zeros."""
        tokens_B, positions_B, page_table_BP, sampling, logprobs_B = rows
        x_B1D, kv = self._forward(params, kv, tokens_B[:, None], positions_B[:, None],
                                  page_table_BP, rules)
        logits_BV = self._logits(params, x_B1D, rules)[:, 0]
        return sample(logits_BV, sampling, MAX_TOP_LOGPROBS, logprobs_B), kv

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
        if math.ceil(total / self.cfg.page_size) > self.pool.pages_per_shard:
            per_shard = "" if self.num_shards == 1 else (
                f" per data shard ({self.num_pages} over {self.num_shards} shards)")
            raise RequestError(
                f"the request needs {math.ceil(total / self.cfg.page_size)} KV pages but the pool "
                f"has {self.pool.pages_per_shard}{per_shard}; lower max_tokens or give the server "
                f"more pages")
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
        """Gives `req` pages of its shard for `num_tokens`, preempting newer requests of the
        shard if it is short; False if even that is not enough (then `req` waits; if it is the
        newest, it is preempted itself)."""
        need = self._pages_for(req, num_tokens)
        while need > self.pool.num_free_in(req.shard):
            newer = [r for r in self.running if r.shard == req.shard and (
                r.arrival > req.arrival or (r.arrival == req.arrival and r.id > req.id))]
            if not newer:
                return False
            self._preempt(max(newer, key=lambda r: (r.arrival, r.id)))
        req.pages += self.pool.allocate(need, req.shard)
        return True

    def _page_row(self, req: Request) -> np.ndarray:
        """The request's page table row, in page ids local to its shard."""
        row = np.zeros(self.pages_per_seq, np.int32)
        first = self.pool.shard_range(req.shard).start
        row[:len(req.pages)] = np.asarray(req.pages, np.int32) - first
        return row

    def _admit(self) -> None:
        """Moves waiting requests into free slots: each into the slot group with the fewest
        running requests, then the most free pages."""
        load = [0] * self.num_shards
        for r in self.running:
            load[r.shard] += 1
        while self.waiting:
            open_ = [g for g in range(self.num_shards) if load[g] < self.slots_per_shard]
            if not open_:
                return
            g = min(open_, key=lambda g: (load[g], -self.pool.num_free_in(g), g))
            req = self.waiting.popleft()
            req.shard, load[g] = g, load[g] + 1
            self.running.append(req)

    def step(self) -> None:
        """One scheduling iteration: admit, one batched prefill call (at most one chunk per
        request), one decode step."""
        with self.lock:
            self._admit()
            chunks = self._plan_prefill()
            if chunks:
                self._prefill_chunks(chunks)
            decoding = sorted((r for r in self.running if len(r.tokens) - r.num_computed == 1),
                              key=lambda r: (r.arrival, r.id))
            ready = [r for r in decoding if r in self.running and self._reserve(r, r.num_computed + 1)]
            ready = [r for r in ready if r in self.running]  # a later reservation may preempt
            if ready:
                self._decode_batch(ready)

    def _prefill_bucket(self, rows: int, width: int) -> tuple[int, int] | None:
        """The cheapest prefill bucket with `rows` rows per data shard of `width` tokens, or
        None if every such shape exceeds `prefill_tokens`."""
        fits = [b for b in self.prefill_buckets if b[0] >= self.num_shards * rows and b[1] >= width]
        return min(fits, key=lambda b: (b[0] * b[1], b[0]), default=None)

    def _plan_prefill(self) -> list[tuple[Request, int, int]]:
        """This iteration's prefill chunks, (request, start, length): the running requests still
        prefilling, oldest first, each with its next chunk while the call still fits a bucket;
        each one's pages are reserved (which may preempt newer requests of its shard)."""
        chunks, rows, width = [], [0] * self.num_shards, 0
        for req in sorted(self.running, key=lambda r: (r.arrival, r.id)):
            left = len(req.tokens) - 1 - req.num_computed
            if left < 1 or req not in self.running:  # decoding, or preempted just now
                continue
            n = min(self.cfg.prefill_chunk, left)
            if self._prefill_bucket(max(max(rows), rows[req.shard] + 1), max(width, n)) is None:
                continue
            if self._reserve(req, req.num_computed + n):
                chunks.append((req, req.num_computed, n))
                rows[req.shard] += 1
                width = max(width, n)
        return chunks

    def _most_per_shard(self, reqs: list[Request]) -> int:
        return max(sum(r.shard == g for r in reqs) for g in range(self.num_shards))

    def _rows(self, reqs: list[Request], B: int) -> list[int]:
        """Each request's row in a call of B rows: shard g's fill [g * B/D, (g+1) * B/D) in turn."""
        used, rows = [0] * self.num_shards, []
        for r in reqs:
            rows.append(r.shard * (B // self.num_shards) + used[r.shard])
            used[r.shard] += 1
        return rows

    def _prefill_chunks(self, chunks: list[tuple[Request, int, int]]) -> None:
        """One prefill call over `chunks`: shard g's rows are [g * R, (g+1) * R) of D * R."""
        B, C = self._prefill_bucket(self._most_per_shard([r for r, _, _ in chunks]),
                                    max(n for _, _, n in chunks))
        toks = np.zeros((B, C), np.int32)
        pos = np.full((B, C), -1, np.int32)
        tgt = np.zeros((B, C), np.int32)
        echo_rows = np.zeros(B, bool)
        table = np.zeros((B, self.pages_per_seq), np.int32)
        rows = self._rows([r for r, _, _ in chunks], B)
        for i, (req, start, n) in zip(rows, chunks):
            tokens = req.tokens
            toks[i, :n] = tokens[start:start + n]
            pos[i, :n] = np.arange(start, start + n)
            tgt[i, :n] = tokens[start + 1:start + n + 1]
            table[i] = self._page_row(req)
        echo = [(i, c) for i, c in zip(rows, chunks) if c[0].options.prompt_logprobs is not None
                and c[1] + c[2] <= len(c[0].prompt_ids) - 1]
        echo_rows[[i for i, _ in echo]] = True
        out, self.kv = self._prefill(self.params, self.kv, (toks, pos, tgt, echo_rows, table))
        lp, top_ids, top_lps = jax.device_get(out) if echo else (None, None, None)
        for i, (req, start, n) in echo:
            k = req.options.prompt_logprobs
            if start == 0 and not req.prompt_token_logprobs:
                req.prompt_token_logprobs.append(None)  # the first token has no prefix
                req.prompt_top_logprobs.append(None)
            for j in range(n):
                if len(req.prompt_token_logprobs) < len(req.prompt_ids):
                    req.prompt_token_logprobs.append(float(lp[i, j]))
                    req.prompt_top_logprobs.append(
                        {int(t): float(v) for t, v in zip(top_ids[i, j, :k], top_lps[i, j, :k])})
        for req, _, n in chunks:
            req.num_computed += n
        self.stats["prefill_calls"] += 1
        self.stats["prefill_chunks"] += len(chunks)
        self.stats["max_prefill_rows"] = max(self.stats["max_prefill_rows"], len(chunks))

    def _decode_batch(self, batch: list[Request]) -> None:
        """One decode step of `batch`: shard g's requests fill rows [g * B/D, (g+1) * B/D)."""
        per_shard, need = self._most_per_shard(batch), max(len(r.pages) for r in batch)
        B, P = next((b, p) for b, p in self.decode_buckets
                    if b // self.num_shards >= per_shard and p >= need)
        toks = np.zeros(B, np.int32)
        pos = np.full(B, -1, np.int32)
        table = np.zeros((B, P), np.int32)
        temp, top_k, top_p = np.zeros(B, np.float32), np.zeros(B, np.int32), np.ones(B, np.float32)
        seed, step = np.zeros(B, np.uint32), np.zeros(B, np.int32)
        want_logprobs = np.zeros(B, bool)
        rows = self._rows(batch, B)
        for i, r in zip(rows, batch):
            o = r.options
            toks[i], pos[i], table[i] = r.tokens[-1], r.num_computed, self._page_row(r)[:P]
            temp[i], top_k[i], top_p[i] = o.temperature, o.top_k, o.top_p
            seed[i], step[i] = o.seed % 2**32, len(r.generated)
            want_logprobs[i] = o.logprobs is not None
        sampling = SamplingParams(temp, top_k, top_p, seed, step)
        out, self.kv = self._decode(self.params, self.kv, (toks, pos, table, sampling, want_logprobs))
        out = jax.device_get(out)
        self.stats["decode_steps"] += 1
        self.stats["max_decode_batch"] = max(self.stats["max_decode_batch"], len(batch))
        tokens = out.tokens_B.tolist()
        for i, r in zip(rows, batch):
            r.num_computed += 1
            if r.options.logprobs is None:
                self._append(r, tokens[i], 0.0, {})
            else:
                self._append(r, tokens[i], float(out.logprobs_B[i]), dict(zip(
                    out.top_tokens_BK[i].tolist(), out.top_logprobs_BK[i].tolist())))

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
        shapes = [("prefill", b, c) for b, c in self.prefill_buckets]
        shapes += [("decode", b, p) for b, p in self.decode_buckets]
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(shapes), desc="warm-up (compiling)", unit="shape")
        for kind, n, m in shapes:  # prefill: rows x chunk; decode: rows x pages
            if kind == "prefill":
                z, table = np.zeros((n, m), np.int32), np.zeros((n, self.pages_per_seq), np.int32)
                _, self.kv = self._prefill(self.params, self.kv,
                                           (z, z - 1, z, np.zeros(n, bool), table))
            else:
                z, table = np.zeros(n, np.int32), np.zeros((n, m), np.int32)
                sampling = SamplingParams(np.zeros(n, np.float32), z, np.ones(n, np.float32),
                                          np.zeros(n, np.uint32), z)
                _, self.kv = self._decode(self.params, self.kv,
                                          (z, z - 1, table, sampling, np.zeros(n, bool)))
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
