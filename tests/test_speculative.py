"""Speculative decoding: the ngram proposer; the acceptance rule's output distribution (chi-square
against the target's, and not the draft's), also with a real draft model in the engine; greedy
speculation (ngram and a draft model) in the engine gives the tokens of plain decoding, with stop
strings, max_tokens and log-probs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_engine import _after_warmup, _engine, _mesh_rules, _prompts, setup  # noqa: F401 - the engine fixture
from lmsys.models import llama
from lmsys.serve.draft import DraftModel
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


@pytest.fixture(scope="module")
def draft(setup):
    """A draft model: one layer instead of two, its own random weights, the target's tokenizer."""
    cfg, _, tok, _ = setup
    small = dataclasses.replace(cfg, n_layers=1)
    return DraftModel(jax.device_put(llama.init(jax.random.key(1), small), jax.devices()[0]), small, tok)


def _copy_prompts(n, seed):
    """Prompts that repeat a span, so greedy answers (of a random model) loop and ngram drafts
    get accepted."""
    out = []
    for p in _prompts(n, seed, 6, 14):
        out.append(p + p + p[:3])
    return out


def test_greedy_speculation_gives_the_tokens_of_plain_decoding(setup, draft):
    """16 concurrent requests, batch-invariant mode, ngram and a draft model: the tokens of plain
    decoding with fewer steps, max_tokens, the target's log-probs; stop strings met inside an
    accepted run."""
    prompts = _copy_prompts(16, 40)
    opts = [GenerationOptions(max_tokens=20 + i % 5, logprobs=1 if i % 4 == 0 else None) for i in range(16)]
    runs = []
    for spec in ("none", "ngram", "draft"):
        engine = _engine(setup, batch_invariant=True, speculative=spec, num_speculative_tokens=4,
                         draft=draft if spec == "draft" else None)
        reqs = [engine.add_request(p, o) for p, o in zip(prompts, opts)]
        while engine.has_work():
            engine.step()
        assert engine.pool.num_used == 0
        runs.append((reqs, dict(engine.stats)))
    (plain, plain_stats), *speculated = runs
    for spec, stats in speculated:
        assert [r.generated for r in spec] == [r.generated for r in plain]
        assert all(len(r.generated) == o.max_tokens for r, o in zip(spec, opts))
        for a, b in zip(spec, plain):
            np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, atol=1e-4)
            assert [list(t) for t in a.top_logprobs] == [list(t) for t in b.top_logprobs]
        assert stats["spec_accepted_tokens"] > 0.3 * stats["spec_draft_tokens"] > 0
        assert stats["decode_steps"] < 0.7 * plain_stats["decode_steps"]
        assert stats["generated_tokens"] / stats["decode_rows"] > 1.5
    # the draft model is not the target: some of its drafts are rejected
    assert speculated[1][1]["spec_accepted_tokens"] < speculated[1][1]["spec_draft_tokens"]

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


@pytest.mark.parametrize("spec", ["ngram", "draft"])
def test_speculation_on_a_data_and_tensor_parallel_mesh_matches_one_device(setup, draft, spec):
    """Greedy and seeded sampled rows, 2 data shards x 4 tensor devices: the tokens of the
    single-device engine (the verification and draft calls run per data shard on their own
    pages; the draft model in batch-invariant mode: one shape of each call to compile)."""
    prompts = _copy_prompts(8, 41)
    outs = []
    for rules in (None, _mesh_rules(2, 4)):
        engine = _engine(setup, max_slots=4, speculative=spec, rules=rules, batch_invariant=spec == "draft",
                         draft=draft if spec == "draft" else None)
        reqs = [engine.add_request(p, GenerationOptions(max_tokens=12, temperature=float(i % 2), seed=i))
                for i, p in enumerate(prompts)]
        while engine.has_work():
            engine.step()
        outs.append([r.generated for r in reqs])
        assert engine.stats["spec_accepted_tokens"] > 0 and engine.pool.num_used == 0
    assert outs[1] == outs[0]


@pytest.mark.parametrize("spec", ["ngram", "draft"])
def test_speculation_compiles_only_at_warmup(setup, draft, spec):
    """Verification calls (and a draft model's prefill and draft calls) are compiled per bucket
    by `warmup()`; steps with and without drafts, greedy and sampled, then compile nothing (the
    draft model in batch-invariant mode: one shape of each call, the test's time bounded)."""
    engine = _engine(setup, max_slots=2, max_seq_len=48, speculative=spec, num_speculative_tokens=3,
                     batch_invariant=spec == "draft", draft=draft if spec == "draft" else None)
    with _after_warmup(engine):
        reqs = [engine.add_request(p, GenerationOptions(max_tokens=10, temperature=float(i), seed=i))
                for i, p in enumerate(_copy_prompts(3, 42))]
        while engine.has_work():
            engine.step()
    assert engine.stats["spec_accepted_tokens"] > 0 and all(len(r.generated) == 10 for r in reqs)


def test_a_draft_model_keeps_the_target_distribution(setup, draft):
    """2,000 seeded requests of one prompt through the engine, temperature 0.1 (these random
    models' logits are flat) and top-k 6, two drafts per step from the draft model: the first
    token is distributed as the target's p_0 (chi-square below the p = 0.01 critical value, 5
    degrees of freedom), the second, after the most frequent first, as the target's p_1; the
    first is not distributed as the draft's own q_0 (chi-square above 1000). (The rule itself is
    checked on 20,000 rows above; this checks that the engine hands the verification the very
    distributions its drafts were drawn from.)"""
    cfg, params, _, forward = setup
    n, temperature, top_k = 2_000, 0.1, 6
    prompt = _prompts(1, 44, 6, 7)[0]
    engine = _engine(setup, draft=draft, speculative="draft", num_speculative_tokens=2, batch_invariant=True,
                     max_slots=256, max_seq_len=16, page_size=8, prefill_chunk=8, prefill_tokens=1024)
    reqs = [engine.add_request(prompt, GenerationOptions(max_tokens=3, temperature=temperature, top_k=top_k,
                                                         seed=i)) for i in range(n)]
    while engine.has_work():
        engine.step()
    tokens = np.array([r.generated for r in reqs])
    assert engine.stats["spec_accepted_tokens"] > 0.1 * n and engine.pool.num_used == 0

    def filtered(logits):  # the row's sampling distribution: (its top-k tokens, their probs)
        keep = np.argsort(-logits)[:top_k]
        e = np.exp((logits[keep] - logits[keep].max()) / temperature)
        return keep, e / e.sum()

    def check(counts, keep, probs):
        assert counts[keep].sum() == counts.sum()  # top-k holds
        assert _chi2(counts[keep], probs) < CHI2_001[5]

    keep0, p0 = filtered(forward(params, np.array([prompt]))[-1])
    first = np.bincount(tokens[:, 0], minlength=cfg.vocab_size)
    check(first, keep0, p0)
    mode = int(np.argmax(first))
    check(np.bincount(tokens[tokens[:, 0] == mode, 1], minlength=cfg.vocab_size),
          *filtered(forward(params, np.array([prompt + [mode]]))[-1]))
    small = draft.model
    logits_q = llama.forward(draft.params, jnp.array([prompt]), jnp.arange(len(prompt))[None], cfg=small)[0][0, -1]
    keep_q, q0 = filtered(np.asarray(logits_q))
    q0_V = np.full(cfg.vocab_size, 1e-9)
    q0_V[keep_q] = q0
    assert _chi2(first, q0_V / q0_V.sum()) > 1000


def test_a_draft_model_must_share_the_tokenizer(setup, draft):
    """Another vocabulary size or other tokens: refused, naming the difference."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    cfg, _, tok, _ = setup
    bigger = dataclasses.replace(draft.model, vocab_size=cfg.vocab_size * 2)
    with pytest.raises(ValueError, match="vocabulary has 1024 tokens, the served model's 512"):
        _engine(setup, speculative="draft", draft=draft._replace(model=bigger))
    other = Tokenizer(WordLevel({f"w{i}": i for i in range(cfg.vocab_size)}, unk_token="w0"))
    with pytest.raises(ValueError, match="tokenizer differs from the served model's"):
        _engine(setup, speculative="draft", draft=draft._replace(tokenizer=other))
    with pytest.raises(ValueError, match="speculative='draft' goes with a draft model"):
        _engine(setup, speculative="draft")
