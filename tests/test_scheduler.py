"""The serving scheduler alone, without JAX or a model: pages per page_size tokens and all of
them back when requests end, refusal of requests that can never fit, preemption of the newest
request under pool pressure, per-shard pages and admission; it imports no JAX."""

import subprocess
import sys

import pytest

from lmsys.serve.scheduler import GenerationOptions, Request, RequestError, Scheduler


def _request(i: int, prompt_len: int, max_tokens: int) -> Request:
    return Request(i, list(range(1, prompt_len + 1)), GenerationOptions(max_tokens=max_tokens), arrival=float(i))


def _iteration(sched: Scheduler) -> None:
    """What the engine does in one step, with the model calls faked: the planned chunks and
    decodes are computed, each decode samples token 0, a request that has max_tokens ends."""
    sched.admit()
    for req, _, n in sched.plan_prefill():
        req.num_computed += n
    for req in sched.plan_decode():
        req.num_computed += 1
        req.generated.append(0)
        if len(req.generated) >= req.options.max_tokens:
            req.finish_reason = "length"
            sched.finish(req)


def test_pages_follow_page_size_and_all_return():
    sched = Scheduler(num_pages=16, max_slots=4, page_size=4, max_seq_len=32, prefill_chunk=8)
    a, b = _request(0, 10, 5), _request(1, 3, 2)
    sched.add(a)
    sched.add(b)
    _iteration(sched)  # a: first 8 prompt tokens (2 pages); b: 2 prompt tokens, then 1 decode
    assert (a.num_computed, len(a.pages)) == (8, 2)
    assert (b.num_computed, len(b.pages)) == (3, 1)
    _iteration(sched)  # a: its 9th prompt token, then the decode of the 10th; b: its 2nd token, done
    assert (a.num_computed, len(a.pages)) == (10, 3)
    assert b.done and b.pages == [] and sched.pool.num_used == 3
    assert all(len(r.pages) == -(-r.num_computed // 4) for r in sched.running)
    while sched.has_work():
        _iteration(sched)
    assert a.generated == [0] * 5 and b.generated == [0] * 2
    assert sched.pool.num_used == 0 and a.pages == b.pages == []
    assert sched.stats["finished"] == 2 and sched.stats["preemptions"] == 0


def test_a_request_that_can_never_fit_is_refused():
    sched = Scheduler(num_pages=4, max_slots=2, page_size=4, max_seq_len=32, prefill_chunk=8)
    sched.check_fits(10, 6)  # 16 tokens: 4 pages, the whole pool
    with pytest.raises(RequestError, match=r"prompt \(30 tokens\) \+ max_tokens \(8\) = 38 exceeds the "
                                           r"context of 32 tokens"):
        sched.check_fits(30, 8)
    with pytest.raises(RequestError, match="needs 5 KV pages but the pool has 4; lower max_tokens"):
        sched.check_fits(10, 7)
    sharded = Scheduler(num_pages=8, num_shards=2, max_slots=2, page_size=4, max_seq_len=32, prefill_chunk=8)
    with pytest.raises(RequestError, match=r"needs 5 KV pages but the pool has 4 per data shard \(8 over 2"):
        sharded.check_fits(10, 7)


def test_pool_pressure_preempts_the_newest_and_requeues_it_first():
    sched = Scheduler(num_pages=4, max_slots=2, page_size=4, max_seq_len=16, prefill_chunk=8)
    old, new, queued = _request(0, 4, 8), _request(1, 4, 8), _request(2, 4, 8)
    for req in (old, new, queued):
        sched.add(req)
    for _ in range(5):  # both at 8 tokens in the cache: 2 pages each, the whole pool
        _iteration(sched)
    assert sched.running == [old, new] and sched.pool.num_free == 0 and list(sched.waiting) == [queued]
    _iteration(sched)  # old needs a 3rd page for its 9th token: new is preempted
    assert sched.running == [old] and list(sched.waiting) == [new, queued]
    assert (new.pages, new.num_computed, new.preemptions) == ([], 0, 1)
    assert new.generated == [0] * 5  # kept: recomputed from prompt + generated tokens
    assert len(old.pages) == 3 and old.num_computed == 9 and sched.stats["preemptions"] == 1
    while sched.has_work():
        _iteration(sched)
    assert all(r.generated == [0] * 8 for r in (old, new, queued)) and sched.pool.num_used == 0


def test_shards_admit_evenly_and_keep_their_pages():
    sched = Scheduler(num_pages=8, num_shards=2, max_slots=4, page_size=4, max_seq_len=16, prefill_chunk=8)
    reqs = [_request(i, 5, 3) for i in range(5)]
    for req in reqs:
        sched.add(req)
    _iteration(sched)
    assert [r.shard for r in sched.running] == [0, 1, 0, 1] and list(sched.waiting) == [reqs[4]]
    for r in sched.running:
        assert set(r.pages) <= set(sched.pool.shard_range(r.shard))
        assert sched.local_pages(r) == [p - 4 * r.shard for p in r.pages]
    assert sched.rows(sched.running, 4) == [0, 2, 1, 3]  # shard g fills rows [2g, 2g + 2)
    while sched.has_work():
        _iteration(sched)
    assert sched.pool.num_used == 0 and sched.stats["finished"] == 5


def test_importing_the_scheduler_imports_no_jax():
    code = "import sys, lmsys.serve.scheduler; print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
