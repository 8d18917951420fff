"""The serving engine: paged KV cache, continuous batching, chunked prefill, preemption, bounded
compilation, sharded serving — each checked against a full-recompute greedy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import tiny_config, write_corpus
from lmsys.data import load_tokenizer
from lmsys.models import llama
from lmsys.parallel import Rules, build_mesh
from lmsys.serve.engine import Engine, EngineConfig, GenerationOptions, RequestError

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
        nothing before it), so the reference compiles once."""
        n = tokens.shape[1]
        return fwd(p, jnp.pad(tokens, ((0, 0), (0, 96 - n))))[:n]

    return cfg, params, tok, forward


def _engine(setup, **kw):
    cfg, params, tok, _ = setup
    config = dict(max_slots=16, page_size=8, max_seq_len=96, prefill_chunk=16)
    config.update(kw)
    rules = config.pop("rules", None)
    return Engine(params, cfg, tok, EngineConfig(**config), rules=rules)


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


def test_16_staggered_requests_batch_and_match_reference(setup):
    engine = _engine(setup)
    assert engine.warmup(progress=False) == len(engine.prefill_buckets) + len(engine.decode_buckets)
    compiles = []

    def on_event(event, _secs, **_):
        if event.endswith("jaxpr_trace_duration"):
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        reqs = []
        for p in _prompts(16, 1):  # a new request arrives every other step
            reqs.append(engine.add_request(p, GenerationOptions(max_tokens=10)))
            engine.step()
            engine.step()
        while engine.has_work():
            engine.step()
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)
    assert compiles == []  # nothing traced or compiled after warm-up
    assert engine.stats["max_decode_batch"] > 1
    early = sum(not _check_greedy(setup, r, 10) for r in reqs)
    assert early <= 1
    assert engine.pool.num_used == 0


def test_long_prompt_is_prefilled_in_chunks_while_others_decode(setup):
    engine = _engine(setup, prefill_chunk=8)
    short = engine.add_request(_prompts(1, 2, 3, 4)[0], GenerationOptions(max_tokens=40))
    for _ in range(3):
        engine.step()
    long = engine.add_request(_prompts(1, 3, 70, 71)[0], GenerationOptions(max_tokens=4))
    overlapped = 0
    while long.num_computed < len(long.prompt_ids) - 1:
        before = (long.num_computed, len(short.generated))
        engine.step()
        overlapped += long.num_computed > before[0] and len(short.generated) > before[1]
    assert overlapped >= 8  # 69 prompt tokens in chunks of 8, each step also decoding `short`
    while engine.has_work():
        engine.step()
    assert _check_greedy(setup, long, 4) + _check_greedy(setup, short, 40) >= 1
    assert engine.pool.num_used == 0


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


def test_200_random_requests_never_leak_a_page(setup):
    engine = _engine(setup, max_slots=8, num_pages=24)
    rng = np.random.default_rng(5)
    reqs = []
    for i, p in enumerate(_prompts(200, 6, 1, 40)):
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
    assert engine.pool.num_used == 0 and engine.pool.num_free == 24
    assert all(r.done for r in reqs)


def test_requests_that_can_never_fit_are_refused(setup):
    engine = _engine(setup, num_pages=4)
    with pytest.raises(RequestError, match="exceeds the context of 96 tokens"):
        engine.add_request(list(range(90)), GenerationOptions(max_tokens=10))
    with pytest.raises(RequestError, match="needs 5 KV pages but the pool has 4"):
        engine.add_request(list(range(30)), GenerationOptions(max_tokens=10))
    with pytest.raises(RequestError, match="prompt is empty"):
        engine.add_request([], GenerationOptions())


def test_sharded_serving_matches_single_device(setup):
    rules = Rules(build_mesh(tiny_config({"data": 2, "fsdp": 1, "tensor": 4}).mesh))
    engine = _engine(setup, max_slots=4, rules=rules)
    assert engine.kv[0].sharding.spec == jax.sharding.PartitionSpec(None, None, None, "tensor")
    assert engine.params["layers"]["wq"].sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor")
    reqs = engine.generate(_prompts(4, 7), GenerationOptions(max_tokens=8))
    assert sum(not _check_greedy(setup, r, 8) for r in reqs) <= 1


def test_sampling_options(setup):
    _, params, tok, forward = setup
    engine = _engine(setup)
    prompt = _prompts(1, 8, 10, 11)[0]
    sampled = dict(max_tokens=16, temperature=1.0, top_p=0.9, seed=123)
    a = engine.generate([prompt], GenerationOptions(**sampled))[0]
    b = engine.generate([prompt], GenerationOptions(**sampled))[0]
    c = engine.generate([prompt], GenerationOptions(**{**sampled, "seed": 124}))[0]
    assert a.generated == b.generated and a.generated != c.generated

    # logprobs of generated tokens and of the prompt (echo) equal the model's log-softmax
    req = engine.generate([prompt], GenerationOptions(max_tokens=3, logprobs=2, prompt_logprobs=2))[0]
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
