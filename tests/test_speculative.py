"""Speculative decoding: the ngram proposer; the acceptance rule's output distribution (chi-square
against the target's, and not the draft's); greedy speculation in the engine gives the tokens of
plain decoding, with stop strings, max_tokens and log-probs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_engine import _after_warmup, _engine, _mesh_rules, _prompts, setup  # noqa: F401 - the engine fixture
from lmsys.serve.sampling import sampling_params
from lmsys.serve.scheduler import GenerationOptions
from lmsys.serve.speculative import accept_drafts, propose_ngram

# chi-square critical values at p = 0.01 (the test fails when the statistic exceeds them)
CHI2_001 = {4: 13.277, 5: 15.086, 7: 18.475}


def test_ngram_proposes_what_followed_the_latest_earlier_occurrence():
    seq = [5, 6, 7, 8, 9, 1, 6, 7, 3, 4, 2, 6, 7]
    assert propose_ngram(seq, 3) == [3, 4, 2]  # "6 7" last seen before at 6..7, then 3 4 2
    assert propose_ngram(seq + [8], 2) == [9, 1]  # "6 7 8" matches the 3-gram at 1..3
    assert propose_ngram([1, 2, 3], 4) == [] and propose_ngram([4, 4], 4) == [4]
    assert propose_ngram(seq, 0) == [] and propose_ngram([1, 2, 1], 5) == [2, 1]
    # in a loop, the latest occurrence with k tokens after it (not the one just before the end)
    assert propose_ngram([9, 4, 4, 4, 4, 4, 4], 3) == [4, 4, 4]
    assert propose_ngram([9, 4, 4, 4, 4, 4, 4], 5) == [4, 4, 4]  # none has 5: the first


def _chi2(counts, probs):
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("draft", ["ngram", "sampled"])
def test_sampled_rows_keep_the_target_distribution(draft):
    """20,000 rows (seeds), V = 8, temperature 0.7 and top-k 6, two drafts: the first emitted
    token is distributed as the target's p_0 (chi-square below the p = 0.01 critical value,
    5 degrees of freedom), the second (where the first draft was accepted) as p_1; and not as
    the draft distribution q."""
    n, V, K = 20_000, 8, 2
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.5, (K + 1, V)).astype(np.float32)
    scaled = logits / 0.7
    keep = np.argsort(-scaled, axis=1)[:, :6]
    p = np.zeros_like(scaled)
    for t in range(K + 1):
        e = np.exp(scaled[t, keep[t]] - scaled[t, keep[t]].max())
        p[t, keep[t]] = e / e.sum()
    if draft == "ngram":  # a point mass at fixed drafts: a likely token, then an unlikely one
        q = None
        drafts = np.tile([keep[0, 1], keep[1, 4]], (n, 1))
    else:  # drafts drawn from a draft model's distribution q
        q_row = rng.dirichlet(np.ones(V), K).astype(np.float32)
        drafts = np.stack([rng.choice(V, n, p=q_row[j] / q_row[j].sum()) for j in range(K)], 1)
        q = jnp.broadcast_to(q_row, (n, K, V))
    sampling = sampling_params(temperature=[0.7] * n, top_k=6, seed=np.arange(n), step=3)
    a, tokens = jax.jit(accept_drafts)(jnp.broadcast_to(logits, (n, K + 1, V)), jnp.asarray(drafts, jnp.int32),
                                       jnp.full(n, K, jnp.int32), sampling, q)
    a, tokens = np.asarray(a), np.asarray(tokens)
    first = np.bincount(tokens[:, 0], minlength=V)
    assert set(np.flatnonzero(first)) <= set(keep[0])  # top-k holds
    assert _chi2(first[keep[0]], p[0, keep[0]]) < CHI2_001[5]
    second = np.bincount(tokens[a >= 1, 1], minlength=V)
    assert (a >= 1).sum() > 2000 and _chi2(second[keep[1]], p[1, keep[1]]) < CHI2_001[5]
    assert np.all(tokens[np.arange(n)[:, None], np.arange(K)][a == K] == drafts[a == K])
    if q is not None:  # the draft's own distribution is rejected at any reasonable threshold
        q0 = np.asarray(q_row[0]) / q_row[0].sum()
        assert _chi2(first, np.maximum(q0, 1e-9)) > 1000
    else:  # a point mass is accepted with probability p(d), else p without d
        assert abs((a >= 1).mean() - p[0, drafts[0, 0]]) < 0.02


def _copy_prompts(n, seed):
    """Prompts that repeat a span, so greedy answers (of a random model) loop and ngram drafts
    get accepted."""
    out = []
    for p in _prompts(n, seed, 6, 14):
        out.append(p + p + p[:3])
    return out


def test_greedy_speculation_gives_the_tokens_of_plain_decoding(setup):
    """16 concurrent requests, batch-invariant mode: the tokens of plain decoding with fewer
    steps, max_tokens, the target's log-probs; stop strings met inside an accepted run."""
    prompts = _copy_prompts(16, 40)
    opts = [GenerationOptions(max_tokens=20 + i % 5, logprobs=1 if i % 4 == 0 else None) for i in range(16)]
    runs = []
    for spec in ("none", "ngram"):
        engine = _engine(setup, batch_invariant=True, speculative=spec, num_speculative_tokens=4)
        reqs = [engine.add_request(p, o) for p, o in zip(prompts, opts)]
        while engine.has_work():
            engine.step()
        assert engine.pool.num_used == 0
        runs.append((reqs, dict(engine.stats)))
    (plain, plain_stats), (spec, stats) = runs
    assert [r.generated for r in spec] == [r.generated for r in plain]
    assert all(len(r.generated) == o.max_tokens for r, o in zip(spec, opts))
    for a, b in zip(spec, plain):
        np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, atol=1e-4)
        assert [list(t) for t in a.top_logprobs] == [list(t) for t in b.top_logprobs]
    assert stats["spec_accepted_tokens"] > 0.3 * stats["spec_draft_tokens"] > 0
    assert stats["decode_steps"] < 0.7 * plain_stats["decode_steps"]
    assert stats["generated_tokens"] / stats["decode_rows"] > 1.5

    # a stop string completed inside a run of accepted drafts ends the text there, as without
    # speculation
    texts = [(p, r.text) for p, r in zip(prompts, plain) if len(r.text) >= 9]
    assert len(texts) >= 3
    prompts = [p for p, _ in texts]
    stops = [GenerationOptions(max_tokens=24, stop=(t[len(t) // 3:len(t) // 3 + 3],)) for _, t in texts]
    ends = []
    for spec in ("none", "ngram"):
        engine = _engine(setup, speculative=spec)
        reqs = [engine.add_request(p, o) for p, o in zip(prompts, stops)]
        while engine.has_work():
            engine.step()
        ends.append([(r.finish_reason, r.text, r.generated) for r in reqs])
    assert ends[1] == ends[0] and all(e[0] == "stop" for e in ends[1])
    assert engine.stats["spec_accepted_tokens"] > 0


def test_speculation_on_a_data_and_tensor_parallel_mesh_matches_one_device(setup):
    """Greedy and seeded sampled rows, 2 data shards x 4 tensor devices: the tokens of the
    single-device engine (the verification call runs per data shard on its own pages)."""
    prompts = _copy_prompts(8, 41)
    outs = []
    for rules in (None, _mesh_rules(2, 4)):
        engine = _engine(setup, max_slots=4, speculative="ngram", rules=rules)
        reqs = [engine.add_request(p, GenerationOptions(max_tokens=12, temperature=float(i % 2), seed=i))
                for i, p in enumerate(prompts)]
        while engine.has_work():
            engine.step()
        outs.append([r.generated for r in reqs])
        assert engine.stats["spec_accepted_tokens"] > 0 and engine.pool.num_used == 0
    assert outs[1] == outs[0]


def test_speculation_compiles_only_at_warmup(setup):
    """Verification calls are compiled per decode bucket by `warmup()`; steps with and without
    drafts, greedy and sampled, then compile nothing."""
    engine = _engine(setup, max_slots=2, max_seq_len=48, speculative="ngram", num_speculative_tokens=3)
    with _after_warmup(engine):
        reqs = [engine.add_request(p, GenerationOptions(max_tokens=10, temperature=float(i), seed=i))
                for i, p in enumerate(_copy_prompts(3, 42))]
        while engine.has_work():
            engine.step()
    assert engine.stats["spec_accepted_tokens"] > 0 and all(len(r.generated) == 10 for r in reqs)
