"""The mixture-of-experts MLP of a Llama-family layer (Mixtral/DeepSeek style): its parameters,
the routed experts with GShard-style dispatch, shared experts and the router losses.

    out_BTD, stats = moe_mlp(h_BTD, layer_params, cfg=cfg, rules=rules)
    aux_loss, z_loss = router_losses(stats, cfg)

lmsys.models.llama uses it for every layer when `n_experts` > 0; expert parallelism over the
`expert` mesh axis is lmsys.parallel.moe.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from lmsys.config import ModelConfig
from lmsys.models.common import ACTIVATIONS, ParamSpec, constrain, swiglu
from lmsys.parallel.moe import expert_parallel


def moe_param_specs(cfg: ModelConfig) -> dict:
    """The MoE layer params, replacing the dense w_gate/w_up/w_down: a router, the routed experts
    stacked on an `experts` axis (split over the `expert` mesh axis) and optional shared experts."""
    D, L, E = cfg.d_model, cfg.n_layers, cfg.n_experts
    F = cfg.moe_d_ff or cfg.d_ff
    specs = {
        "router": ParamSpec((L, D, E), ("layers", "embed", "router"), "normal"),
        "w_gate": ParamSpec((L, E, D, F), ("layers", "experts", "embed", "mlp"), "normal"),
        "w_up": ParamSpec((L, E, D, F), ("layers", "experts", "embed", "mlp"), "normal"),
        "w_down": ParamSpec((L, E, F, D), ("layers", "experts", "mlp", "embed"), "normal"),
    }
    if cfg.n_shared_experts:  # n shared experts of width F are one SwiGLU of width n x F
        S = cfg.shared_d_ff or cfg.n_shared_experts * F
        specs["shared_w_gate"] = ParamSpec((L, D, S), ("layers", "embed", "mlp"), "normal")
        specs["shared_w_up"] = ParamSpec((L, D, S), ("layers", "embed", "mlp"), "normal")
        specs["shared_w_down"] = ParamSpec((L, S, D), ("layers", "mlp", "embed"), "normal")
    if cfg.shared_expert_gate:  # Qwen2-MoE: the shared output x sigmoid(h . shared_gate)
        specs["shared_gate"] = ParamSpec((L, D), ("layers", "embed"), "normal")
    return specs


def moe_capacity(cfg: ModelConfig, row_tokens: int) -> int:
    """Slots per expert per row: every token of the row when dropless (capacity factor 0), else
    ceil(factor x k x row_tokens / n_experts), at least 1 and at most row_tokens."""
    if not cfg.moe_capacity_factor:
        return row_tokens
    c = math.ceil(cfg.moe_capacity_factor * cfg.experts_per_token * row_tokens / cfg.n_experts)
    return max(1, min(row_tokens, c))


def moe_mlp(h_BTD: jax.Array, lp: dict, *, cfg: ModelConfig, rules=None):
    """The routed MLP of one layer, GShard-style dispatch within each row, and its router losses.

    Each token picks its top-k experts by router logit; their weights are a softmax over those k
    logits (Mixtral; `router_norm_topk`), else their probabilities in a softmax over all experts
    (Qwen2-MoE without norm_topk_prob). Within a row, an expert takes tokens up to its capacity C (`moe_capacity`),
    first choices before second ones, earlier tokens first; assignments past C are dropped. The
    tokens are dispatched to an [experts, batch, C, D] array by a one-hot einsum, run through
    their expert's SwiGLU and combined back with their weights. With `expert` > 1 on the mesh,
    the experts' weights and the rows are both split over it and two all-to-alls move the slots
    to their expert's device and back (lmsys.parallel.moe). Shared experts (if any) see every
    token.

    Returns (out_BTD, stats): the router statistics of this call's tokens that `router_losses`
    turns into its losses. They are sums over the tokens, so the statistics of several calls
    (a pipeline's microbatches) add up to those of one call over all their tokens.
    """
    B, T, _ = h_BTD.shape
    E, K, C = cfg.n_experts, cfg.experts_per_token, moe_capacity(cfg, h_BTD.shape[1])
    logits_BTE = jnp.einsum("btd,de->bte", h_BTD, lp["router"], preferred_element_type=jnp.float32)
    logits_BTE = constrain(rules, logits_BTE, ("batch", "seq", "router"))
    top_logits_BTK, expert_BTK = jax.lax.top_k(logits_BTE, K)
    if cfg.router_norm_topk:
        weights_BTK = jax.nn.softmax(top_logits_BTK, axis=-1)
    else:
        weights_BTK = jnp.take_along_axis(jax.nn.softmax(logits_BTE, axis=-1), expert_BTK, axis=-1)
    onehot_BTKE = jax.nn.one_hot(expert_BTK, E, dtype=jnp.int32)
    # slot of each assignment in its expert: count over (choice, token), choice-major
    order_BNE = jnp.swapaxes(onehot_BTKE, 1, 2).reshape(B, K * T, E)
    slot_BKTE = (jnp.cumsum(order_BNE, axis=1) - 1).reshape(B, K, T, E)
    slot_BTK = jnp.sum(jnp.swapaxes(slot_BKTE, 1, 2) * onehot_BTKE, axis=-1)
    slot_BTKC = jax.nn.one_hot(slot_BTK, C, dtype=jnp.float32)  # all zero past capacity: dropped
    onehot_f_BTKE = onehot_BTKE.astype(jnp.float32)
    dispatch_BTEC = jnp.einsum("btke,btkc->btec", onehot_f_BTKE, slot_BTKC)
    combine_BTEC = jnp.einsum("btke,btkc->btec", onehot_f_BTKE * weights_BTK[..., None], slot_BTKC)

    dtype = h_BTD.dtype
    x_EBCD = jnp.einsum("btec,btd->ebcd", dispatch_BTEC.astype(dtype), h_BTD)
    weights = (lp["w_gate"], lp["w_up"], lp["w_down"])
    if rules is not None and rules.mesh.shape.get("expert", 1) > 1:
        x_EBCD = constrain(rules, x_EBCD, (None, "batch", None, None))  # each row's slots stay home
        y_EBCD = expert_parallel(partial(_experts_swiglu, act=cfg.mlp_act), x_EBCD, weights, rules=rules)
    else:
        y_EBCD = _experts_swiglu(x_EBCD, *weights, rules, act=cfg.mlp_act)
    y_EBCD = constrain(rules, y_EBCD, (None, "batch", None, None))
    out_BTD = jnp.einsum("btec,ebcd->btd", combine_BTEC.astype(dtype), y_EBCD)
    if cfg.n_shared_experts:
        shared_BTD = swiglu(h_BTD, lp["shared_w_gate"], lp["shared_w_up"], lp["shared_w_down"], rules,
                            act=cfg.mlp_act)
        if cfg.shared_expert_gate:
            shared_BTD = shared_BTD * jax.nn.sigmoid(jnp.einsum("btd,d->bt", h_BTD, lp["shared_gate"]))[..., None]
        out_BTD = out_BTD + shared_BTD

    assigned_E = jnp.sum(onehot_f_BTKE, axis=(0, 1, 2))
    probs_E = jnp.sum(jax.nn.softmax(logits_BTE, axis=-1), axis=(0, 1))
    z = jnp.sum(jnp.square(jax.nn.logsumexp(logits_BTE, axis=-1)))
    return out_BTD, jnp.concatenate([assigned_E, probs_E, jnp.stack([z, jnp.float32(B * T)])])


def router_losses(stats: jax.Array, cfg: ModelConfig) -> jax.Array:
    """[load-balancing loss, z-loss] of one MoE layer from `moe_mlp`'s statistics: the
    load-balancing loss n_experts x sum_e f_e p_e (f_e: the fraction of the k x tokens
    assignments routed to e, p_e: e's mean router probability; 1.0 when balanced) and the z-loss
    mean(logsumexp(logits)^2), both over the tokens the statistics cover."""
    E, K = cfg.n_experts, cfg.experts_per_token
    assigned_E, probs_E, (z, tokens) = stats[:E], stats[E:2 * E], stats[2 * E:]
    balance = E * jnp.sum(assigned_E / (K * tokens) * (probs_E / tokens))
    return jnp.stack([balance, z / tokens])


def _experts_swiglu(x_EBCD, w_gate_EDF, w_up_EDF, w_down_EFD, rules, act="silu"):
    gate_EBCF = jnp.einsum("ebcd,edf->ebcf", x_EBCD, w_gate_EDF)
    up_EBCF = jnp.einsum("ebcd,edf->ebcf", x_EBCD, w_up_EDF)
    hidden_EBCF = constrain(rules, ACTIVATIONS[act](gate_EBCF) * up_EBCF, ("experts", "batch", None, "mlp"))
    return jnp.einsum("ebcf,efd->ebcd", hidden_EBCF, w_down_EFD)
