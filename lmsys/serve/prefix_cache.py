"""Automatic prefix caching on the page pool, plain Python (no JAX).

A full page (page_size tokens whose keys/values are all computed) is identified by a hash of
its tokens chained with the hash of everything before it and a cache salt (the model/adapter
version: requests with different salts never share a page). `CachingPagePool` is the
scheduler's `PagePool` plus, per data shard, a map hash -> page, a reference count per cached
page (one per request holding it) and an LRU list of cached pages no request holds: those stay
cached until an allocation finds the shard's free list empty, then the least recently released
is evicted (its hash forgotten) and reused. A page that is not cached (a partly filled one, or a
second copy of a hash already cached) belongs to its one request and goes back to the free list
when released, as without caching.

`num_free_in` counts the free pages plus the evictable ones, so admission, reservations and
preemption see the cache as free space; `num_used` is the pages that requests hold.

The scheduler asks `lookup` for the longest run of cached pages that continues a request's
computed tokens (`page_hashes` of its full pages) and takes them with `acquire`; it offers a
request's newly computed full pages with `register`.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np

from lmsys.serve.scheduler import PagePool, Request


def page_hashes(tokens: list[int], page_size: int, salt: str, start: int = 0,
                prev: bytes | None = None) -> list[bytes]:
    """The chained hashes of the full pages of `tokens` from page `start` (`prev`: the hash of
    page start - 1, None at page 0)."""
    h = prev if prev is not None else hashlib.blake2b(salt.encode(), digest_size=16).digest()
    out = []
    for i in range(start, len(tokens) // page_size):
        page = np.asarray(tokens[i * page_size:(i + 1) * page_size], np.int64).tobytes()
        h = hashlib.blake2b(h + page, digest_size=16).digest()
        out.append(h)
    return out


class CachingPagePool(PagePool):
    def __init__(self, num_pages: int, num_shards: int = 1):
        super().__init__(num_pages, num_shards)
        self.by_hash: list[dict[bytes, int]] = [{} for _ in range(num_shards)]
        self.hash_of: dict[int, bytes] = {}
        self.refs: dict[int, int] = {}  # cached pages: how many requests hold each
        self.idle: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(num_shards)]
        self.evictions = 0

    # ------------------------------------------------------------------ the PagePool interface

    def num_free_in(self, shard: int) -> int:
        return len(self.free_lists[shard]) + len(self.idle[shard])

    @property
    def num_free(self) -> int:
        return sum(self.num_free_in(g) for g in range(self.num_shards))

    @property
    def num_cached(self) -> int:
        return len(self.hash_of)

    def allocate(self, n: int, shard: int = 0) -> list[int]:
        free, idle = self.free_lists[shard], self.idle[shard]
        assert n <= len(free) + len(idle)
        while len(free) < n:  # evict the least recently released cached page
            page, _ = idle.popitem(last=False)
            del self.by_hash[shard][self.hash_of.pop(page)], self.refs[page]
            free.append(page)
            self.evictions += 1
        return [free.popleft() for _ in range(n)]

    def release(self, pages: list[int]) -> None:
        """A request lets go of its pages: cached ones lose a reference (idle at none, the last
        page of the request first in line for eviction), the others are freed."""
        for page in reversed(pages):
            if page not in self.hash_of:
                super().release([page])
                continue
            self.refs[page] -= 1
            if self.refs[page] == 0:
                self.idle[page // self.pages_per_shard][page] = None

    # ------------------------------------------------------------------ caching

    def lookup(self, hashes: list[bytes], shard: int) -> list[int]:
        """The cached pages of shard `shard` for the longest prefix of `hashes`."""
        pages, table = [], self.by_hash[shard]
        for h in hashes:
            page = table.get(h)
            if page is None:
                break
            pages.append(page)
        return pages

    def acquire(self, pages: list[int]) -> None:
        """A request takes cached pages (from `lookup`): one more reference each."""
        for page in pages:
            self.refs[page] += 1
            self.idle[page // self.pages_per_shard].pop(page, None)

    def register(self, page: int, h: bytes) -> bool:
        """Caches a request's computed full page under hash `h` (the request holds it: one
        reference); False if the shard already caches `h` (the page stays the request's own)."""
        shard = page // self.pages_per_shard
        if h in self.by_hash[shard] or page in self.hash_of:
            return False
        self.by_hash[shard][h], self.hash_of[page], self.refs[page] = page, h, 1
        return True

    def clear(self) -> None:
        """Forgets every cached page (the pool's contents were lost, e.g. rebuilt after a failed
        step): idle ones go back to the free lists, held ones are freed when released."""
        for g in range(self.num_shards):
            self.free_lists[g].extend(self.idle[g])
            self.idle[g].clear()
            self.by_hash[g].clear()
        self.hash_of.clear()
        self.refs.clear()


# ---------------------------------------------------------------------- a request's pages


def hashes_for(req: Request, n_pages: int, page_size: int) -> list[bytes]:
    """The request's page hashes, extended to at least its first `n_pages` full pages."""
    if len(req.hashes) < n_pages:
        req.hashes += page_hashes(req.tokens[:n_pages * page_size], page_size, req.options.cache_salt,
                                  start=len(req.hashes), prev=req.hashes[-1] if req.hashes else None)
    return req.hashes


def offer_pages(pool: CachingPagePool, req: Request, page_size: int, upto: int) -> None:
    """Caches the request's full pages below token `upto` (all computed) not offered yet."""
    n = min(upto // page_size, len(req.pages))
    if n > req.num_cached:
        hashes = hashes_for(req, n, page_size)
        for j in range(req.num_cached, n):
            pool.register(req.pages[j], hashes[j])
        req.num_cached = n


def lookup_limit(req: Request, page_size: int) -> int:
    """Pages of the request a cache hit may cover: full pages before its last token (which is
    always computed, for its next-token logits), none if it wants its prompt's log-probs."""
    if req.options.prompt_logprobs is not None:
        return 0
    return (len(req.tokens) - 1) // page_size


def take_hit(pool: CachingPagePool, req: Request, page_size: int, align: int) -> int:
    """Extends the request's computed tokens with the longest cached run of pages that
    continues them, ending on a multiple of `align` tokens; returns the tokens taken."""
    i = len(req.pages)
    limit = lookup_limit(req, page_size)
    if req.num_computed != i * page_size or req.num_cached != i or limit <= i:
        return 0
    pages = pool.lookup(hashes_for(req, limit, page_size)[i:limit], req.shard)
    end = (i + len(pages)) * page_size // align * align
    pages = pages[:max(0, end // page_size - i)]
    pool.acquire(pages)
    req.pages += pages
    req.num_cached = len(req.pages)
    req.num_computed += len(pages) * page_size
    return len(pages) * page_size


def longest_hit_shards(pool: CachingPagePool, req: Request, page_size: int, shards: list[int]) -> list[int]:
    """The shards of `shards` that cache the longest prefix of the request's pages (all of
    `shards` when none caches any): prefix-aware data-parallel routing."""
    n = lookup_limit(req, page_size)
    hashes = hashes_for(req, n, page_size)[:n]
    hit = {g: len(pool.lookup(hashes, g)) for g in shards}
    best = max(hit.values(), default=0)
    return [g for g in shards if hit[g] == best] if best else shards


def claims(reqs: list[Request], page_size: int) -> dict[tuple[int, bytes], Request]:
    """(shard, hash) -> the oldest of `reqs` (given oldest first) that is yet to compute that
    page of its prompt: a newer request that needs the page waits for it rather than computing
    it a second time."""
    out: dict[tuple[int, bytes], Request] = {}
    for req in reqs:
        limit = (len(req.tokens) - 1) // page_size
        first = req.num_computed // page_size
        for h in hashes_for(req, limit, page_size)[first:limit]:
            out.setdefault((req.shard, h), req)
    return out
