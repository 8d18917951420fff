"""The engine's scheduler, plain Python (no JAX): requests, the page pool's bookkeeping,
admission, preemption and the plan of each model call.

    sched = Scheduler(num_pages=64, num_shards=1, max_slots=8, page_size=16, max_seq_len=512)
    sched.check_fits(len(prompt_ids), options.max_tokens)     # RequestError if it never can
    sched.add(Request(0, prompt_ids, options))
    sched.admit(); chunks = sched.plan_prefill(); ready = sched.plan_decode()

`lmsys.serve.engine.Engine` runs the model calls this plans and reports back: `num_computed`
(tokens whose keys/values are in the cache) grows as chunks and decode steps run, and a
finished request goes back through `finish`.

## Pages

Pages are allocated on demand (ceil(tokens / page_size) per request), freed when a request ends
or is preempted, and reused. With D data shards (slot groups), shard g owns the page ids
[g * num_pages/D, (g+1) * num_pages/D) (one free list per shard) and max_slots/D slots; a
request admitted into group g gets pages only from shard g's range, and a model call's rows
[g * B/D, (g+1) * B/D) belong to group g, with page ids local to the shard (`local_pages`).
Preemption and refusal work per shard: a request that needs more pages than one shard holds is
refused. With `window` > 0 (a model whose every layer is windowed) the pages wholly before a
request's window are freed as it advances (lmsys.serve.window_pages), so it needs pages for
about one window, not its whole length.

With prefix caching (`prefix_cache=True`, `lmsys.serve.prefix_cache`) the pool is a
`CachingPagePool`: before each chunk, a request takes the longest run of cached pages that
continues its computed tokens (never its last token's page: that token is computed for its
logits; none for prompt log-probs), and its computed full pages are offered to the cache each
iteration and when it releases them. A request whose next page an older running request is
computing waits for it (one iteration per chunk) instead of computing it too. Batch-invariant:
a hit ends on the prefill-chunk grid and only prefilled pages are offered.

## Scheduling

Between model calls the scheduler admits waiting requests into free slots (up to
`max_slots`; into the slot group whose shard caches the longest prefix of the prompt, then the
one with the fewest requests, then the most free pages). Each
iteration then runs one batched prefill call and one decode step. The prefill call takes the
next chunk of several prefilling requests at once, one row each (a prompt of n tokens prefills
its first n-1 in chunks of at most `prefill_chunk`; at most one chunk per request per
iteration): requests are taken oldest first while the call's padded shape, rows per data shard x
chunk bucket, stays within `prefill_tokens` (like vLLM's `max_num_batched_tokens`, per data
shard; the oldest always fits); a request that does not fit waits for the next iteration. With
D data shards each shard fills its own rows, [g * R, (g+1) * R) of a call of D * R rows. The
decode step then runs every request whose next input is a single token (a prompt's last
token, or the token sampled last). So running decodes never wait for more than one prefill
call, of at most `prefill_tokens` tokens per shard, however long the prompts. When a shard runs
out of pages, its newest running request is preempted: its pages are freed and it goes back to
the front of the queue, to be recomputed from its prompt plus the tokens it already generated
(sampling is seeded per token, so the text is unchanged).

Shapes are padded to buckets (prefill: rows x chunk length, powers of two with rows x chunk <=
`prefill_tokens`; decode: batch size x pages per row, powers of two per shard, so a decode step
attends over the pages in use, not the whole context). In batch-invariant mode there is one
bucket of each (decode: the largest; prefill: min(slots per shard, prefill_tokens //
prefill_chunk) rows per shard of `prefill_chunk` tokens), so every call has one shape whatever
runs beside a request, and a request's chunks are always the same slices of its prompt.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from lmsys.serve import window_pages
from lmsys.serve.stops import IncrementalDetokenizer, StopChecker

MAX_TOP_LOGPROBS = 5  # OpenAI's limit for `logprobs` on completions


class RequestError(ValueError):
    """A request the engine can never serve (too long for the context or the page pool, or
    options it cannot represent); `param` names the field at fault, `code` is OpenAI's code."""

    def __init__(self, message: str, param: str = "prompt", code: str = "invalid_value"):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass
class GenerationOptions:
    max_tokens: int = 16  # 0: no new token, only the prompt's log-probs (OpenAI `echo`)
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # top alternatives per generated token (0..5); None = no logprobs
    prompt_logprobs: int | None = None  # the same for prompt tokens (OpenAI `echo`)
    grammar: str | None = None  # structured output (lmsys.serve.constrained); None = free
    skip_special_tokens: bool = True  # False: the text keeps special tokens (Mistral's tool calls)
    adapter: str = ""  # the LoRA adapter (lmsys.serve.lora) the request runs with; "" = the base
    # prefix caching: requests share cached KV pages only with the same salt (set it to the
    # model/adapter version, or per user to keep their caches apart)
    cache_salt: str = ""


@dataclass
class Event:
    """What one step produced for a request: new text, its tokens, and whether it finished."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[dict[int, float]]
    # "stop" | "length" | "abort" when finished; "error" when this request alone failed on the
    # host (its stop strings, detokenizing or callback raised): it is dropped, the others go on
    finish_reason: str | None = None


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
    prompt_greedy: list[bool | None] = field(default_factory=list)  # the prompt token is the argmax
    finish_reason: str | None = None
    preemptions: int = 0
    first_token_time: float | None = None
    detok: IncrementalDetokenizer | None = None
    stops: StopChecker | None = None
    matcher: object = None  # the grammar's parser state (lmsys.serve.constrained) or None
    # prefix caching: the chained hashes of its full pages so far, how many of its leading
    # pages are cached (taken from the cache or offered to it), and its prefilled tokens
    hashes: list[bytes] = field(default_factory=list)
    num_cached: int = 0
    prefill_len: int = 0

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

    def release(self, pages: list[int | None]) -> None:
        for page in pages:
            if page is not None:  # None: freed already (lmsys.serve.window_pages)
                self.free_lists[page // self.pages_per_shard].append(page)


class Scheduler:
    """The waiting queue, the running requests (at most `max_slots`, max_slots/D per data
    shard), their pages, and the shape buckets of the model calls. Not thread-safe: the engine
    calls it under its lock."""

    def __init__(self, num_pages: int, num_shards: int = 1, *, max_slots: int = 8, page_size: int = 16,
                 max_seq_len: int = 512, prefill_chunk: int = 64, prefill_tokens: int = 0,
                 batch_invariant: bool = False, fine_widths: bool = False,
                 shard_axes: tuple[str, ...] = (), prefix_cache: bool = True, window: int = 0):
        if max_seq_len % page_size:
            raise ValueError(f"max_seq_len {max_seq_len} must be a multiple of page_size {page_size}")
        self.page_size, self.max_seq_len, self.prefill_chunk = page_size, max_seq_len, prefill_chunk
        self.window = window  # > 0: pages before every request's window are recycled
        # pages freed behind a window and pages shared by the prefix cache do not mix: a model
        # whose every layer is windowed is served without the prefix cache
        prefix_cache = prefix_cache and not window
        self.pages_per_seq = max_seq_len // page_size
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.prefill_tokens = prefill_tokens or 4 * prefill_chunk
        if self.prefill_tokens < prefill_chunk:
            raise ValueError(
                f"prefill_tokens {prefill_tokens} is below prefill_chunk {prefill_chunk}: a "
                f"prefill call must hold at least one full chunk; use prefill_tokens >= "
                f"{prefill_chunk} (or 0 for 4 * prefill_chunk)")
        D = self.num_shards = num_shards
        if max_slots % D:
            raise ValueError(
                f"max_slots {max_slots} must be a multiple of the data-parallel size {D} (mesh "
                f"axes {', '.join(shard_axes)}): each data shard serves max_slots/{D} slots; "
                f"use max_slots={-(-max_slots // D) * D}")
        self.slots_per_shard = max_slots // D
        if prefix_cache:
            from lmsys.serve.prefix_cache import CachingPagePool

            self.pool = CachingPagePool(num_pages, D)
        else:
            self.pool = PagePool(num_pages, D)
        self.prefix_cache, self.batch_invariant = prefix_cache, batch_invariant
        # a cache hit ends on a page boundary; batch-invariant: also on the chunk grid, so the
        # rest of the prompt is prefilled in the same slices as without the cache
        self.hit_align = math.lcm(page_size, prefill_chunk) if batch_invariant else page_size
        # prefill buckets: (rows of all shards, chunk length); decode: (rows of all shards, pages)
        if batch_invariant:
            rows = min(self.slots_per_shard, self.prefill_tokens // prefill_chunk)
            self.prefill_buckets = [(D * rows, prefill_chunk)]
            self.decode_buckets = [(max_slots, self.pages_per_seq)]
        else:
            chunks = [b for b in _buckets(prefill_chunk) if b >= min(8, prefill_chunk)]
            if fine_widths:  # also 1.5x each power of two: less padding, more compiled shapes
                chunks = sorted(chunks + [3 * b // 2 for b in chunks if 3 * b // 2 < prefill_chunk
                                          and b >= 8 and b & (b - 1) == 0])
            rows = _buckets(min(self.slots_per_shard, self.prefill_tokens // chunks[0]))
            self.prefill_buckets = [(D * r, n) for r in rows for n in chunks
                                    if r * n <= self.prefill_tokens]
            self.decode_buckets = [(D * b, p) for b in _buckets(self.slots_per_shard)
                                   for p in _buckets(self.pages_per_seq)]
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.stats = {"decode_steps": 0, "decode_rows": 0, "prefill_calls": 0, "prefill_chunks": 0,
                      "max_prefill_rows": 0, "max_decode_batch": 0, "preemptions": 0,
                      "generated_tokens": 0, "finished": 0, "failed": 0,
                      "max_waiting": 0, "prefilled_tokens": 0, "prefix_cache_hit_tokens": 0,
                      "prefix_cache_query_tokens": 0, "spec_draft_tokens": 0,
                      "spec_accepted_tokens": 0}

    # ------------------------------------------------------------------ requests

    def check_fits(self, prompt_len: int, max_tokens: int) -> None:
        """Raises RequestError if a request of `prompt_len` + `max_tokens` tokens can never run:
        longer than the context, or more pages than one shard holds."""
        total = prompt_len + max_tokens
        if total > self.max_seq_len:
            raise RequestError(
                f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = {total} "
                f"exceeds the context of {self.max_seq_len} tokens; shorten the prompt or "
                f"lower max_tokens", code="context_length_exceeded")
        need = math.ceil(total / self.page_size)
        if self.window:
            need = window_pages.live_pages(total, self.window, self.page_size, self.prefill_chunk)
        if need > self.pool.pages_per_shard:
            per_shard = "" if self.num_shards == 1 else (
                f" per data shard ({self.pool.num_pages} over {self.num_shards} shards)")
            raise RequestError(
                f"the request needs {need} KV pages but the pool "
                f"has {self.pool.pages_per_shard}{per_shard}; lower max_tokens or give the server "
                f"more pages", code="context_length_exceeded")

    def add(self, req: Request) -> None:
        """Queues a request (checked with `check_fits`)."""
        self.waiting.append(req)
        self.stats["max_waiting"] = max(self.stats["max_waiting"], len(self.waiting))

    def abort(self, req: Request) -> None:
        """Drops a request from the queue or its slot now and frees its pages."""
        if req in self.waiting:
            self.waiting.remove(req)
        if req in self.running:
            self.running.remove(req)
        self._release(req)
        if not req.done:
            req.finish_reason = "abort"

    def finish(self, req: Request) -> None:
        """Frees the slot and pages of a request that has just finished."""
        self.running.remove(req)
        self._release(req)
        self.stats["finished"] += 1

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ pages

    def _pages_for(self, req: Request, num_tokens: int) -> int:
        return max(0, math.ceil(num_tokens / self.page_size) - len(req.pages))

    def _offer(self, req: Request) -> None:
        """Offers the request's computed full pages to the prefix cache (batch-invariant: only
        the prefilled ones, whose numbers do not depend on how they were computed)."""
        if self.prefix_cache:
            from lmsys.serve.prefix_cache import offer_pages

            upto = min(req.num_computed, req.prefill_len) if self.batch_invariant else req.num_computed
            offer_pages(self.pool, req, self.page_size, upto)

    def _release(self, req: Request) -> None:
        self._offer(req)
        self.pool.release(req.pages)
        req.pages, req.num_cached = [], 0

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._release(req)
        req.num_computed = 0
        req.preemptions += 1
        self.stats["preemptions"] += 1
        self.waiting.appendleft(req)

    def _reserve(self, req: Request, num_tokens: int) -> bool:
        """Gives `req` pages of its shard for `num_tokens`, preempting newer requests of the
        shard if it is short; False if even that is not enough (then `req` waits; if it is the
        newest, it is preempted itself)."""
        if self.window:
            self.pool.release(window_pages.free_before_window(
                req.pages, req.num_computed, self.window, self.page_size))
        need = self._pages_for(req, num_tokens)
        while need > self.pool.num_free_in(req.shard):
            newer = [r for r in self.running if r.shard == req.shard and (
                r.arrival > req.arrival or (r.arrival == req.arrival and r.id > req.id))]
            if not newer:
                return False
            self._preempt(max(newer, key=lambda r: (r.arrival, r.id)))
        req.pages += self.pool.allocate(need, req.shard)
        return True

    def local_pages(self, req: Request) -> list[int]:
        """The request's pages as ids local to its shard (the start of its page table row)."""
        first = self.pool.shard_range(req.shard).start
        return [page - first for page in window_pages.table_row(req.pages)]

    # ------------------------------------------------------------------ one iteration's plan

    def admit(self) -> None:
        """Moves waiting requests into free slots: each into the slot group whose shard caches
        the longest prefix of its prompt (prefix caching), then the one with the fewest running
        requests, then the most free pages."""
        load = [0] * self.num_shards
        for r in self.running:
            load[r.shard] += 1
        while self.waiting:
            open_ = [g for g in range(self.num_shards) if load[g] < self.slots_per_shard]
            if not open_:
                return
            if self.prefix_cache and len(open_) > 1:  # to the shard caching most of its prompt
                from lmsys.serve.prefix_cache import longest_hit_shards

                open_ = longest_hit_shards(self.pool, self.waiting[0], self.page_size, open_)
            g = min(open_, key=lambda g: (load[g], -self.pool.num_free_in(g), g))
            req = self.waiting.popleft()
            req.shard, load[g] = g, load[g] + 1
            req.prefill_len = len(req.tokens) - 1
            self.stats["prefix_cache_query_tokens"] += len(req.tokens) * self.prefix_cache
            self.running.append(req)

    def prefill_bucket(self, rows: int, width: int) -> tuple[int, int] | None:
        """The cheapest prefill bucket with `rows` rows per data shard of `width` tokens, or
        None if every such shape exceeds `prefill_tokens`."""
        fits = [b for b in self.prefill_buckets if b[0] >= self.num_shards * rows and b[1] >= width]
        return min(fits, key=lambda b: (b[0] * b[1], b[0]), default=None)

    def plan_prefill(self) -> list[tuple[Request, int, int]]:
        """This iteration's prefill chunks, (request, start, length): the running requests still
        prefilling, oldest first, each with its next chunk while the call still fits a bucket;
        each one's pages are reserved (which may preempt newer requests of its shard)."""
        chunks, rows, width = [], [0] * self.num_shards, 0
        order = sorted(self.running, key=lambda r: (r.arrival, r.id))
        if self.prefix_cache:
            from lmsys.serve import prefix_cache as pc

            for req in order:
                self._offer(req)
            claimed = pc.claims([r for r in order if len(r.tokens) - 1 > r.num_computed], self.page_size)
        for req in order:
            if self.prefix_cache and req in self.running:
                self.stats["prefix_cache_hit_tokens"] += pc.take_hit(self.pool, req, self.page_size,
                                                                      self.hit_align)
                i = req.num_computed // self.page_size
                if i < pc.lookup_limit(req, self.page_size) and claimed.get(
                        (req.shard, req.hashes[i]), req) is not req:
                    continue  # an older request is computing its next page: take it from the cache
            left = len(req.tokens) - 1 - req.num_computed
            if left < 1 or req not in self.running:  # decoding, or preempted just now
                continue
            n = min(self.prefill_chunk, left)
            if self.prefill_bucket(max(max(rows), rows[req.shard] + 1), max(width, n)) is None:
                continue
            if self._reserve(req, req.num_computed + n):
                chunks.append((req, req.num_computed, n))
                self.stats["prefilled_tokens"] += n
                rows[req.shard] += 1
                width = max(width, n)
        return chunks

    def decoding(self) -> list[Request]:
        """The running requests whose next input is one token, oldest first."""
        return sorted((r for r in self.running if len(r.tokens) - r.num_computed == 1),
                      key=lambda r: (r.arrival, r.id))

    def plan_decode(self, drafts: Callable[[Request], int] = lambda r: 0) -> list[Request]:
        """This iteration's decode batch: the `decoding` requests, each with pages for its
        token and its `drafts(r)` drafted ones (speculative decoding; a reservation may preempt
        newer requests)."""
        ready = [r for r in self.decoding()
                 if r in self.running and self._reserve(r, r.num_computed + 1 + drafts(r))]
        return [r for r in ready if r in self.running]  # a later reservation may preempt

    def _most_per_shard(self, reqs: list[Request]) -> int:
        return max(sum(r.shard == g for r in reqs) for g in range(self.num_shards))

    def prefill_shape(self, chunks: list[tuple[Request, int, int]]) -> tuple[int, int]:
        """(rows, chunk length) of the prefill call that runs `chunks` (from `plan_prefill`)."""
        return self.prefill_bucket(self._most_per_shard([r for r, _, _ in chunks]),
                                   max(n for _, _, n in chunks))

    def decode_shape(self, batch: list[Request]) -> tuple[int, int]:
        """(rows, pages per row) of the decode call that runs `batch` (from `plan_decode`)."""
        per_shard, need = self._most_per_shard(batch), max(len(r.pages) for r in batch)
        return next((b, p) for b, p in self.decode_buckets
                    if b // self.num_shards >= per_shard and p >= need)

    def rows(self, reqs: list[Request], B: int) -> list[int]:
        """Each request's row in a call of B rows: shard g's fill [g * B/D, (g+1) * B/D) in turn."""
        used, rows = [0] * self.num_shards, []
        for r in reqs:
            rows.append(r.shard * (B // self.num_shards) + used[r.shard])
            used[r.shard] += 1
        return rows
