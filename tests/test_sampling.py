"""Sampling (per-row params, seeds, logprobs), incremental detokenization and stop handling."""

import numpy as np
import pytest

from lmsys.data import load_tokenizer
from lmsys.serve.sampling import next_token_logprobs, sample, sampling_params
from lmsys.serve.stops import IncrementalDetokenizer, StopChecker

LOGITS_V = np.array([2.0, 1.0, 0.5, -1.0], np.float32)


def _random_logits(batch, vocab, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, vocab)).astype(np.float32) * 3


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _draw(logits_V, n, **kwargs):
    """n draws from one distribution, one row per seed, vectorized in a single call."""
    logits_BV = np.broadcast_to(logits_V, (n, len(logits_V)))
    params = sampling_params(seed=np.arange(n), **{k: np.full(n, v) for k, v in kwargs.items()})
    return np.asarray(sample(logits_BV, params).tokens_B)


def test_greedy_is_argmax_with_lowest_index_on_ties():
    logits_BV = _random_logits(6, 50)
    logits_BV[5] = [0.0, 3.0, 3.0] + [0.0] * 47
    out = sample(logits_BV, sampling_params(0.0, seed=np.arange(6)))
    np.testing.assert_array_equal(out.tokens_B, np.argmax(logits_BV, axis=-1))
    assert int(out.tokens_B[5]) == 1
    other = sample(logits_BV, sampling_params(0.0, seed=np.arange(6) + 99, step=7))
    np.testing.assert_array_equal(other.tokens_B, out.tokens_B)


def test_small_temperature_and_top_k_1_and_tiny_top_p_act_greedy():
    logits_BV = _random_logits(16, 100)
    argmax_B = np.argmax(logits_BV, axis=-1)
    seeds = np.arange(16)
    for params in (sampling_params(1e-4, seed=seeds), sampling_params(1.0, top_k=1, seed=seeds),
                   sampling_params(1.0, top_p=1e-6, seed=seeds)):
        np.testing.assert_array_equal(sample(logits_BV, params).tokens_B, argmax_B)


def test_frequencies_match_softmax_with_temperature():
    n, temperature = 4000, 1.5
    counts = np.bincount(_draw(LOGITS_V, n, temperature=temperature), minlength=4)
    expected = n * np.exp(_log_softmax(LOGITS_V / temperature))
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    assert chi2 < 16.3, (counts, expected)  # 3 dof, p = 0.001


def test_top_k_and_top_p_put_no_mass_outside_allowed_set():
    n = 4000
    probs = np.exp(_log_softmax(LOGITS_V))  # ~[.61, .22, .14, .03]
    counts_k = np.bincount(_draw(LOGITS_V, n, temperature=1.0, top_k=2), minlength=4)
    assert counts_k[2:].sum() == 0
    expected = n * probs[:2] / probs[:2].sum()
    assert np.all(np.abs(counts_k[:2] - expected) < 5 * np.sqrt(expected))
    # p=0.7: the top token (.61) is not enough, the top two (.83) are.
    counts_p = np.bincount(_draw(LOGITS_V, n, temperature=1.0, top_p=0.7), minlength=4)
    assert counts_p[2:].sum() == 0 and counts_p[1] > 0
    # top-k then top-p on the renormalized top-3: .61/.97 = .63 < .65 -> keep 2 tokens.
    counts_kp = np.bincount(_draw(LOGITS_V, n, temperature=1.0, top_k=3, top_p=0.65), minlength=4)
    assert counts_kp[2:].sum() == 0 and counts_kp[1] > 0


def test_rows_are_independent_of_batch_position_and_neighbours():
    logits_V = _random_logits(1, 64, seed=3)[0] / 3
    mine = {"temperature": 0.9, "top_k": 20, "top_p": 0.95, "seed": 1234, "step": 17}
    alone = sample(logits_V[None], sampling_params(**mine)).tokens_B[0]
    logits_BV = _random_logits(8, 64, seed=4)
    logits_BV[5] = logits_V
    columns = ([0.0, 1.0, 2.0, 0.5, 1.0, 0.0, 0.7, 1.3], [0, 5, 0, 3, 0, 1, 10, 0],
               [1.0, 0.9, 0.5, 1.0, 0.8, 1.0, 1.0, 0.3], range(8), range(8, 16))
    rows = [dict(zip(mine, values)) for values in zip(*columns)]
    rows[5] = mine
    batch = sampling_params(**{key: [r[key] for r in rows] for key in mine})
    assert int(sample(logits_BV, batch).tokens_B[5]) == int(alone)
    # the same seed at other steps, or other seeds, do vary the token
    draws = {int(sample(logits_V[None], sampling_params(**{**mine, "step": s})).tokens_B[0])
             for s in range(20)}
    assert len(draws) > 1


def test_logprobs_are_raw_log_softmax_and_top_alternatives_sorted():
    logits_BV = _random_logits(5, 30, seed=7)
    out = sample(logits_BV, sampling_params(2.0, top_k=4, seed=np.arange(5)), num_top_logprobs=3)
    logprobs_BV = _log_softmax(logits_BV)
    chosen = logprobs_BV[np.arange(5), np.asarray(out.tokens_B)]
    np.testing.assert_allclose(out.logprobs_B, chosen, rtol=1e-5, atol=1e-6)
    top = np.argsort(-logprobs_BV, axis=-1, kind="stable")[:, :3]
    np.testing.assert_array_equal(out.top_tokens_BK, top)
    np.testing.assert_allclose(out.top_logprobs_BK, np.take_along_axis(logprobs_BV, top, -1),
                               rtol=1e-5, atol=1e-6)
    assert np.all(np.diff(np.asarray(out.top_logprobs_BK), axis=-1) <= 0)
    assert sample(logits_BV, sampling_params(seed=np.arange(5))).top_tokens_BK.shape == (5, 0)


def test_next_token_logprobs_match_direct_computation():
    b, t, v = 2, 6, 11
    rng = np.random.default_rng(0)
    logits_BTV = rng.normal(size=(b, t, v)).astype(np.float32)
    targets_BT = rng.integers(0, v, size=(b, t)).astype(np.int32)
    targets_BT[0, :3] = np.argmax(logits_BTV[0, :3], -1)  # some greedy targets
    lp_BT, greedy_BT, top_ids_BTK, top_lp_BTK = next_token_logprobs(logits_BTV, targets_BT, 2)
    np.testing.assert_array_equal(greedy_BT, targets_BT == np.argmax(logits_BTV, -1))
    assert np.asarray(greedy_BT)[0, :3].all()
    logprobs = _log_softmax(logits_BTV)
    for i in range(b):
        for pos in range(t):
            row = logprobs[i, pos]
            assert lp_BT[i, pos] == pytest.approx(row[int(targets_BT[i, pos])], abs=1e-5)
            best = np.argsort(-row)[:2]
            np.testing.assert_array_equal(top_ids_BTK[i, pos], best)
            np.testing.assert_allclose(top_lp_BTK[i, pos], row[best], atol=1e-5)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus")
    (corpus / "a.txt").write_text("héllo wörld ✓ 日本 the quick brown fox\n" * 20, "utf-8")
    (corpus / "b.txt").write_text("naïve café jumps over the lazy dog 日本語\n" * 20, "utf-8")
    cache = tmp_path_factory.mktemp("cache")
    return load_tokenizer("builtin", 512, source=str(corpus), cache_dir=str(cache))


@pytest.mark.parametrize("prompt", ["", "the quick "])
def test_detokenizer_streams_exact_text_without_replacement_chars(tokenizer, prompt):
    text = "héllo wörld ✓ 日本語 😀 naïve Ωμέγα ✓✓ the end"
    ids = tokenizer.encode(text).ids
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # partial UTF-8 tokens occur
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode(prompt).ids)
    chunks = [detok.add(i) for i in ids]
    chunks.append(detok.flush())
    assert not any("\ufffd" in c for c in chunks)
    assert "".join(chunks) == tokenizer.decode(ids) == text


def _feed(checker, chunks, token_ids=None):
    token_ids = token_ids or [100 + i for i in range(len(chunks))]
    emitted = []
    for token_id, chunk in zip(token_ids, chunks):
        emitted.append(checker.add(token_id, chunk))
        if checker.stopped:
            break
    else:
        emitted.append(checker.flush())
    return emitted


def test_stop_string_split_across_chunks_is_never_emitted():
    checker = StopChecker(["STOP"], set())
    emitted = _feed(checker, ["Hello S", "T", "O", "P more"])
    assert "".join(emitted) == "Hello " and all("S" not in e for e in emitted)
    assert checker.stopped and checker.matched == "STOP"
    # a false start is released once it can no longer be a stop string
    checker = StopChecker(["STOP"], set())
    emitted = _feed(checker, ["a ST", "ORE b"])
    assert emitted[0] == "a " and "".join(emitted) == "a STORE b" and not checker.stopped


def test_stop_token_stops_without_text():
    checker = StopChecker(["zzz"], {0})
    emitted = _feed(checker, ["one ", "two z", "<eos>", "three"], [5, 6, 0, 7])
    assert "".join(emitted) == "one two z"
    assert checker.stopped and checker.matched == 0
    assert checker.add(8, "more") == ""


def test_multiple_stop_strings_earliest_wins():
    checker = StopChecker(["world", "lo w", "xyz"], set())
    emitted = _feed(checker, ["hel", "lo world"])
    assert "".join(emitted) == "hel" and checker.matched == "lo w"
    checker = StopChecker(["\n\n", "END"], set())
    assert "".join(_feed(checker, ["a END b\n\n"])) == "a " and checker.matched == "END"
    checker = StopChecker([], set())
    assert "".join(_feed(checker, ["plain ", "text"])) == "plain text" and not checker.stopped


def test_argmax_is_jnp_argmax_with_ties_infinities_and_nans():
    from lmsys.serve.sampling import argmax

    x = _random_logits(6, 40, seed=3)
    x[1, [4, 9]] = 50.0  # a tie: the lower index
    x[2] = -np.inf  # all -inf: index 0
    x[3, [7, 20]] = np.nan  # NaNs: the first one
    x[4, 39] = np.inf
    np.testing.assert_array_equal(argmax(x), np.argmax(x, axis=-1))
    assert list(np.asarray(argmax(x))[1:5]) == [4, 0, 7, 39]


def test_logprobs_are_skipped_only_when_no_row_asks():
    logits_BV = _random_logits(4, 30, seed=5)
    params = sampling_params([0.0, 1.0, 0.0, 0.5], seed=np.arange(4))
    full = sample(logits_BV, params, num_top_logprobs=3)
    none = sample(logits_BV, params, 3, np.zeros(4, bool))
    one = sample(logits_BV, params, 3, np.array([False, False, True, False]))
    for out in (none, one):  # the tokens never depend on it
        np.testing.assert_array_equal(out.tokens_B, full.tokens_B)
    for a, b in zip(one, full):  # one row asks: every row's log-probs are computed
        np.testing.assert_array_equal(a, b)
    for a in none[1:]:
        assert not np.any(np.asarray(a))
