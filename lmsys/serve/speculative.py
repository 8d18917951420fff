"""Speculative decoding: a proposer drafts up to k tokens per decoding request, and one
verification call of the target model scores [last token, draft 1..k] per row over the paged
cache; each row keeps the longest accepted prefix of its draft plus one token of its own.

    engine = Engine(..., EngineConfig(speculative="ngram", num_speculative_tokens=4))

The proposer here is `ngram` (prompt lookup): the longest of the sequence's last 3, 2 or 1
tokens that occurred earlier in its own context (prompt and generated text), and the tokens
that followed its latest earlier occurrence with k tokens after it (else its first). Copy-heavy answers (code edits, quoting,
extraction) then take several tokens per step.

Acceptance (`accept_drafts`, on device): a greedy row (temperature 0) accepts draft j while it
equals the target's argmax at position j-1, then takes the target's argmax: its tokens are
exactly those of decoding one token at a time (up to the numerics of a k+1-token call instead
of a one-token one). A sampled row uses speculative sampling's rejection rule (Leviathan et
al. 2023, Chen et al. 2023): draft token d from a draft distribution q is accepted with
probability min(1, p(d)/q(d)) under the target's sampling distribution p (temperature, top-k,
top-p applied); at the first rejection the row samples from normalize(max(p - q, 0)), and if
every draft is accepted, from p at the next position; the output is distributed as p. An ngram
draft is a point mass (q(d) = 1): accept with probability p(d), else sample p without d.
Randomness is per row and token (`fold_in(key(seed), step)` as in `sampling`), so a seeded
request gives the same text whatever runs beside it.

Log-probs of emitted tokens are the target's (raw logits, as without speculation). Pages for
the drafted positions are reserved before the call (the scheduler's `plan_decode`); keys and
values written for rejected positions lie past the request's computed tokens and are
overwritten later, never offered to the prefix cache.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lmsys.serve.sampling import SamplingParams, argmax, filtered_logits, next_token_logprobs

NGRAM_SIZES = (3, 2, 1)  # the lookup tries the longest suffix first


def propose_ngram(tokens: list[int], k: int) -> list[int]:
    """Up to k tokens that followed an earlier occurrence of the longest suffix of `tokens` (of
    NGRAM_SIZES tokens) in `tokens`: the latest one followed by k tokens, else the first (in a
    loop the latest occurrences are followed by few); [] if none occurred before."""
    if k < 1 or len(tokens) < 2:
        return []
    seq = np.asarray(tokens, np.int64)
    for n in NGRAM_SIZES:
        if len(seq) <= n:
            continue
        # windows starting at 0 .. len - n - 1 (the suffix itself excluded)
        windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)
        hits = np.flatnonzero((windows == seq[-n:]).all(axis=1)) + n  # where each continues
        if len(hits):
            full = hits[hits + k <= len(seq)]  # the latest with k tokens after it, else the first
            start = int(full[-1] if len(full) else hits[0])
            return seq[start:start + k].tolist()
    return []


class Verified(NamedTuple):
    num_accepted_B: jax.Array  # int32: drafts accepted (0 .. num_drafts)
    tokens_BT: jax.Array  # int32: the row emits tokens_BT[:num_accepted + 1]
    logprobs_BT: jax.Array  # float32: the target's log-prob of each (raw logits)
    top_tokens_BTK: jax.Array
    top_logprobs_BTK: jax.Array


def _target_probs(logits_TV, temperature, top_k, top_p):
    """The row's sampling distribution at each position, in vocabulary order."""
    def one(logits_V):
        order_V, sorted_V = filtered_logits(logits_V, temperature, top_k, top_p)
        return jnp.zeros_like(logits_V).at[order_V].set(jax.nn.softmax(sorted_V))

    return jax.vmap(one)(logits_TV)


def _sampled_row(logits_TV, drafts_K, num_drafts, q_KV, temperature, top_k, top_p, seed, step):
    """One sampled row: (accepted drafts, the token after them)."""
    K = drafts_K.shape[0]
    p_TV = _target_probs(logits_TV, temperature, top_k, top_p)
    key = jax.random.key(seed)
    steps_K = step + jnp.arange(K)
    u_K = jax.vmap(lambda s: jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, s), 1)))(steps_K)
    p_d_K = jnp.take_along_axis(p_TV[:K], drafts_K[:, None], axis=1)[:, 0]
    q_d_K = jnp.take_along_axis(q_KV, drafts_K[:, None], axis=1)[:, 0]
    ok_K = (u_K * q_d_K < p_d_K) & (jnp.arange(K) < num_drafts)
    a = jnp.sum(jnp.cumprod(ok_K.astype(jnp.int32)))
    q_aV = jnp.where(a < num_drafts, jnp.concatenate([q_KV, jnp.zeros_like(q_KV[:1])])[a], 0.0)
    residual_V = jnp.maximum(p_TV[a] - q_aV, 0.0)
    gumbel_V = jax.random.gumbel(jax.random.fold_in(key, step + a), residual_V.shape, jnp.float32)
    token = argmax(jnp.where(residual_V > 0, jnp.log(residual_V) + gumbel_V, -jnp.inf))
    return a, token


def accept_drafts(logits_BTV, drafts_BK, num_drafts_B, sampling: SamplingParams,
                  q_BKV: jax.Array | None = None):
    """(accepted drafts per row, the tokens each row emits: its accepted drafts then one of
    its own, padded to T = K + 1). logits_BTV: the target's logits at [last token, drafts];
    q_BKV: the draft distributions (None: point masses at the drafts, as ngram's)."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    B, T, V = logits_BTV.shape
    K = T - 1
    greedy_BT = argmax(logits_BTV)
    live_BK = jnp.arange(K)[None] < num_drafts_B[:, None]
    match_BK = (drafts_BK == greedy_BT[:, :K]) & live_BK
    greedy_a_B = jnp.sum(jnp.cumprod(match_BK.astype(jnp.int32), axis=1), axis=1)

    def sampled():
        q = jax.nn.one_hot(drafts_BK, V, dtype=jnp.float32) if q_BKV is None else q_BKV.astype(jnp.float32)
        a_B, token_B = jax.vmap(_sampled_row)(logits_BTV, drafts_BK, num_drafts_B, q, *sampling)
        greedy_row = sampling.temperature <= 0
        a_B = jnp.where(greedy_row, greedy_a_B, a_B)
        token_B = jnp.where(greedy_row, jnp.take_along_axis(greedy_BT, a_B[:, None], axis=1)[:, 0], token_B)
        return a_B, token_B

    def greedy():
        return greedy_a_B, jnp.take_along_axis(greedy_BT, greedy_a_B[:, None], axis=1)[:, 0]

    a_B, token_B = jax.lax.cond(jnp.all(sampling.temperature <= 0), greedy, sampled)
    j_T = jnp.arange(T)[None]
    drafts_BT = jnp.concatenate([drafts_BK, jnp.zeros_like(drafts_BK[:, :1])], axis=1)
    tokens_BT = jnp.where(j_T < a_B[:, None], drafts_BT, token_B[:, None]).astype(jnp.int32)
    return a_B.astype(jnp.int32), tokens_BT


def verify_output(logits_BTV, drafts_BK, num_drafts_B, sampling, logprobs_B, num_top: int,
                  q_BKV: jax.Array | None = None) -> Verified:
    """`accept_drafts`, with the target's log-probs of the emitted tokens when a row asks for
    them (`logprobs_B`; else zeros, the log-softmax skipped)."""
    a_B, tokens_BT = accept_drafts(logits_BTV, drafts_BK, num_drafts_B, sampling, q_BKV)

    def logprobs(_):
        lp_BT, _greedy, top_tokens_BTK, top_logprobs_BTK = next_token_logprobs(logits_BTV, tokens_BT, num_top)
        return lp_BT, top_tokens_BTK, top_logprobs_BTK

    def skip(_):
        return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(logprobs, None))

    return Verified(a_B, tokens_BT, *jax.lax.cond(jnp.any(logprobs_B), logprobs, skip, None))


def draft_token(logits_BV, sampling: SamplingParams, j):
    """A draft model's token for draft j of each row and the distribution q it was drawn from
    (the row's temperature, top-k and top-p over the draft's logits, in vocabulary order): the
    argmax for a greedy row, else a Gumbel-max draw with the row's key for draft j (a stream of
    its own: `fold_in(fold_in(key(seed), step + j), 2)`; acceptance draws with 1)."""
    def one(logits_V, temperature, top_k, top_p, seed, step):
        order_V, sorted_V = filtered_logits(logits_V, temperature, top_k, top_p)
        q_V = jnp.zeros_like(logits_V).at[order_V].set(jax.nn.softmax(sorted_V))
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step + j), 2)
        sampled = order_V[argmax(sorted_V + jax.random.gumbel(key, sorted_V.shape, jnp.float32))]
        return jnp.where(temperature > 0, sampled, argmax(logits_V)).astype(jnp.int32), q_V

    def greedy(logits_BV):  # no row samples: no sort over the vocabulary (q is not read)
        return argmax(logits_BV).astype(jnp.int32), jnp.zeros_like(logits_BV)

    logits_BV = logits_BV.astype(jnp.float32)
    return jax.lax.cond(jnp.all(sampling.temperature <= 0), greedy,
                        lambda x: jax.vmap(one)(x, *sampling), logits_BV)


# ---------------------------------------------------------------------- the engine's driving

SPECULATIVE = ("none", "ngram", "draft")


def num_drafts(engine, req) -> int:
    """Drafts a request can use this step: at most k, and one fewer than the tokens it may
    still generate (the verification always adds one of its own)."""
    return max(0, min(engine.cfg.num_speculative_tokens, req.options.max_tokens - len(req.generated) - 1))


def verify_rows(engine, batch, drafts: dict[int, list[int]], decode_rows):
    """The verification call's rows for `batch` (from the scheduler's `plan_decode`);
    `decode_rows`: `engine._decode_rows(batch)`."""
    rows, table, sampling, want_logprobs, adapter = decode_rows
    B, T = len(table), engine.cfg.num_speculative_tokens + 1
    toks, pos = np.zeros((B, T), np.int32), np.full((B, T), -1, np.int32)
    n_drafts = np.zeros(B, np.int32)
    for i, r in zip(rows, batch):
        d = drafts.get(r.id, [])
        toks[i, :len(d) + 1] = [r.tokens[-1], *d]
        pos[i, :len(d) + 1] = np.arange(r.num_computed, r.num_computed + len(d) + 1)
        n_drafts[i] = len(d)
    return rows, (toks, pos, table, sampling, n_drafts, want_logprobs, adapter)


def speculate(engine) -> None:
    """The decode part of an engine step with speculative decoding: drafts for the decoding
    requests (`ngram`: by prompt lookup, before their pages are reserved; `draft`: as many as
    `num_drafts`, their pages reserved, then one call of the draft model), one verification
    call (or a plain decode step when no row has a draft, except in batch-invariant mode, where
    every step verifies so that a request's numbers never depend on its neighbours' drafts),
    then each row's emitted tokens in order (stop rules and max_tokens apply token by token)."""
    from lmsys.serve.outputs import append_token

    sched, drafter = engine.scheduler, engine.drafter
    # a request under a grammar (structured output) is not drafted for: its token comes from
    # the masked decode step, which also runs the step whenever such a request is in it
    if drafter is None:
        drafts = {r.id: [] if r.matcher is not None else propose_ngram(r.tokens, num_drafts(engine, r))
                  for r in sched.decoding()}
        wanted = {i: len(d) for i, d in drafts.items()}
    else:
        wanted = {r.id: 0 if r.matcher is not None else num_drafts(engine, r) for r in sched.decoding()}
    ready = sched.plan_decode(lambda r: wanted[r.id])
    if not ready:
        return
    if any(r.matcher is not None for r in ready) or (
            not engine.cfg.batch_invariant and not any(wanted[r.id] for r in ready)):
        return engine._decode_batch(ready)
    decode_rows, q = engine._decode_rows(ready), ()
    if drafter is not None:  # q: the distributions the drafts were drawn from, kept on device
        drafts, q_BKV = drafter.propose(ready, decode_rows, wanted)
        q = (q_BKV,)
    rows, call_rows = verify_rows(engine, ready, drafts, decode_rows)
    out, engine.kv = engine._verify(engine.params, engine.kv, call_rows + q)
    out = jax.device_get(out)
    for i, r in zip(rows, ready):
        a = int(out.num_accepted_B[i])
        engine.stats["spec_draft_tokens"] += len(drafts[r.id])
        engine.stats["spec_accepted_tokens"] += a
        for j in range(a + 1):  # input j's keys/values are valid for j <= a
            r.num_computed += 1
            top = {} if r.options.logprobs is None else dict(zip(
                out.top_tokens_BTK[i, j].tolist(), out.top_logprobs_BTK[i, j].tolist()))
            engine._isolated(r, append_token, r, sched, int(out.tokens_BT[i, j]),
                             float(out.logprobs_BT[i, j]), top)
            if r.done:
                break


def warm_verify(engine) -> int:
    """Compiles the verification call for every decode bucket (and with a draft model, its
    prefill and draft calls); returns how many."""
    T = engine.cfg.num_speculative_tokens + 1
    for n, pages in engine.decode_buckets:
        z = np.zeros(n, np.int32)
        sampling = SamplingParams(np.zeros(n, np.float32), z, np.ones(n, np.float32), np.zeros(n, np.uint32), z)
        toks = np.zeros((n, T), np.int32)
        q = () if engine.drafter is None else (engine.drafter.warm(n, pages, sampling),)
        _, engine.kv = engine._verify(engine.params, engine.kv, (
            toks, toks - 1, np.zeros((n, pages), np.int32), sampling, z, np.zeros(n, bool), z) + q)
    return len(engine.decode_buckets) + (0 if engine.drafter is None else engine.drafter.warm_prefill())
