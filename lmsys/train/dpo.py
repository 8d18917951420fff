"""Direct Preference Optimization (Rafailov et al. 2023), the sigmoid loss, over the same
forward as language modelling.

A batch holds pairs in consecutive rows (chosen, rejected; lmsys.data.preference); each row's
log-probability is the sum of its answer tokens' (loss_mask 1). With the policy's log-probs
pi_c, pi_r and the reference's ref_c, ref_r:

    reward_c = beta (pi_c - ref_c),  reward_r = beta (pi_r - ref_r)
    loss = -log sigmoid(reward_c - reward_r)              (mean over pairs)

The reference is the frozen base: with LoRA the same params with the adapters off (free), for
full fine-tuning a frozen copy of the starting weights (params["dpo_reference"],
lmsys.train.adapters). Metrics: rewards_chosen, rewards_rejected, reward_accuracy (the share of
pairs with reward_c > reward_r), reward_margin (reward_c - reward_r), each a mean over pairs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

METRICS = ("rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin")


def token_logps(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """The log-probability of each target under the logits: [B, T] float32."""
    logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]


def sequence_logps(logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """Per row, the summed log-probability of the targets where mask is 1: [B]."""
    return jnp.sum(token_logps(logits_BTV, targets_BT) * mask_BT, axis=-1)


def dpo_sums(policy_B: jax.Array, reference_B: jax.Array, beta: float):
    """(loss sum, number of pairs, {metric: sum over pairs}) for rows (chosen, rejected, ...)."""
    ratio_P2 = (policy_B - reference_B).reshape(-1, 2)
    rewards_P2 = beta * ratio_P2
    margin_P = rewards_P2[:, 0] - rewards_P2[:, 1]
    loss_sum = -jnp.sum(jax.nn.log_sigmoid(margin_P))
    metrics = {"rewards_chosen": jnp.sum(rewards_P2[:, 0]), "rewards_rejected": jnp.sum(rewards_P2[:, 1]),
               "reward_accuracy": jnp.sum((margin_P > 0).astype(jnp.float32)), "reward_margin": jnp.sum(margin_P)}
    return loss_sum, jnp.asarray(margin_P.shape[0], jnp.float32), metrics


def reference_params(params: dict) -> dict:
    """The frozen reference of a DPO run's params: the base without adapters, or the copy."""
    from lmsys.models import lora

    if "dpo_reference" in params:
        return params["dpo_reference"]
    return lora.with_adapters(params, None)


def loss_sums(forward, params: dict, batch: dict, beta: float):
    """DPO's (objective, (loss sum, pairs, metric sums)) of a batch of pairs; `forward(params,
    batch)` gives the logits."""
    policy_B = sequence_logps(forward(params, batch), batch["targets"], batch["loss_mask"])
    ref_params = jax.lax.stop_gradient(reference_params(params))
    reference_B = sequence_logps(forward(ref_params, batch), batch["targets"], batch["loss_mask"])
    loss_sum, n, metrics = dpo_sums(policy_B, jax.lax.stop_gradient(reference_B), beta)
    return loss_sum, (loss_sum, n, metrics)
