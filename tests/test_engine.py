"""The serving engine: paged KV cache, continuous batching, chunked and batched prefill,
preemption, bounded compilation, data- and tensor-parallel serving — each checked against a
full-recompute greedy reference or the single-device engine."""

import contextlib
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import tiny_config, write_corpus
from lmsys.data import load_tokenizer
from lmsys.models import llama
from lmsys.models.attention import _cached_attention
from lmsys.parallel import Rules, build_mesh
from lmsys.serve.constrained import all_allowed
from lmsys.serve.engine import Engine, EngineConfig
from lmsys.serve.sampling import SamplingParams
from lmsys.serve.scheduler import GenerationOptions, RequestError

VOCAB = 512


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    tok = load_tokenizer("builtin", VOCAB, source=write_corpus(root / "corpus"), cache_dir=str(root))
    cfg = tiny_config(model={"vocab_size": VOCAB}).model
    params = llama.init(jax.random.key(0), cfg)
    fwd = jax.jit(lambda p, t: llama.forward(p, t, jnp.arange(t.shape[1])[None], cfg=cfg)[0][0])

    def forward(p, tokens):
        """Logits of one sequence, padded at the end to one shape (causal: padding changes
        nothing before it), so the reference compiles once; padded and cut in numpy (jnp.pad and
        slicing would compile a program per length)."""
        n = tokens.shape[1]
        return np.asarray(fwd(p, np.pad(np.asarray(tokens), ((0, 0), (0, 96 - n)))))[:n]

    return cfg, params, tok, forward


def _engine(setup, model=None, **kw):
    cfg, params, tok, _ = setup
    config = dict(max_slots=16, page_size=8, max_seq_len=96, prefill_chunk=16)
    config.update(kw)
    rules, draft = config.pop("rules", None), config.pop("draft", None)
    return Engine(params, model or cfg, tok, EngineConfig(**config), rules=rules, draft=draft)


def _check_greedy(setup, req, n_tokens):
    """Tokens equal a full recompute, or differ first at a near-tie (top-2 gap < 1e-4): then
    the comparison stops there. Returns False for such an early stop."""
    _, params, _, forward = setup
    seq = list(req.prompt_ids)
    for i in range(n_tokens):
        logits = np.asarray(forward(params, jnp.array([seq])))[-1]
        want = int(np.argmax(logits))
        if req.generated[i] != want:
            top2 = np.sort(logits)[-2:]
            assert top2[1] - top2[0] < 1e-4, (req.id, i, req.generated[i], want)
            return False
        seq.append(want)
    return True


def _prompts(n, seed, lo=1, hi=60):
    rng = np.random.default_rng(seed)
    return [list(map(int, rng.integers(2, VOCAB, int(rng.integers(lo, hi))))) for _ in range(n)]


def test_single_request_matches_reference(setup):
    engine = _engine(setup)
    [req] = engine.generate([_prompts(1, 0)[0]], GenerationOptions(max_tokens=12))
    assert req.finish_reason == "length" and len(req.generated) == 12
    assert _check_greedy(setup, req, 12)
    assert engine.pool.num_used == 0


def _decode_rows(n, pages):
    """The inputs of one decode call of `n` padding rows (to trace or lower it)."""
    z = np.zeros(n, np.int32)
    sampling = SamplingParams(np.zeros(n, np.float32), z, np.ones(n, np.float32), np.zeros(n, np.uint32), z)
    return (z, z - 1, np.zeros((n, pages), np.int32), sampling, np.zeros(n, bool), all_allowed(n, VOCAB),
            z)  # z: LoRA slots


def _run_staggered(engine, prompts, max_tokens, each_step=lambda: None):
    """A new request every other step, then steps to the end; `each_step` after every step."""
    reqs = []
    for p in prompts:
        reqs.append(engine.add_request(p, GenerationOptions(max_tokens=max_tokens)))
        for _ in range(2):
            engine.step()
            each_step()
    while engine.has_work():
        engine.step()
        each_step()
    return reqs


@contextlib.contextmanager
def _after_warmup(engine):
    """`warmup()` compiles every bucket (decode and, with speculation, verification and the draft
    model's calls); nothing is traced or compiled inside the block."""
    P, D = len(engine.prefill_buckets), len(engine.decode_buckets)
    # speculation adds a verification call per decode bucket; a draft model, its prefill and draft calls
    extra = {"none": 0, "ngram": D, "draft": P + 2 * D}[engine.cfg.speculative]
    assert engine.warmup(progress=False) == P + D + extra
    compiles = []

    def on_event(event, _secs, **_):
        if event.endswith("jaxpr_trace_duration"):
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        yield
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)
    assert compiles == []


def _run_staggered_after_warmup(engine, prompts, max_tokens):
    with _after_warmup(engine):
        return _run_staggered(engine, prompts, max_tokens)


def test_16_staggered_requests_batch_and_match_reference(setup):
    engine = _engine(setup)
    reqs = _run_staggered_after_warmup(engine, _prompts(16, 1), 10)
    assert engine.stats["max_decode_batch"] > 1
    early = sum(not _check_greedy(setup, r, 10) for r in reqs)
    assert early <= 1
    assert engine.pool.num_used == 0


def test_long_prompts_are_prefilled_in_chunks_while_others_decode(setup):
    engine = _engine(setup, prefill_chunk=8)  # at most 4 rows x 8 tokens per prefill call
    short = engine.add_request(_prompts(1, 2, 3, 4)[0], GenerationOptions(max_tokens=40))
    for _ in range(3):
        engine.step()
    longs = [engine.add_request(p, GenerationOptions(max_tokens=4)) for p in _prompts(2, 3, 66, 71)]
    overlapped = 0
    while any(r.num_computed < len(r.prompt_ids) - 1 for r in longs):
        before = ([r.num_computed for r in longs], len(short.generated), engine.stats["prefill_calls"])
        engine.step()
        # one prefill call per step, at most one chunk per request, and `short` decodes
        assert engine.stats["prefill_calls"] == before[2] + 1
        assert all(0 <= r.num_computed - n <= 8 for r, n in zip(longs, before[0]))
        assert len(short.generated) == before[1] + 1
        overlapped += all(r.num_computed > n for r, n in zip(longs, before[0]))
    assert overlapped >= 8  # 65+ prompt tokens in chunks of 8, both prompts in each call
    assert engine.stats["max_prefill_rows"] == 2
    while engine.has_work():
        engine.step()
    assert sum(_check_greedy(setup, r, n) for r, n in [(short, 40), *((r, 4) for r in longs)]) >= 2
    assert engine.pool.num_used == 0


def test_prefill_batches_several_requests_in_one_call(setup):
    engine = _engine(setup)  # prefill_chunk 16, prefill_tokens 0 -> 4 * 16 = 64 per call
    assert engine.prefill_buckets == [(1, 8), (1, 16), (2, 8), (2, 16), (4, 8), (4, 16), (8, 8)]
    with _after_warmup(engine):
        # 8 prompts of 2-9 tokens: one call of 8 rows x 8, then their first decode step
        short = [engine.add_request(p, GenerationOptions(max_tokens=6)) for p in _prompts(8, 14, 2, 10)]
        engine.step()
        assert engine.stats["prefill_calls"] == 1 and engine.stats["max_prefill_rows"] == 8
        assert all(len(r.generated) == 1 for r in short)
        # 5 prompts of 30-39 tokens: 4 rows x 16 fill the budget; the newest waits its turn
        long = [engine.add_request(p, GenerationOptions(max_tokens=6)) for p in _prompts(5, 15, 30, 40)]
        engine.step()
        assert engine.stats["prefill_calls"] == 2 and engine.stats["prefill_chunks"] == 12
        assert [r.num_computed for r in long] == [16, 16, 16, 16, 0]
        while engine.has_work():
            engine.step()
    assert engine.stats["max_prefill_rows"] == 8
    assert sum(not _check_greedy(setup, r, 6) for r in short + long) <= 1
    assert engine.pool.num_used == 0


def test_prefill_token_budget_is_checked(setup):
    with pytest.raises(ValueError, match="prefill_tokens 8 is below prefill_chunk 16.*prefill_tokens >= 16"):
        _engine(setup, prefill_tokens=8)
    engine = _engine(setup, prefill_tokens=16)  # one full chunk per call, or two of <= 8
    assert engine.prefill_buckets == [(1, 8), (1, 16), (2, 8)]
    a = engine.add_request(_prompts(1, 16, 20, 21)[0], GenerationOptions(max_tokens=4))
    b = engine.add_request(_prompts(1, 19, 5, 6)[0], GenerationOptions(max_tokens=4))
    engine.step()  # a's first 16 tokens fill the call; b waits
    assert (a.num_computed, b.num_computed, engine.stats["prefill_chunks"]) == (16, 0, 1)
    engine.step()  # a's last 3 and b's 4 share a call of 2 rows x 8, then both decode
    assert (a.num_computed, b.num_computed, engine.stats["prefill_calls"]) == (20, 5, 2)
    assert len(a.generated) == len(b.generated) == 1
    assert engine.stats["max_prefill_rows"] == 2
    while engine.has_work():
        engine.step()
    assert _check_greedy(setup, a, 4) + _check_greedy(setup, b, 4) >= 1


def test_batch_invariant_mode_gives_each_request_the_numbers_it_gets_alone(setup):
    engine = _engine(setup, max_slots=8, batch_invariant=True)
    assert engine.prefill_buckets == [(4, 16)] and engine.decode_buckets == [(8, 12)]
    prompts = _prompts(6, 20, 2, 40)
    opts = [GenerationOptions(max_tokens=8, logprobs=1, temperature=float(i % 2), seed=i) for i in range(6)]
    alone = [engine.generate([p], o)[0] for p, o in zip(prompts, opts)]
    assert engine.stats["max_prefill_rows"] == 1
    together = [engine.add_request(p, o) for p, o in zip(prompts, opts)]
    while engine.has_work():
        engine.step()
    assert engine.stats["max_prefill_rows"] == 4 and engine.stats["max_decode_batch"] == 6
    numbers = [(r.generated, r.token_logprobs) for r in together]
    assert numbers == [(r.generated, r.token_logprobs) for r in alone]  # bit for bit


def test_small_pool_preempts_and_still_serves_everyone(setup):
    # 8 slots x 96 tokens would need 96 pages; 14 pages force preemption.
    engine = _engine(setup, max_slots=8, num_pages=14)
    reqs = [engine.add_request(p, GenerationOptions(max_tokens=24)) for p in _prompts(8, 4, 20, 40)]
    while engine.has_work():
        engine.step()
        assert engine.pool.num_used == sum(len(r.pages) for r in engine.running)
    assert engine.stats["preemptions"] > 0 and any(r.preemptions for r in reqs)
    assert all(r.finish_reason == "length" and len(r.generated) == 24 for r in reqs)
    assert sum(not _check_greedy(setup, r, 24) for r in reqs) <= 1
    assert engine.pool.num_used == 0


@pytest.mark.parametrize("mesh, n", [(None, 200), ((2, 4), 100)], ids=["1-device", "data2-tensor4"])
def test_random_requests_never_leak_a_page(setup, mesh, n):
    rules = None if mesh is None else _mesh_rules(*mesh)
    engine = _engine(setup, max_slots=8, num_pages=24, rules=rules)
    rng = np.random.default_rng(5)
    reqs = []
    for i, p in enumerate(_prompts(n, 6, 1, 40)):
        opts = GenerationOptions(max_tokens=int(rng.integers(1, 20)), temperature=float(rng.choice([0, 1])),
                                 top_k=int(rng.integers(0, 5)), seed=i, stop=("e",) if i % 3 == 0 else ())
        reqs.append(engine.add_request(p, opts))
        if i % 4 == 0:
            engine.step()
        if i % 17 == 0:
            engine.abort(reqs[rng.integers(len(reqs))])  # clients that go away
    while engine.has_work():
        engine.step()
        assert engine.pool.num_used == sum(len(r.pages) for r in engine.running)
        assert all(set(r.pages) <= set(engine.pool.shard_range(r.shard)) for r in engine.running)
    assert engine.pool.num_used == 0 and engine.pool.num_free == 24
    assert all(r.done for r in reqs)
    if rules is not None:
        assert engine.stats["preemptions"] > 0  # 12 pages per shard run out


def test_requests_that_can_never_fit_are_refused(setup):
    engine = _engine(setup, num_pages=4)
    with pytest.raises(RequestError, match="exceeds the context of 96 tokens"):
        engine.add_request(list(range(90)), GenerationOptions(max_tokens=10))
    with pytest.raises(RequestError, match="needs 5 KV pages but the pool has 4"):
        engine.add_request(list(range(30)), GenerationOptions(max_tokens=10))
    with pytest.raises(RequestError, match="prompt is empty"):
        engine.add_request([], GenerationOptions())


def _mesh_rules(data, tensor, **axes):
    return Rules(build_mesh(tiny_config({"data": data, "fsdp": 1, "tensor": tensor, **axes}).mesh))


# with fsdp or sequence beside tensor: meshes whose vocabulary-sharded logits once aborted the
# partitioner inside the data shard_map
@pytest.mark.parametrize("data, tensor, axes", [(2, 4, {}), (4, 2, {}), (2, 2, {"fsdp": 2}),
                                                (2, 2, {"sequence": 2})],
                         ids=["data2-tensor4", "data4-tensor2", "data2-fsdp2-tensor2",
                              "data2-sequence2-tensor2"])
def test_data_parallel_serving_matches_single_device(setup, data, tensor, axes):
    cfg = setup[0]
    prompts = _prompts(3 * data, 7, 1, 40)
    single = _run_staggered(_engine(setup, max_slots=2 * data), prompts, 8)

    # 2 slots per data shard; 8 * data - 1 pages round up to 8 per shard (a request needs <= 6)
    engine = _engine(setup, max_slots=2 * data, num_pages=8 * data - 1,
                     rules=_mesh_rules(data, tensor, **axes))
    pages = 8 * data
    assert engine.num_pages == engine.pool.num_pages == pages and engine.num_shards == data
    assert engine.kv[0].sharding.spec == jax.sharding.PartitionSpec(None, "data", None, "tensor")
    assert engine.params["layers"]["wq"].sharding.spec[2] == "tensor"  # heads
    local = (cfg.n_layers, pages // data, 8, cfg.n_kv_heads // tensor, cfg.head_dim)
    assert all(s.data.shape == local for a in engine.kv for s in a.addressable_shards)

    busy = set()

    def pages_stay_in_their_shard():
        for r in engine.running:
            assert set(r.pages) <= set(engine.pool.shard_range(r.shard)), (r.shard, r.pages)
            assert len(r.pages) <= engine.pool.pages_per_shard
            busy.add(r.shard)
        for g in range(data):  # per-shard bookkeeping: used pages are exactly the requests'
            held = sum(len(r.pages) for r in engine.running if r.shard == g)
            assert engine.pool.num_free_in(g) == engine.pool.pages_per_shard - held

    reqs = _run_staggered(engine, prompts, 8, pages_stay_in_their_shard)
    assert busy == set(range(data))  # every data shard served requests
    assert [r.generated for r in reqs] == [r.generated for r in single]
    assert engine.pool.num_used == 0


def test_data_parallel_compiles_only_at_warmup(setup):
    engine = _engine(setup, max_slots=4, max_seq_len=32, rules=_mesh_rules(2, 4))
    assert engine.decode_buckets == [(2, 1), (2, 2), (2, 4), (4, 1), (4, 2), (4, 4)]
    assert engine.prefill_buckets == [(2, 8), (2, 16), (4, 8), (4, 16)]  # 1-2 rows per shard
    with _after_warmup(engine):
        reqs = _run_staggered(engine, _prompts(6, 11, 1, 20), 8)
        # 4 requests at once: each shard prefills its 2 in one call
        burst = [engine.add_request(p, GenerationOptions(max_tokens=8)) for p in _prompts(4, 17, 10, 17)]
        engine.step()
        assert engine.stats["max_prefill_rows"] == 4
        assert sorted(r.shard for r in burst) == [0, 0, 1, 1]
        assert all(r.num_computed >= len(r.prompt_ids) - 1 for r in burst)
        while engine.has_work():
            engine.step()
    assert engine.stats["max_decode_batch"] == 4
    assert sum(not _check_greedy(setup, r, 8) for r in reqs + burst) <= 1

    # every collective of a decode step stays inside one data shard (devices 0-3 or 4-7 of the
    # mesh): tensor-parallel reductions only, no device reads another shard's pages or rows
    hlo = engine._decode.lower(engine.params, engine.kv, _decode_rows(4, 4)).compile().as_text()
    groups = re.findall(r"replica_groups=(\{\{[\d,{}]*\}\}|\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?)", hlo)
    assert len(groups) > 0  # tensor-parallel all-reduces
    for g in groups:
        if g.startswith("{"):
            ids = [list(map(int, grp.split(","))) for grp in re.findall(r"\{([\d,]+)\}", g)]
        else:  # iota form [groups, size]<=[dims]T(perm)
            shape, dims, perm = re.fullmatch(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", g).groups()
            dims = [int(d) for d in dims.split(",")]
            iota = np.arange(np.prod(dims)).reshape(dims)
            if perm:
                iota = iota.transpose([int(p) for p in perm.split(",")])
            ids = iota.reshape([int(d) for d in shape.split(",")]).tolist()
        assert all(len({i // 4 for i in grp}) == 1 for grp in ids), g


def test_data_parallel_pool_is_checked_per_shard(setup):
    rules = _mesh_rules(2, 4)
    with pytest.raises(ValueError, match=r"max_slots 3 must be a multiple of the data-parallel size 2 .*max_slots=4"):
        _engine(setup, max_slots=3, rules=rules)
    engine = _engine(setup, max_slots=2, num_pages=7, rules=rules)  # 8 pages, 4 per shard
    with pytest.raises(RequestError, match=r"needs 5 KV pages but the pool has 4 per data shard \(8 over 2"):
        engine.add_request(list(range(30)), GenerationOptions(max_tokens=10))
    # two requests of 4 pages each: one per shard, so neither waits for the other
    reqs = [engine.add_request(p, GenerationOptions(max_tokens=10)) for p in _prompts(2, 12, 20, 21)]
    engine.step()
    assert sorted(r.shard for r in reqs) == [0, 1] and engine.stats["prefill_chunks"] == 2
    assert engine.stats["prefill_calls"] == 1  # row 0 on shard 0, row 1 on shard 1
    while engine.has_work():
        engine.step()
    assert engine.stats["preemptions"] == 0 and engine.pool.num_used == 0
    assert all(len(r.generated) == 10 for r in reqs)


def test_sampling_options(setup):
    _, params, tok, forward = setup
    engine = _engine(setup)
    prompt = _prompts(1, 8, 10, 11)[0]
    sampled = dict(max_tokens=16, temperature=1.0, top_p=0.9, seed=123)
    a = engine.generate([prompt], GenerationOptions(**sampled))[0]
    b = engine.generate([prompt], GenerationOptions(**sampled))[0]
    c = engine.generate([prompt], GenerationOptions(**{**sampled, "seed": 124}))[0]
    assert a.generated == b.generated and a.generated != c.generated

    # logprobs of generated tokens and of the prompt (echo) equal the model's log-softmax, also
    # when the prefill call holds a row without echo (the call then computes the log-probs too)
    calls = engine.stats["prefill_calls"]
    plain = engine.add_request(_prompts(1, 18, 10, 11)[0], GenerationOptions(max_tokens=3))
    req = engine.add_request(prompt, GenerationOptions(max_tokens=3, logprobs=2, prompt_logprobs=2))
    while engine.has_work():
        engine.step()
    assert engine.stats["prefill_calls"] == calls + 1 and plain.prompt_token_logprobs == []
    logp = np.asarray(jax.nn.log_softmax(forward(params, jnp.array([prompt + req.generated]))))
    assert req.prompt_token_logprobs[0] is None and len(req.prompt_token_logprobs) == len(prompt)
    for i in range(1, len(prompt)):
        assert req.prompt_token_logprobs[i] == pytest.approx(logp[i - 1, prompt[i]], abs=1e-4)
    for i, t in enumerate(req.generated):
        pos = len(prompt) - 1 + i
        assert req.token_logprobs[i] == pytest.approx(logp[pos, t], abs=1e-4)
        assert list(req.top_logprobs[i]) == list(np.argsort(-logp[pos])[:2])

    # a stop string ends the text before it; the finish reason says so
    free = engine.generate([prompt], GenerationOptions(max_tokens=30))[0]
    stop = free.text[5:8]
    assert stop and stop in free.text
    stopped = engine.generate([prompt], GenerationOptions(max_tokens=30, stop=(stop,)))[0]
    assert stopped.finish_reason == "stop" and stopped.text == free.text[:free.text.index(stop)]
    # a stop token id ends generation without being part of the output
    token = free.generated[4]
    by_token = engine.generate([prompt], GenerationOptions(max_tokens=30, stop_token_ids=(token,)))[0]
    assert by_token.finish_reason == "stop" and by_token.generated == free.generated[:free.generated.index(token) + 1]


@pytest.mark.parametrize("mode, qtype, tol", [("int8", jnp.int8, 0.02), ("fp8", jnp.float8_e4m3fn, 0.1)])
def test_weight_only_quantization_stores_low_precision_weights(setup, mode, qtype, tol):
    cfg, params, _, forward = setup
    engine = _engine(setup, quantize=mode)
    for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
        assert engine.params["layers"][name].qvalue.dtype == qtype
    assert engine.params["embed"].dtype == jnp.float32  # embeddings stay exact
    tokens = jnp.array([_prompts(1, 9, 30, 31)[0]])
    exact = forward(params, tokens)
    quantized = jax.jit(lambda p, t: llama.forward(p, t, jnp.arange(t.shape[1])[None], cfg=cfg)[0][0])(
        engine.params, tokens)
    rel = float(jnp.linalg.norm(quantized - exact) / jnp.linalg.norm(exact))
    assert 0 < rel < tol, rel
    [req] = engine.generate([tokens[0].tolist()], GenerationOptions(max_tokens=6))
    assert len(req.generated) == 6


@pytest.mark.parametrize("mesh", [None, (2, 4)], ids=["1-device", "data2-tensor4"])
def test_pallas_attention_serves_the_same_tokens_as_xla(setup, mesh):
    """`attention_impl="pallas"`: decode steps run the paged-attention kernel (interpreted on
    CPU; on a mesh inside the engine's data shard_map) and give the greedy tokens of the XLA
    path."""
    prompts = _prompts(2, 13, 5, 12)
    xla = _engine(setup, max_slots=2).generate(prompts, GenerationOptions(max_tokens=5))
    engine = _engine(setup, dataclasses.replace(setup[0], attention_impl="pallas"), max_slots=2,
                     rules=None if mesh is None else _mesh_rules(*mesh))
    reqs = engine.generate(prompts, GenerationOptions(max_tokens=5))
    assert [r.generated for r in reqs] == [r.generated for r in xla]
    jaxpr = jax.make_jaxpr(engine._decode)(engine.params, engine.kv, _decode_rows(2, 1))
    assert "pallas_call" in str(jaxpr)


def _pool_and_queries(cfg, B, P, page_size, T, seed):
    rng = np.random.default_rng(seed)
    K, H, N = cfg.n_kv_heads, cfg.head_dim, cfg.n_heads
    pool = tuple(jnp.asarray(rng.standard_normal((cfg.n_layers, B * P, page_size, K, H)), jnp.float32)
                 for _ in range(2))
    table = jnp.asarray(rng.permutation(B * P).reshape(B, P), jnp.int32)
    q, k, v = (jnp.asarray(rng.standard_normal((B, T, n, H)), jnp.float32) for n in (N, K, K))
    return pool, table, q, k, v


def _reference_cached_attention(q, k, v, pool, layer, table, positions):
    """The paged pool written, then every row's pages gathered into one dense sequence for
    `attention` (the one path before the CPU decode and first-chunk ones)."""
    from lmsys.kernels import attention

    (kp, vp), (B, P), S = pool, table.shape, pool[0].shape[2]
    page = jnp.where(positions >= 0, jnp.take_along_axis(table, jnp.clip(positions // S, 0, P - 1), 1),
                     kp.shape[1])
    kp = kp.at[layer, page, positions % S].set(k, mode="drop")
    vp = vp.at[layer, page, positions % S].set(v, mode="drop")
    dense = [x[layer, table].reshape(B, P * S, *x.shape[3:]) for x in (kp, vp)]
    out = attention(q, *dense, q_positions_BT=positions, kv_positions_BS=jnp.arange(P * S)[None],
                    causal=True, impl="xla")
    return out, (kp, vp)


@pytest.mark.parametrize("n_kv_heads", [4, 8, 1])
def test_cpu_decode_attention_equals_dense_attention_over_gathered_pages(setup, n_kv_heads):
    """The XLA:CPU decode step (pages gathered in the pool layout, block-diagonal query) gives
    the numbers of dense attention over the gathered pages, grouped heads included; a padding
    row (position -1) writes nothing."""
    cfg = dataclasses.replace(setup[0], n_kv_heads=n_kv_heads)
    pool, table, q, k, v = _pool_and_queries(cfg, B=5, P=3, page_size=4, T=1, seed=n_kv_heads)
    positions = jnp.asarray([[0], [5], [11], [-1], [7]], jnp.int32)
    for layer in range(cfg.n_layers):
        want, want_kv = _reference_cached_attention(q, k, v, pool, layer, table, positions)
        got, got_kv = jax.jit(_cached_attention, static_argnums=7)(
            q, k, v, pool, layer, table, positions, "xla")
        live = [0, 1, 2, 4]
        np.testing.assert_allclose(np.asarray(got)[live], np.asarray(want)[live], rtol=1e-5, atol=1e-6)
        for a, b in zip(got_kv, want_kv):
            np.testing.assert_array_equal(a, b)


def test_first_prefill_chunks_attend_over_their_own_keys(setup):
    """A row that starts its sequence attends over the call's own keys (a call of only such
    rows reads no pages), a row with a later chunk (start > 0) over its pages: both give the
    numbers of attending over the gathered pages."""
    cfg = setup[0]
    pool, table, q, k, v = _pool_and_queries(cfg, B=3, P=4, page_size=4, T=6, seed=0)
    first = jnp.asarray([list(range(6)), [0, 1, 2, -1, -1, -1], [-1] * 6], jnp.int32)
    later = first.at[1].set(jnp.asarray([7, 8, 9, -1, -1, -1]))
    run = jax.jit(_cached_attention, static_argnums=7)
    for positions, rows in ((first, [0]), (first, [1]), (later, [0, 1])):
        want, want_kv = _reference_cached_attention(q, k, v, pool, 1, table, positions)
        got, got_kv = run(q, k, v, pool, 1, table, positions, "xla")
        live = np.asarray(positions)[rows] >= 0
        np.testing.assert_allclose(np.asarray(got)[rows][live], np.asarray(want)[rows][live],
                                   rtol=1e-5, atol=1e-6)
        for a, b in zip(got_kv, want_kv):
            np.testing.assert_array_equal(a, b)


def test_set_params_serves_new_weights_without_recompiling(setup):
    """An RL update or a registry swap hands the engine new weights from another placement (a
    training mesh): the engine serves them exactly as an engine built on them, compiles nothing,
    and never reuses prefix pages computed by the old weights."""
    cfg, params, tok, _ = setup
    new = llama.init(jax.random.key(1), cfg)
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(8), ("fsdp",))
    on_trainer = jax.tree.map(  # the embedding split over 8 devices, the rest replicated
        lambda x: jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
            "fsdp" if x.shape[0] % 8 == 0 else None))), new)
    prompts = _prompts(3, 5, 17, 30)
    opts = GenerationOptions(max_tokens=6, logprobs=0)
    out = lambda reqs: [(r.generated, np.round(r.token_logprobs, 5).tolist()) for r in reqs]  # noqa: E731
    engine = _engine(setup, max_slots=4, max_seq_len=48)
    before = out(engine.generate(prompts, opts))
    hits = engine.stats["prefix_cache_hit_tokens"]
    with _after_warmup(engine):
        engine.set_params(on_trainer)
        after = out(engine.generate(prompts, opts))
    assert engine.stats["prefix_cache_hit_tokens"] == hits  # the old weights' pages: not reused
    want = out(_engine(setup, max_slots=4, max_seq_len=48).generate(prompts, opts))
    assert before == want  # the reference engine is built on the old params ...
    fresh = Engine(new, cfg, tok, EngineConfig(max_slots=4, page_size=8, max_seq_len=48, prefill_chunk=16))
    assert after == out(fresh.generate(prompts, opts)) != before  # ... this one on the new
    bad = jax.tree.map(lambda x: x, new)
    bad["embed"] = bad["embed"][:, :8]
    with pytest.raises(ValueError, match=r"\['embed'\] is float32\[512, 8\]"):
        engine.set_params(bad)
