"""Token sampling for a batch whose rows each carry their own parameters (continuous batching).

Everything here is pure jnp and jit-friendly. Each row draws with its own key,
`fold_in(key(seed), step)`, so a request with a fixed seed produces the same tokens whatever
batch row it lands in and whatever else shares the batch.
"""

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class SamplingParams(NamedTuple):
    """Per-row sampling parameters, each an array of shape [B]."""

    temperature: jax.Array  # float32; 0 = greedy
    top_k: jax.Array  # int32; 0 = off
    top_p: jax.Array  # float32; 1.0 = off
    seed: jax.Array  # uint32 (int32 with the same bits gives the same key)
    step: jax.Array  # int32; index of the generated token within its request (0 = first)


class SampleOutput(NamedTuple):
    tokens_B: jax.Array  # int32
    logprobs_B: jax.Array  # float32; log-prob of the chosen token under the raw logits
    top_tokens_BK: jax.Array  # int32; the K most likely tokens under the raw logits
    top_logprobs_BK: jax.Array  # float32; their log-probs, descending


def sampling_params(temperature=0.0, top_k=0, top_p=1.0, seed=0, step=0) -> SamplingParams:
    """Builds SamplingParams from scalars or per-row sequences, broadcast to one batch shape.

    Seeds are taken modulo 2**32 (OpenAI seeds may be any integer).
    """
    seed = np.asarray(np.asarray(seed, dtype=object) % 2**32, dtype=np.uint32)
    arrays = (
        jnp.asarray(temperature, jnp.float32),
        jnp.asarray(top_k, jnp.int32),
        jnp.asarray(top_p, jnp.float32),
        seed,
        jnp.asarray(step, jnp.int32),
    )
    shape = jnp.broadcast_shapes(*(a.shape for a in arrays), (1,))
    return SamplingParams(*(jnp.broadcast_to(a, shape) for a in arrays))


def argmax(x_XV: jax.Array) -> jax.Array:
    """`jnp.argmax` over the last axis (int32; ties and NaNs: the lowest index), as a max and a
    min over the indices that reach it: two plain reductions, which XLA:CPU runs ~3x faster
    than argmax's (value, index) pair reduction over a vocabulary."""
    is_max_XV = (x_XV == jnp.max(x_XV, axis=-1, keepdims=True)) | jnp.isnan(x_XV)
    index_V = jnp.arange(x_XV.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(is_max_XV, index_V, x_XV.shape[-1] - 1), axis=-1)


def filtered_logits(logits_V, temperature, top_k, top_p):
    """One row's logits after temperature, then top-k, then top-p, sorted descending (-inf for
    the tokens filtered out), and the sort order: the row's sampling distribution is the
    softmax of the former over the tokens of the latter."""
    scaled_V = logits_V / jnp.where(temperature > 0, temperature, 1.0)
    order_V = jnp.argsort(-scaled_V, stable=True)  # descending; ties -> lowest index first
    sorted_V = scaled_V[order_V]
    rank_V = jnp.arange(sorted_V.shape[0])
    keep_V = (top_k <= 0) | (rank_V < top_k)
    sorted_V = jnp.where(keep_V, sorted_V, -jnp.inf)
    probs_V = jax.nn.softmax(sorted_V)
    mass_before_V = jnp.cumsum(probs_V) - probs_V
    keep_V &= (mass_before_V < top_p) | (top_p >= 1.0) | (rank_V == 0)
    return order_V, jnp.where(keep_V, sorted_V, -jnp.inf)


def _sample_row(logits_V, temperature, top_k, top_p, seed, step):
    """One row: temperature, then top-k, then top-p, then a Gumbel-max draw with the row's key."""
    greedy_token = argmax(logits_V)
    order_V, sorted_V = filtered_logits(logits_V, temperature, top_k, top_p)
    key = jax.random.fold_in(jax.random.key(seed), step)
    gumbel_V = jax.random.gumbel(key, sorted_V.shape, jnp.float32)
    sampled_token = order_V[argmax(sorted_V + gumbel_V)].astype(jnp.int32)
    return jnp.where(temperature > 0, sampled_token, greedy_token)


def _top(logprobs_XV, k: int):
    if k == 0:
        shape = logprobs_XV.shape[:-1] + (0,)
        return jnp.zeros(shape, jnp.int32), jnp.zeros(shape, jnp.float32)
    values, indices = jax.lax.top_k(logprobs_XV, k)
    return indices.astype(jnp.int32), values


@partial(jax.jit, static_argnames="num_top_logprobs")
def sample(logits_BV, params: SamplingParams, num_top_logprobs: int = 0,
           logprobs_B: jax.Array | None = None) -> SampleOutput:
    """Draws one token per row with that row's parameters; log-probs are of the raw logits.

    logprobs_B: bool [B], the rows whose log-probs are wanted (None: all). When no row of the
    batch wants them, the log-softmax and top-k over the vocabulary are skipped (a `lax.cond`,
    one compiled function) and the log-prob outputs are zeros.
    """
    logits_BV = logits_BV.astype(jnp.float32)
    tokens_B = jax.lax.cond(
        jnp.all(params.temperature <= 0),  # all-greedy batch: skip the per-row vocab sort
        lambda: argmax(logits_BV),
        lambda: jax.vmap(_sample_row)(logits_BV, *params),
    )

    def logprobs(logits_BV, tokens_B):
        logprobs_BV = jax.nn.log_softmax(logits_BV, axis=-1)
        chosen_B = jnp.take_along_axis(logprobs_BV, tokens_B[:, None], axis=-1)[:, 0]
        return (chosen_B, *_top(logprobs_BV, num_top_logprobs))

    if logprobs_B is None:
        chosen = logprobs(logits_BV, tokens_B)
    else:
        def skip(logits_BV, tokens_B):
            shapes = jax.eval_shape(logprobs, logits_BV, tokens_B)
            return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)

        chosen = jax.lax.cond(jnp.any(logprobs_B), logprobs, skip, logits_BV, tokens_B)
    return SampleOutput(tokens_B, *chosen)


def next_token_logprobs(logits_BTV, targets_BT, num_top: int):
    """Log-prob of each target (the token that follows position t) under the logits at t,
    whether it is greedy there (it has the largest logit; a tie for the largest counts), and
    the `num_top` most likely tokens there: OpenAI's prompt log-probs (`echo`) and lm-eval's
    log-likelihoods. No [.., V] log-softmax is materialized (one max and one sum over the
    vocabulary; `lax.top_k` only when num_top > 0: on XLA:CPU it costs ~5x the rest)."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    max_BT = jnp.max(logits_BTV, axis=-1)
    lse_BT = max_BT + jnp.log(jnp.sum(jnp.exp(logits_BTV - max_BT[..., None]), axis=-1))
    target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None].astype(jnp.int32), axis=-1)[..., 0]
    top_tokens_BTK, top_logits_BTK = _top(logits_BTV, num_top)
    return target_BT - lse_BT, target_BT == max_BT, top_tokens_BTK, top_logits_BTK - lse_BT[..., None]
