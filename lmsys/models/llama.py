"""A Llama-family decoder as pure functions over a dict of arrays.

    params = init(key, cfg)                       # float32, layers stacked on a leading axis
    logits_BTV, aux = forward(params, tokens_BT, positions_BT, segment_ids_BT, cfg=cfg)

RMSNorm, RoPE (with Llama-3 frequency scaling), grouped-query attention, SwiGLU, tied or untied
embeddings, optional qkv bias, optional per-head q/k RMSNorm (Qwen3), and with `n_experts` > 0 a
Mixtral/DeepSeek-style mixture-of-experts MLP (`moe_mlp`; its router losses come back in aux). Each parameter's shape
and logical axes are declared once, in `param_specs`; the rule table in lmsys.parallel turns
the axes into shardings.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from lmsys.config import ModelConfig
from lmsys.kernels import attention
from lmsys.kernels.attention import resolve_impl


class ParamSpec(NamedTuple):
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    init: str  # "normal" | "ones" | "zeros"


def param_specs(cfg: ModelConfig) -> dict:
    """Shape, logical axes and initializer of every parameter (layers stacked on axis 0)."""
    D, L, N, K, H, F, V = (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                           cfg.d_ff, cfg.vocab_size)
    layers = {
        "attn_norm": ParamSpec((L, D), ("layers", "norm"), "ones"),
        "wq": ParamSpec((L, D, N, H), ("layers", "embed", "heads", "head_dim"), "normal"),
        "wk": ParamSpec((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
        "wv": ParamSpec((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
        "wo": ParamSpec((L, N, H, D), ("layers", "heads", "head_dim", "embed"), "normal"),
        "mlp_norm": ParamSpec((L, D), ("layers", "norm"), "ones"),
        "w_gate": ParamSpec((L, D, F), ("layers", "embed", "mlp"), "normal"),
        "w_up": ParamSpec((L, D, F), ("layers", "embed", "mlp"), "normal"),
        "w_down": ParamSpec((L, F, D), ("layers", "mlp", "embed"), "normal"),
    }
    if cfg.n_experts:
        layers.update(moe_param_specs(cfg))
    if cfg.qkv_bias:
        layers["bq"] = ParamSpec((L, N, H), ("layers", "heads", "head_dim"), "zeros")
        layers["bk"] = ParamSpec((L, K, H), ("layers", "kv_heads", "head_dim"), "zeros")
        layers["bv"] = ParamSpec((L, K, H), ("layers", "kv_heads", "head_dim"), "zeros")
    if cfg.qk_norm:
        layers["q_norm"] = ParamSpec((L, H), ("layers", "norm"), "ones")
        layers["k_norm"] = ParamSpec((L, H), ("layers", "norm"), "ones")
    specs = {
        "embed": ParamSpec((V, D), ("vocab", "embed"), "normal"),
        "layers": layers,
        "final_norm": ParamSpec((D,), ("norm",), "ones"),
    }
    if not cfg.tie_embeddings:
        specs["unembed"] = ParamSpec((D, V), ("embed", "vocab"), "normal")
    return specs


def _is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def param_axes(cfg: ModelConfig) -> dict:
    """The logical axes of every parameter, as a pytree matching `init`'s output."""
    return jax.tree.map(lambda s: s.axes, param_specs(cfg), is_leaf=_is_spec)


def param_shapes(cfg: ModelConfig) -> dict:
    """ShapeDtypeStructs of every parameter (float32), without allocating anything."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), param_specs(cfg),
                        is_leaf=_is_spec)


def init(key: jax.Array, cfg: ModelConfig) -> dict:
    """Random float32 parameters: normal(init_std) matrices, unit norms, zero biases."""
    specs = param_specs(cfg)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
    keys = jax.random.split(key, len(leaves))
    out = []
    for k, s in zip(keys, leaves):
        if s.init == "normal":
            out.append(cfg.init_std * jax.random.normal(k, s.shape, jnp.float32))
        elif s.init == "ones":
            out.append(jnp.ones(s.shape, jnp.float32))
        else:
            out.append(jnp.zeros(s.shape, jnp.float32))
    return jax.tree.unflatten(treedef, out)


def count_params(cfg: ModelConfig) -> int:
    return sum(math.prod(s.shape) for s in jax.tree.leaves(param_specs(cfg), is_leaf=_is_spec))


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (parameters used in matmuls) + 12 x L x N x H x seq_len
    for attention scores and values (PaLM appendix B). The embedding lookup is no matmul; the
    output projection is (tied or not)."""
    matmul_params = count_params(cfg) - cfg.vocab_size * cfg.d_model * (0 if cfg.tie_embeddings else 1)
    matmul_params -= cfg.d_model * (2 * cfg.n_layers + 1)  # norms
    matmul_params -= 2 * cfg.n_layers * cfg.head_dim if cfg.qk_norm else 0
    if cfg.n_experts:  # each token runs experts_per_token of the n_experts routed experts
        routed = 3 * cfg.n_layers * cfg.n_experts * cfg.d_model * (cfg.moe_d_ff or cfg.d_ff)
        matmul_params -= routed * (cfg.n_experts - cfg.experts_per_token) // cfg.n_experts
    return 6.0 * matmul_params + 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


# ----------------------------------------------------------------------------- building blocks


def rms_norm(x_BTD: jax.Array, w_D: jax.Array, eps: float) -> jax.Array:
    x = x_BTD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return (x * w_D.astype(jnp.float32)).astype(x_BTD.dtype)


def rope_frequencies(cfg: ModelConfig) -> jax.Array:
    """Inverse frequencies [head_dim/2], with Llama-3 scaling when rope_scaling_factor > 0:
    long wavelengths are divided by the factor, short ones kept, the band between blended."""
    H = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, H, 2, dtype=jnp.float32) / H))
    if not cfg.rope_scaling_factor:
        return inv_freq
    factor, orig = cfg.rope_scaling_factor, cfg.rope_original_max_position
    low_wavelen = orig / cfg.rope_low_freq_factor
    high_wavelen = orig / cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (orig / wavelen - cfg.rope_low_freq_factor) / (
        cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, blended, scaled)


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotates the two halves of each head (the Hugging Face Llama layout)."""
    angles_BTh = positions_BT[..., None].astype(jnp.float32) * inv_freq
    sin, cos = jnp.sin(angles_BTh)[:, :, None, :], jnp.cos(angles_BTh)[:, :, None, :]
    x = x_BTNH.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNH.dtype)


REMAT_POLICIES = {
    "full": None,  # save nothing inside a layer; recompute it all in the backward pass
    # keep the attention projections and block outputs; recompute softmax and the MLP interior
    "selective": jax.checkpoint_policies.save_only_these_names(
        "q_proj", "k_proj", "v_proj", "attn_out", "mlp_out"),
}


def _is_quantized(w) -> bool:
    return hasattr(w, "qvalue")  # a qwix QArray (lmsys.serve.quantize)


def materialize(tree, dtype):
    """Parameters in the compute dtype; quantized ones are dequantized first."""
    def one(w):
        if _is_quantized(w):
            import qwix

            w = qwix.dequantize(w)
        return w.astype(dtype)

    return jax.tree.map(one, tree, is_leaf=_is_quantized)


def _constrain(rules, x, axes):
    return x if rules is None else rules.constrain(x, axes)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    """A KV cache for `batch` rows of up to `max_len` tokens: the paged layout (see `forward`)
    with one page of `max_len` slots per row."""
    return {"k": jnp.zeros((cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim), dtype),
            "v": jnp.zeros((cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim), dtype),
            "page_table": jnp.arange(batch, dtype=jnp.int32)[:, None]}


def _cached_attention(q_BTNH, k_BTKH, v_BTKH, kv, layer, page_table_BP, positions_BT, impl,
                      rules=None):
    """Writes this call's keys/values into the paged pool of `layer` and attends over each
    row's pages. Tokens at position < 0 are padding: their writes are dropped. A decode step
    (one token per row) with impl resolving to "pallas" runs the paged kernel where it reads the
    pool in place (GPU with a power-of-two head_dim, TPU; CPU interpret; on a mesh per shard of
    the pool, lmsys.parallel.kernels); on XLA:CPU a decode step gathers the pages in the pool's
    layout and attends with two batched matmuls; else the pages are gathered into a dense
    sequence for `attention`. A call whose every row holds the first tokens of its sequence (a
    prompt's first prefill chunk) attends over its own keys."""
    from lmsys.kernels import paged_attention, resolve_impl
    from lmsys.kernels.paged_attention import supported as paged_supported
    k_LPSKH, v_LPSKH = kv
    n_pages, page_size = k_LPSKH.shape[1], k_LPSKH.shape[2]
    B, P = page_table_BP.shape
    page_BT = jnp.take_along_axis(page_table_BP, jnp.clip(positions_BT // page_size, 0, P - 1), axis=1)
    page_BT = jnp.where(positions_BT >= 0, page_BT, n_pages)  # out of range: scatter drops it
    slot_BT = positions_BT % page_size
    k_LPSKH = k_LPSKH.at[layer, page_BT, slot_BT].set(k_BTKH.astype(k_LPSKH.dtype), mode="drop")
    v_LPSKH = v_LPSKH.at[layer, page_BT, slot_BT].set(v_BTKH.astype(v_LPSKH.dtype), mode="drop")
    if q_BTNH.shape[1] == 1 and resolve_impl(impl) == "pallas" and paged_supported(q_BTNH.shape[-1]):
        # decode: the kernel reads this layer's pages in place; row b sees positions <= its own
        lengths_B = jnp.maximum(positions_BT[:, 0] + 1, 0)
        if rules is not None and rules.mesh.size > 1:
            from lmsys.parallel.kernels import sharded_paged_attention

            o_BNH = sharded_paged_attention(q_BTNH[:, 0], k_LPSKH, v_LPSKH, lengths_B,
                                            page_table_BP, layer=layer, rules=rules)
        else:
            o_BNH = paged_attention(q_BTNH[:, 0], k_LPSKH, v_LPSKH, lengths_B, page_table_BP,
                                    layer=layer)
        return o_BNH[:, None], (k_LPSKH, v_LPSKH)
    K, H = k_LPSKH.shape[3], k_LPSKH.shape[4]
    backend = jax.default_backend() if rules is None else rules.backend
    if q_BTNH.shape[1] == 1 and backend == "cpu" and (
            rules is None or not rules.spec(("kv_heads",), (K,))):
        # decode on XLA:CPU: each row's pages gathered in the pool's own layout, both products
        # as batched matmuls over the rows that read it as is, the query block-diagonal over
        # the K KV heads (K x the multiply-adds, but no transposing copy of the gathered
        # pages: that copy, fused with the gather, cost more than the attention itself)
        k_BSD = k_LPSKH[layer, page_table_BP].reshape(B, P * page_size, K * H)
        v_BSD = v_LPSKH[layer, page_table_BP].reshape(B, P * page_size, K * H)
        N = q_BTNH.shape[2]
        eye_KK = jnp.eye(K, dtype=k_BSD.dtype)
        q_BDN = jnp.einsum("bkgh,kj->bkhjg", q_BTNH[:, 0].reshape(B, K, N // K, H).astype(
            k_BSD.dtype), eye_KK).reshape(B, K * H, N)  # column (j, g) is zero outside rows of j
        logits_BSN = jnp.einsum("bsd,bdn->bsn", k_BSD, q_BDN,
                                preferred_element_type=jnp.float32) * H ** -0.5
        live_BS = jnp.arange(P * page_size)[None, :] <= positions_BT
        logits_BSN = jnp.where(live_BS[:, :, None], logits_BSN, -1e30)
        probs_BSN = jax.nn.softmax(logits_BSN, axis=1).astype(v_BSD.dtype)
        o_BNKH = jnp.einsum("bsn,bsd->bnd", probs_BSN, v_BSD,
                            preferred_element_type=jnp.float32).reshape(B, N, K, H)
        # head n = (k, g) keeps its own KV head's block
        o_BNH = jnp.einsum("bkgjh,kj->bkgh", o_BNKH.reshape(B, K, N // K, K, H), eye_KK.astype(
            o_BNKH.dtype)).reshape(B, N, H)
        return o_BNH[:, None].astype(q_BTNH.dtype), (k_LPSKH, v_LPSKH)
    T = q_BTNH.shape[1]

    def over_pages(_):
        k_BSKH = k_LPSKH[layer, page_table_BP].reshape(B, P * page_size, K, H).astype(q_BTNH.dtype)
        v_BSKH = v_LPSKH[layer, page_table_BP].reshape(B, P * page_size, K, H).astype(q_BTNH.dtype)
        return attention(q_BTNH, k_BSKH, v_BSKH, q_positions_BT=positions_BT,
                         kv_positions_BS=jnp.arange(P * page_size)[None, :], causal=True,
                         impl=impl)

    if T == 1 or T >= P * page_size:
        return over_pages(None), (k_LPSKH, v_LPSKH)

    def over_chunk(_):  # the keys at positions <= a query's are exactly this call's tokens
        kv_positions_BT = jnp.where(positions_BT >= 0, positions_BT, jnp.iinfo(jnp.int32).max)
        k_BTKH_, v_BTKH_ = (x.astype(k_LPSKH.dtype).astype(q_BTNH.dtype) for x in (k_BTKH, v_BTKH))
        return attention(q_BTNH, k_BTKH_, v_BTKH_,
                         q_positions_BT=positions_BT, kv_positions_BS=kv_positions_BT,
                         causal=True, impl=impl)

    def per_row(_):  # each row's numbers never depend on its neighbours (batch invariance)
        return jnp.where(first_B[:, None, None, None], over_chunk(None), over_pages(None))

    # a row that starts its sequence (each token's position is its index in the chunk, padding
    # < 0) attends over its own T keys, not the P x page_size of its pages; a call of only such
    # rows (a prompt's first prefill chunk) reads no pages at all
    first_B = jnp.all((positions_BT == jnp.arange(T)[None, :]) | (positions_BT < 0), axis=1)
    o_BTNH = jax.lax.cond(jnp.all(first_B), over_chunk, per_row, None)
    return o_BTNH, (k_LPSKH, v_LPSKH)


# ----------------------------------------------------------------------------- mixture of experts


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
        S = cfg.n_shared_experts * F
        specs["shared_w_gate"] = ParamSpec((L, D, S), ("layers", "embed", "mlp"), "normal")
        specs["shared_w_up"] = ParamSpec((L, D, S), ("layers", "embed", "mlp"), "normal")
        specs["shared_w_down"] = ParamSpec((L, S, D), ("layers", "mlp", "embed"), "normal")
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
    logits (Mixtral). Within a row, an expert takes tokens up to its capacity C (`moe_capacity`),
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
    logits_BTE = _constrain(rules, logits_BTE, ("batch", "seq", "router"))
    top_logits_BTK, expert_BTK = jax.lax.top_k(logits_BTE, K)
    weights_BTK = jax.nn.softmax(top_logits_BTK, axis=-1)
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
        from lmsys.parallel.moe import expert_parallel

        x_EBCD = _constrain(rules, x_EBCD, (None, "batch", None, None))  # each row's slots stay home
        y_EBCD = expert_parallel(_experts_swiglu, x_EBCD, weights, rules=rules)
    else:
        y_EBCD = _experts_swiglu(x_EBCD, *weights, rules)
    y_EBCD = _constrain(rules, y_EBCD, (None, "batch", None, None))
    out_BTD = jnp.einsum("btec,ebcd->btd", combine_BTEC.astype(dtype), y_EBCD)
    if cfg.n_shared_experts:
        out_BTD = out_BTD + _swiglu(h_BTD, lp["shared_w_gate"], lp["shared_w_up"], lp["shared_w_down"], rules)

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


def _experts_swiglu(x_EBCD, w_gate_EDF, w_up_EDF, w_down_EFD, rules):
    gate_EBCF = jnp.einsum("ebcd,edf->ebcf", x_EBCD, w_gate_EDF)
    up_EBCF = jnp.einsum("ebcd,edf->ebcf", x_EBCD, w_up_EDF)
    hidden_EBCF = _constrain(rules, jax.nn.silu(gate_EBCF) * up_EBCF, ("experts", "batch", None, "mlp"))
    return jnp.einsum("ebcf,efd->ebcd", hidden_EBCF, w_down_EFD)


def _swiglu(h_BTD, w_gate_DF, w_up_DF, w_down_FD, rules):
    gate_BTF = jnp.einsum("btd,df->btf", h_BTD, w_gate_DF)
    up_BTF = jnp.einsum("btd,df->btf", h_BTD, w_up_DF)
    hidden_BTF = _constrain(rules, jax.nn.silu(gate_BTF) * up_BTF, ("batch", "seq", "mlp"))
    return jnp.einsum("btf,fd->btd", hidden_BTF, w_down_FD)


def _gather_layer(lp, cfg: ModelConfig, rules, dtype):
    """One layer's parameters in the compute dtype, all-gathered over `fsdp` (still split over
    tensor/expert). Inside a rematerialized layer this is the one gather per pass that the
    recomputed forward and the backward share, and its transpose is one reduce-scatter of the
    gradients in the compute dtype; left implicit, the partitioner gathers per matmul use."""
    axes = jax.tree.map(lambda a: a[1:], param_axes(cfg)["layers"], is_leaf=lambda t: isinstance(t, tuple))
    return jax.tree.map(lambda w, a: fsdp_gather(w, rules, a), materialize(lp, dtype), axes,
                        is_leaf=lambda t: isinstance(t, tuple))


def fsdp_gather(w, rules, axes):
    """`w` (laid out by the rule table under logical `axes`) all-gathered over `fsdp`; its
    gradient is pinned back to the fsdp-split layout right away, which the partitioner turns
    into a reduce-scatter (not an all-reduce of the whole gradient and a slice)."""
    gathered = rules.without(("fsdp",))

    @jax.custom_vjp
    def gather(w):
        return gathered.constrain(w, axes)

    def fwd(w):
        return gather(w), None

    def bwd(_, g):
        return (rules.constrain(g, axes),)

    gather.defvjp(fwd, bwd)
    return gather(w)


def embed_lookup(embed_VD, tokens_BT, rules=None):
    """The rows of the table for `tokens_BT`, laid out [batch, seq, d_model] like the activations.

    With the table's d_model split over `fsdp` (ZeRO-3), the table never moves: the token ids are
    all-gathered over fsdp (4 bytes a token), each device looks up every row of its fsdp group
    in its own d_model slice, and an all-to-all hands each device its batch rows whole. The
    gradient takes the same way back and lands in the table's own slice with no reduce-scatter
    (gathering the table instead costs the whole table in each direction).
    """
    if rules is None or rules.mesh.shape.get("fsdp", 1) == 1:
        return _constrain(rules, embed_VD[tokens_BT], ("batch", "seq", None))
    group = dataclasses.replace(rules, table={**rules.table, "batch": tuple(
        a for a in rules.table["batch"] if a != "fsdp")})
    tokens_BT = group.constrain(tokens_BT, ("batch", "seq"))
    x_BTD = group.constrain(embed_VD[tokens_BT], ("batch", "seq", "embed"))
    return rules.constrain(x_BTD, ("batch", "seq", None))


def _layer(x_BTD, lp, kv, layer, *, cfg, rules, positions_BT, segment_ids_BT, inv_freq,
           page_table_BP, gather: bool = False):
    """One decoder block; `kv` is the (k, v) page pool of all layers, or None. Returns
    (x_BTD, kv, moe_stats): `moe_mlp`'s router statistics, None for a dense MLP. `gather`: all-gather
    the layer's fsdp-split parameters once up front (`_gather_layer`)."""
    dtype = x_BTD.dtype
    lp = _gather_layer(lp, cfg, rules, dtype) if gather else materialize(lp, dtype)
    act = ("batch", "seq", None)

    h_BTD = rms_norm(x_BTD, lp["attn_norm"], cfg.norm_eps)
    q_BTNH = jnp.einsum("btd,dnh->btnh", h_BTD, lp["wq"])
    k_BTKH = jnp.einsum("btd,dkh->btkh", h_BTD, lp["wk"])
    v_BTKH = jnp.einsum("btd,dkh->btkh", h_BTD, lp["wv"])
    if cfg.qkv_bias:
        q_BTNH, k_BTKH, v_BTKH = q_BTNH + lp["bq"], k_BTKH + lp["bk"], v_BTKH + lp["bv"]
    if cfg.qk_norm:  # per head, over head_dim, before RoPE (HF Qwen3Attention)
        q_BTNH = rms_norm(q_BTNH, lp["q_norm"], cfg.norm_eps)
        k_BTKH = rms_norm(k_BTKH, lp["k_norm"], cfg.norm_eps)
    q_BTNH = _constrain(rules, apply_rope(q_BTNH, positions_BT, inv_freq), ("batch", "seq", "heads", None))
    k_BTKH = _constrain(rules, apply_rope(k_BTKH, positions_BT, inv_freq), ("batch", "seq", "kv_heads", None))
    v_BTKH = _constrain(rules, v_BTKH, ("batch", "seq", "kv_heads", None))
    q_BTNH = checkpoint_name(q_BTNH, "q_proj")
    k_BTKH = checkpoint_name(k_BTKH, "k_proj")
    v_BTKH = checkpoint_name(v_BTKH, "v_proj")

    if kv is None and rules is not None and rules.mesh.shape.get("sequence", 1) > 1:
        from lmsys.parallel.context import context_parallel_attention

        o_BTNH = context_parallel_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, rules=rules)
    elif (kv is None and rules is not None and rules.mesh.size > 1
          and resolve_impl(cfg.attention_impl, rules.backend) == "pallas"):
        from lmsys.parallel.kernels import sharded_flash_attention

        o_BTNH = sharded_flash_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, rules=rules)
    elif kv is None:
        o_BTNH = attention(q_BTNH, k_BTKH, v_BTKH, q_segment_ids_BT=segment_ids_BT,
                           causal=True, impl=cfg.attention_impl,
                           backend=None if rules is None else rules.backend)
    else:
        o_BTNH, kv = _cached_attention(q_BTNH, k_BTKH, v_BTKH, kv, layer, page_table_BP,
                                       positions_BT, cfg.attention_impl, rules)
    attn_BTD = jnp.einsum("btnh,nhd->btd", o_BTNH, lp["wo"])
    x_BTD = x_BTD + checkpoint_name(_constrain(rules, attn_BTD, act), "attn_out")

    h_BTD = rms_norm(x_BTD, lp["mlp_norm"], cfg.norm_eps)
    moe_stats = None
    if cfg.n_experts:
        mlp_BTD, moe_stats = moe_mlp(h_BTD, lp, cfg=cfg, rules=rules)
    else:
        mlp_BTD = _swiglu(h_BTD, lp["w_gate"], lp["w_up"], lp["w_down"], rules)
    x_BTD = x_BTD + checkpoint_name(_constrain(rules, mlp_BTD, act), "mlp_out")
    return x_BTD, kv, moe_stats


def forward(params: dict, tokens_BT: jax.Array, positions_BT: jax.Array,
            segment_ids_BT: jax.Array | None = None, *, cfg: ModelConfig, rules=None,
            dtype=jnp.float32, remat: str = "none", cache: dict | None = None,
            logits: bool = True):
    """Logits [batch, seq, vocab] in float32, and an aux dict.

    segment_ids_BT: tokens of different documents in one row (packed sequences) never attend to
      each other; None means one document per row.
    rules: a lmsys.parallel.Rules to pin activation shardings (None: leave it to the compiler).
    dtype: the compute dtype (parameters are cast per layer; norms and softmax run in float32).
    remat: "none" | "full" | "selective" (see REMAT_POLICIES).
    cache: a KV cache: {"k", "v": [layers, pages, page_size, kv_heads, head_dim],
      "page_table": [batch, pages_per_row] int32}. Row b's token at position p lives in page
      page_table[b, p // page_size], slot p % page_size. This call's keys/values are written at
      `positions_BT` (a position < 0 marks a padding token: nothing is written), then each query
      attends to its row's slots at positions <= its own (segment ids are not used with a
      cache). The updated cache is returned as aux["cache"]. `init_cache` makes a contiguous
      one; lmsys.serve manages a shared pool.
    With `cfg.n_experts` > 0, aux also holds "moe_aux_loss" and "moe_z_loss" (`router_losses`
      of each layer over all the call's tokens, summed over the layers; float32 scalars).
    logits: False skips the output projection: the first result is then the final-normed hidden
      states [batch, seq, d_model] in the compute dtype, which `unembed` turns into the logits.
    """
    inv_freq = rope_frequencies(cfg)
    x_BTD = embed_lookup(params["embed"].astype(dtype), tokens_BT, rules)
    page_table_BP = None if cache is None else cache["page_table"]

    # Under remat, gather each layer's fsdp shards explicitly once per pass (without remat the
    # gathered weights would be kept for the backward: the partitioner re-gathers instead).
    gather = cache is None and remat != "none" and rules is not None and rules.mesh.shape.get("fsdp", 1) > 1
    remat_layer = None  # wraps one layer for the backward pass
    if remat != "none":
        remat_layer = partial(jax.checkpoint, policy=REMAT_POLICIES[remat], prevent_cse=False)

    def body(carry, scanned):
        x, kv = carry
        lp, layer = scanned
        x, kv, moe_stats = _layer(x, lp, kv, layer, cfg=cfg, rules=rules, positions_BT=positions_BT,
                                  segment_ids_BT=segment_ids_BT, inv_freq=inv_freq,
                                  page_table_BP=page_table_BP, gather=gather)
        return (x, kv), moe_stats

    if remat_layer is not None:
        body = remat_layer(body)
    kv = None if cache is None else (cache["k"], cache["v"])
    if cache is None and rules is not None and rules.mesh.shape.get("stage", 1) > 1:
        from lmsys.parallel.pipeline import pipeline

        def block(x, lp, pos_BT, seg_BT, stage_rules):  # one layer inside a pipeline stage
            x, _, moe_stats = _layer(x, lp, None, 0, cfg=cfg, rules=stage_rules, positions_BT=pos_BT,
                                     segment_ids_BT=seg_BT, inv_freq=inv_freq, page_table_BP=None,
                                     gather=gather)
            return x, moe_stats

        x_BTD, moe_stats_L = pipeline(block, params["layers"], x_BTD, positions_BT, segment_ids_BT,
                                      rules=rules, remat=remat_layer)
    else:
        (x_BTD, kv), moe_stats_L = jax.lax.scan(body, (x_BTD, kv),
                                                (params["layers"], jnp.arange(cfg.n_layers)))

    x_BTD = rms_norm(x_BTD, params["final_norm"].astype(dtype), cfg.norm_eps)
    aux = {}
    if cfg.n_experts:  # summed over the layers
        losses_L2 = jax.vmap(partial(router_losses, cfg=cfg))(moe_stats_L)
        aux["moe_aux_loss"], aux["moe_z_loss"] = jnp.sum(losses_L2, axis=0)
    if cache is not None:
        aux["cache"] = {"k": kv[0], "v": kv[1], "page_table": page_table_BP}
    return (unembed(params, x_BTD, cfg=cfg, rules=rules, dtype=dtype) if logits else x_BTD), aux


def unembed(params: dict, x_BTD: jax.Array, *, cfg: ModelConfig, rules=None, dtype=jnp.float32):
    """Logits [batch, seq, vocab] in float32 of final-normed hidden states (`forward`'s output
    projection)."""
    logits_BTV = jnp.einsum("btd,dv->btv", x_BTD, unembed_weight(params, cfg=cfg, dtype=dtype),
                            preferred_element_type=jnp.float32)
    return _constrain(rules, logits_BTV, ("batch", "seq", "vocab"))


def unembed_weight(params: dict, *, cfg: ModelConfig, dtype=jnp.float32):
    """The output projection [d_model, vocab] in the compute dtype (the embedding's transpose
    when tied); `unembed(params, x)` is x @ unembed_weight(params)."""
    return materialize(params["embed"].T if cfg.tie_embeddings else params["unembed"], dtype)
