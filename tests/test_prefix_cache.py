"""Automatic prefix caching: the scheduler alone with a fake model whose "KV cache" records which
(salt, token) each slot of each page holds, so a page shared wrongly or freed while in use
shows up as a wrong slot; then the engine's outputs with and without the cache."""

import numpy as np
import pytest

from test_engine import _check_greedy, _engine, _prompts, setup  # noqa: F401 - the engine fixture
from lmsys.serve.prefix_cache import CachingPagePool, page_hashes
from lmsys.serve.scheduler import GenerationOptions, Request, Scheduler


class FakeModel:
    """Runs a scheduler's plans: writes (salt, token) into each computed slot, checks that every
    computed position of a running request reads back its own (salt, token), samples a token
    from the request's own random stream."""

    def __init__(self, sched: Scheduler):
        self.sched, self.kv = sched, {}

    def write(self, req, start, n):
        ps = self.sched.page_size
        for p in range(start, start + n):
            self.kv[req.pages[p // ps], p % ps] = (req.options.cache_salt, req.tokens[p])

    def check(self):
        ps = self.sched.page_size
        for req in self.sched.running:
            assert len(req.pages) >= -(-req.num_computed // ps)
            for p in range(req.num_computed):
                assert self.kv[req.pages[p // ps], p % ps] == (req.options.cache_salt, req.tokens[p]), (req.id, p)

    def iteration(self):
        sched = self.sched
        sched.admit()
        for req, start, n in sched.plan_prefill():
            self.write(req, start, n)
            req.num_computed += n
        self.check()
        for req in sched.plan_decode():
            self.write(req, req.num_computed, 1)
            req.num_computed += 1
            req.generated.append(int(np.random.default_rng([req.id, len(req.generated)]).integers(1, 50)))
            if len(req.generated) >= req.options.max_tokens:
                req.finish_reason = "length"
                sched.finish(req)
        self.check()
        pool = sched.pool
        held = [p for r in sched.running for p in r.pages]
        assert pool.num_used == len(set(held))  # a shared page counts once
        for page, refs in pool.refs.items():  # each cached page: one reference per holder
            assert refs == held.count(page), page
        assert all(pool.refs[p] == 0 for g in range(pool.num_shards) for p in pool.idle[g])


@pytest.mark.parametrize("num_shards, batch_invariant", [(1, False), (2, False), (1, True)],
                         ids=["1-shard", "2-shards", "batch-invariant"])
def test_200_random_requests_with_shared_prefixes_never_leak_or_mix_pages(num_shards, batch_invariant):
    rng = np.random.default_rng(num_shards + 2 * batch_invariant)
    sched = Scheduler(num_pages=16 * num_shards, num_shards=num_shards, max_slots=4 * num_shards, page_size=4,
                      max_seq_len=64, prefill_chunk=8, batch_invariant=batch_invariant)
    model = FakeModel(sched)
    prefixes = [list(map(int, rng.integers(1, 50, int(rng.integers(4, 30))))) for _ in range(5)]
    reqs = []
    for i in range(200):
        prompt = prefixes[rng.integers(5)][:int(rng.integers(1, 31))] + list(map(int, rng.integers(1, 50, int(rng.integers(0, 6)))))
        opts = GenerationOptions(max_tokens=int(rng.integers(1, 12)), cache_salt=str(rng.integers(2)),
                                 prompt_logprobs=1 if i % 23 == 0 else None)
        reqs.append(Request(i, prompt or [1], opts, arrival=float(i)))
        sched.add(reqs[-1])
        if i % 13 == 0:  # a client that goes away: from the queue, mid-prefill or mid-decode
            sched.abort(reqs[rng.integers(len(reqs))])
        if i % 3 == 0:
            model.iteration()
    while sched.has_work():
        model.iteration()
    assert all(r.done and r.pages == [] for r in reqs)
    pool = sched.pool
    assert pool.num_used == 0 and pool.num_free == pool.num_pages  # nothing leaked
    assert all(refs == 0 for refs in pool.refs.values()) and pool.num_cached > 0
    assert sched.stats["preemptions"] > 0 and pool.evictions > 0
    hit, asked = sched.stats["prefix_cache_hit_tokens"], sched.stats["prefix_cache_query_tokens"]
    assert 0.1 < hit / asked < 1  # many prompts share a prefix with an earlier one
    assert sum(r.finish_reason == "abort" for r in reqs) > 0


def test_a_shared_prompt_is_prefilled_once_and_salts_never_share():
    sched = Scheduler(num_pages=64, max_slots=8, page_size=4, max_seq_len=64, prefill_chunk=8)
    model = FakeModel(sched)
    prefix = list(range(1, 22))  # 21 tokens: 5 full pages
    reqs = [Request(i, prefix + [30 + i, 40 + i], GenerationOptions(max_tokens=3, cache_salt="a" if i < 6 else "b"),
                    arrival=float(i)) for i in range(8)]
    for r in reqs:  # all arrive at once: the newer ones wait for the oldest's pages of each salt
        sched.add(r)
    while sched.has_work():
        model.iteration()
    # per salt: the prefix once (the oldest prefills 22 tokens), the others their last 2
    assert sched.stats["prefilled_tokens"] == 22 + 5 * 2 + 22 + 1 * 2
    assert sched.stats["prefix_cache_hit_tokens"] == 6 * 20
    # a request whose whole prompt is cached still computes its last token (for its logits)
    again = Request(8, prefix + [30, 40], GenerationOptions(max_tokens=2, cache_salt="a"), arrival=8.0)
    sched.add(again)
    model.iteration()
    assert again.generated and sched.stats["prefix_cache_hit_tokens"] == 6 * 20 + 20
    assert sched.stats["prefilled_tokens"] == 22 + 10 + 22 + 2 + 2  # tokens 20 and 21 of 23
    salted = [page_hashes(prefix, 4, salt) for salt in ("a", "b")]
    assert not set(salted[0]) & set(salted[1])
    assert page_hashes(prefix, 4, "a")[1:] == page_hashes(prefix, 4, "a", start=1, prev=salted[0][0])


def test_data_parallel_admission_goes_to_the_shard_caching_the_prompt():
    """2 data shards, prefix A cached on shard 0 and B on shard 1: 16 requests sharing B, one
    arriving per iteration, all go to shard 1 and take B from its cache (the load rule alone
    would send some to the idler shard 0, which would compute B again); 16 sharing A arriving at
    once fill shard 0's 8 slots with cache hits, and the other 8 go to shard 1, which computes A
    once for them."""
    sched = Scheduler(num_pages=128, num_shards=2, max_slots=16, page_size=4, max_seq_len=64, prefill_chunk=8)
    model = FakeModel(sched)
    a, b = list(range(1, 22)), list(range(100, 121))  # 21 tokens each: 5 full pages before the last
    warm = [Request(i, p, GenerationOptions(max_tokens=1), arrival=float(i)) for i, p in enumerate((a, b))]
    for r in warm:  # the load rule: a to shard 0, b to shard 1
        sched.add(r)
    while sched.has_work():
        model.iteration()
    assert [r.shard for r in warm] == [0, 1]
    stats0 = dict(sched.stats)
    reqs = [Request(10 + i, b + [200 + i, 300 + i], GenerationOptions(max_tokens=3), arrival=10.0 + i)
            for i in range(16)]
    busy = 0  # requests running at once (on shard 1, while shard 0 idles)
    for r in reqs:
        sched.add(r)
        model.iteration()
        busy = max(busy, len(sched.running))
    while sched.has_work():
        model.iteration()
    assert busy > 1 and [r.shard for r in reqs] == [1] * 16
    assert sched.stats["prefix_cache_hit_tokens"] - stats0["prefix_cache_hit_tokens"] == 16 * 20
    assert sched.stats["prefilled_tokens"] - stats0["prefilled_tokens"] == 16 * 2  # tokens 20, 21 of each

    stats0 = dict(sched.stats)
    reqs = [Request(30 + i, a + [200 + i, 300 + i], GenerationOptions(max_tokens=3), arrival=30.0)
            for i in range(16)]
    for r in reqs:
        sched.add(r)
    while sched.has_work():
        model.iteration()
    assert [r.shard for r in reqs] == [0] * 8 + [1] * 8
    # shard 0: 8 hits; shard 1: A computed once (its 20 tokens), then 7 hits
    assert sched.stats["prefix_cache_hit_tokens"] - stats0["prefix_cache_hit_tokens"] == 15 * 20
    assert sched.stats["prefilled_tokens"] - stats0["prefilled_tokens"] == 20 + 16 * 2


def test_idle_cached_pages_are_evicted_least_recently_released_first():
    pool = CachingPagePool(num_pages=4)
    a, b = pool.allocate(2), pool.allocate(2)
    for page, h in zip(a + b, (b"a0", b"a1", b"b0", b"b1")):
        assert pool.register(page, h)
    assert not pool.register(pool.allocate(0) or a[0], b"a0")  # already cached
    pool.release(a)  # a's last page first in line, then its first
    pool.release(b)
    assert pool.num_free == 4 and pool.num_used == 0 and pool.num_cached == 4
    assert pool.lookup([b"b0", b"b1", b"x"], 0) == b
    pool.acquire([b[0]])  # held again: not evictable
    assert pool.num_free == 3
    assert pool.allocate(1) == [a[1]] and pool.lookup([b"a0", b"a1"], 0) == [a[0]]
    assert pool.allocate(2) == [a[0], b[1]] and pool.num_cached == 1 and pool.num_free == 0
    pool.release([b[0]])
    pool.clear()
    assert pool.num_cached == 0 and pool.num_free == 1


def test_16_requests_sharing_a_prefix_give_the_same_numbers_with_the_cache(setup):
    """Batch-invariant mode: bit for bit the tokens and log-probs of the uncached engine (greedy
    and sampled rows), with the shared prefix prefilled once; the default mode: the greedy
    reference (near-tie rule)."""
    prefix, suffixes = _prompts(1, 30, 48, 49)[0], _prompts(16, 31, 1, 12)
    prompts = [prefix + s for s in suffixes]
    opts = [GenerationOptions(max_tokens=8, logprobs=1, temperature=float(i % 2), seed=i) for i in range(16)]
    runs = []
    for cache in (False, True):
        engine = _engine(setup, batch_invariant=True, prefix_cache=cache)
        reqs = [engine.add_request(p, o) for p, o in zip(prompts, opts)]
        while engine.has_work():
            engine.step()
        runs.append(([(r.generated, r.token_logprobs) for r in reqs], dict(engine.stats)))
        assert engine.pool.num_used == 0
    (uncached, plain), (cached, stats) = runs
    assert cached == uncached
    assert plain["prefilled_tokens"] == sum(len(p) - 1 for p in prompts)
    assert plain["prefix_cache_hit_tokens"] == 0 and plain["prefix_cache_pages"] == 0
    # the prefix once (48 tokens, on the chunk grid), then each request's suffix but its last token
    assert stats["prefilled_tokens"] == 48 + sum(len(s) - 1 for s in suffixes[1:]) + len(suffixes[0]) - 1
    assert stats["prefix_cache_hit_tokens"] == 15 * 48 and stats["prefix_cache_pages"] >= 6

    engine = _engine(setup)  # the default mode (chunks of other shapes): the greedy reference
    reqs = engine.generate(prompts, GenerationOptions(max_tokens=8))
    assert engine.stats["prefix_cache_hit_tokens"] >= 15 * 48
    assert sum(not _check_greedy(setup, r, 8) for r in reqs) <= 1


def test_cache_salt_over_http_keeps_caches_apart(setup):
    """`cache_salt` (vLLM's field) on completions and chat: a prompt sent again with the same salt
    takes its cached pages, with another salt (or none) it is computed again; an empty or
    non-string salt is a 400 naming the field."""
    import httpx

    from lmsys.serve.server import BackgroundServer, create_app

    engine = _engine(setup, max_slots=4, page_size=8, max_seq_len=64, batch_invariant=True)  # one shape
    prompt = _prompts(1, 32, 40, 41)[0]  # 40 tokens: 4 full pages before the last token
    messages = [{"role": "user", "content": "def return import class self value None for in if " * 2}]
    with BackgroundServer(create_app(engine, "tiny", engine.tokenizer)) as server:
        def hits(path, body):
            before = engine.stats["prefix_cache_hit_tokens"]
            r = httpx.post(f"{server.url}/v1/{path}", json={"model": "tiny", "max_tokens": 2, **body}, timeout=60)
            assert r.status_code == 200, r.text
            return engine.stats["prefix_cache_hit_tokens"] - before

        for path, body in (("completions", {"prompt": prompt}), ("chat/completions", {"messages": messages})):
            assert hits(path, {**body, "cache_salt": "alice"}) == 0
            assert hits(path, {**body, "cache_salt": "alice"}) >= 32  # its full pages
            assert hits(path, {**body, "cache_salt": "bob"}) == 0
            assert hits(path, body) == 0  # no salt: apart from both
            assert hits(path, {**body, "cache_salt": "bob"}) >= 32
        for bad in ("", 7):
            r = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": prompt, "cache_salt": bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt", r.text
