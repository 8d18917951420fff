"""GRPO (Shao et al. 2024, DeepSeekMath), the policy-gradient objective of `lmsys rl`, over the
same forward as language modelling.

A batch holds G sampled completions of each prompt, one per row (prompt + completion, loss_mask
1 on the completion's tokens), with per row the group-normalized advantage

    A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4)      (std with ddof=1, as TRL)

broadcast over its tokens, and per token the log-prob under the policy that sampled it
(`old_logps`: the trainer's recomputation before the first update of the rollout) and under the
frozen reference (`ref_logps`). With the policy's log-prob logp of a completion token:

    ratio = exp(logp - old)
    loss_t = -min(ratio A, clip(ratio, 1 - eps, 1 + eps) A) + beta kl_t
    kl_t = exp(ref - logp) - (ref - logp) - 1                (the k3 estimator, >= 0)
    loss = sum_t loss_t / (number of completion tokens in the batch)

The normalization is token-level: the sum over every completion token of the batch divided by
their count (TRL's loss_type="dapo"/"bnpo", DAPO), not DeepSeekMath's mean over each sequence's
tokens then over sequences: every token weighs the same whatever its completion's length, and the
loss is a sum / count like the trainer's cross-entropy. Metrics (means over completion tokens):
kl (with beta > 0), clip_fraction (tokens whose clipped term is the smaller one and so has no
gradient: ratio < 1 - eps with A < 0, or ratio > 1 + eps with A > 0).
"""

from __future__ import annotations

from functools import cached_property

import jax
import jax.numpy as jnp
import numpy as np

from lmsys.train.dpo import reference_params, token_logps
from lmsys.train.step import BATCH_KEYS, Trainer

RL_KEYS = BATCH_KEYS + ("advantages", "old_logps", "ref_logps")
FLOAT_KEYS = ("loss_mask", "advantages", "old_logps", "ref_logps")
ADV_EPS = 1e-4


def group_advantages(rewards, group_size: int) -> np.ndarray:
    """(r - mean) / (std + 1e-4) within each consecutive group of `group_size` rewards."""
    r = np.asarray(rewards, np.float64).reshape(-1, group_size)
    adv = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + ADV_EPS)
    return adv.reshape(-1).astype(np.float32)


def grpo_sums(logp_BT, old_BT, ref_BT, adv_BT, mask_BT, clip_eps: float, beta: float):
    """(loss sum, token count, {metric: sum over tokens}) of the clipped objective + beta KL."""
    ratio = jnp.exp(logp_BT - old_BT)
    clipped = jnp.clip(ratio, 1 - clip_eps, 1 + clip_eps)
    per_token = -jnp.minimum(ratio * adv_BT, clipped * adv_BT)
    metrics = {"clip_fraction": jnp.sum(mask_BT * (((ratio < 1 - clip_eps) & (adv_BT < 0))
                                                   | ((ratio > 1 + clip_eps) & (adv_BT > 0))))}
    if beta:
        delta = ref_BT - logp_BT
        kl = jnp.exp(delta) - delta - 1
        per_token = per_token + beta * kl
        metrics["kl"] = jnp.sum(kl * mask_BT)
    return jnp.sum(per_token * mask_BT), jnp.sum(mask_BT), metrics


class GrpoTrainer(Trainer):
    """The Trainer (sharded state, optimizer, the jitted step) with the GRPO objective over
    batches of RL_KEYS, and `score`: the policy's and the reference's token log-probs."""

    def _loss_sums(self, params, batch):
        r = self.cfg.rl
        logp = token_logps(self._logits(params, batch), batch["targets"])
        loss_sum, n, metrics = grpo_sums(logp, batch["old_logps"], batch["ref_logps"], batch["advantages"],
                                         batch["loss_mask"], r.clip_eps, r.kl_beta)
        return loss_sum, (loss_sum, n, metrics)

    def abstract_batch(self, batch_size: int | None = None):
        shape = (batch_size or self.cfg.batch_size, self.cfg.seq_len)
        return {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k in FLOAT_KEYS else jnp.int32,
                                        sharding=self.batch_sharding) for k in RL_KEYS}

    def _score(self, params, batch):
        policy = token_logps(self._logits(params, batch), batch["targets"])
        if not self.cfg.rl.kl_beta:
            return policy, jnp.zeros_like(policy)
        return policy, token_logps(self._logits(reference_params(params), batch), batch["targets"])

    @cached_property
    def score(self):
        """(policy log-probs, reference log-probs; zeros without rl.kl_beta) of the targets,
        [B, T] each: jitted once, on the state's param shardings."""
        return jax.jit(self._score, in_shardings=(self.param_shardings, self.batch_sharding),
                       out_shardings=self.batch_sharding)
