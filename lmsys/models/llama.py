"""A Llama-family decoder as pure functions over a dict of arrays.

    params = init(key, cfg)                       # float32, layers stacked on a leading axis
    logits_BTV, aux = forward(params, tokens_BT, positions_BT, segment_ids_BT, cfg=cfg)

RMSNorm, RoPE (with Llama-3 or linear frequency scaling), grouped-query attention, SwiGLU, tied or
untied embeddings, optional qkv bias, optional per-head q/k RMSNorm (Qwen3), and with `n_experts`
> 0 a Mixtral/DeepSeek/Qwen-MoE-style mixture-of-experts MLP (lmsys.models.moe; its router losses
come back in aux). Sliding-window layers (all, or mixed with global ones, each kind with its own
RoPE base) and Gemma 2/3's block (GeGLU, norms on the attention and MLP outputs, (1 + w) norms,
scaled embeddings and queries, soft caps) are config options of the same block. The layer's attention is one call, lmsys.models.attention.layer_attention (mesh, backend
and KV-cache routing live there). Each parameter's shape and logical axes are declared once, in
`param_specs`; the rule table in lmsys.parallel turns the axes into shardings.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from lmsys.config import ModelConfig
from lmsys.models import lora
from lmsys.models.attention import attention_options, is_global_layer, layer_attention
from lmsys.models.common import ParamSpec, constrain, swiglu
from lmsys.models.moe import moe_mlp, moe_param_specs, router_losses
from lmsys.parallel.fsdp import embed_lookup, fsdp_gather
from lmsys.parallel.pipeline import pipeline


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
    if cfg.post_norms:  # Gemma: on the attention and MLP outputs, before the residual add
        layers["post_attn_norm"] = ParamSpec((L, D), ("layers", "norm"), "ones")
        layers["post_mlp_norm"] = ParamSpec((L, D), ("layers", "norm"), "ones")
    specs = {
        "embed": ParamSpec((V, D), ("vocab", "embed"), "normal"),
        "layers": layers,
        "final_norm": ParamSpec((D,), ("norm",), "ones"),
    }
    if not cfg.tie_embeddings:
        specs["unembed"] = ParamSpec((D, V), ("embed", "vocab"), "normal")
    if cfg.norm_plus_one:  # norms apply 1 + w: w starts at 0
        specs = jax.tree.map(lambda s: s._replace(init="zeros") if s.init == "ones" else s, specs,
                             is_leaf=_is_spec)
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
    for attention scores and values (PaLM appendix B; a windowed layer's seq_len is at most
    its window). The embedding lookup is no matmul; the
    output projection is (tied or not)."""
    matmul_params = count_params(cfg) - cfg.vocab_size * cfg.d_model * (0 if cfg.tie_embeddings else 1)
    matmul_params -= cfg.d_model * ((4 if cfg.post_norms else 2) * cfg.n_layers + 1)  # norms
    matmul_params -= 2 * cfg.n_layers * cfg.head_dim if cfg.qk_norm else 0
    if cfg.n_experts:  # each token runs experts_per_token of the n_experts routed experts
        routed = 3 * cfg.n_layers * cfg.n_experts * cfg.d_model * (cfg.moe_d_ff or cfg.d_ff)
        matmul_params -= routed * (cfg.n_experts - cfg.experts_per_token) // cfg.n_experts
    # a windowed layer's queries see at most `sliding_window` keys
    context = sum(seq_len if is_global_layer(cfg, i) else min(seq_len, cfg.sliding_window)
                  for i in range(cfg.n_layers))
    return 6.0 * matmul_params + 12.0 * cfg.n_heads * cfg.head_dim * context


# ----------------------------------------------------------------------------- building blocks


def rms_norm(x_BTD: jax.Array, w_D: jax.Array, eps: float, plus_one: bool = False) -> jax.Array:
    """RMSNorm in float32, scaled by w (or 1 + w: Gemma's `norm_plus_one`)."""
    x = x_BTD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return (x * (w_D.astype(jnp.float32) + (1.0 if plus_one else 0.0))).astype(x_BTD.dtype)


def rope_frequencies(cfg: ModelConfig, local: bool = False) -> jax.Array:
    """Inverse frequencies [head_dim/2] of base rope_theta (`local`: of the windowed layers mixed
    with global ones, base rope_local_theta, unscaled), divided by rope_linear_factor if set, or
    with Llama-3 scaling when rope_scaling_factor > 0: long wavelengths are divided by the factor,
    short ones kept, the band between blended."""
    H = cfg.head_dim
    theta = (cfg.rope_local_theta or cfg.rope_theta) if local else cfg.rope_theta
    inv_freq = 1.0 / (theta ** (jnp.arange(0, H, 2, dtype=jnp.float32) / H))
    if cfg.rope_linear_factor and not local:
        return inv_freq / cfg.rope_linear_factor
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


CAPTURES = ("residual", "attn", "mlp")  # what `forward(capture=...)` can return per layer

REMAT_POLICIES = {
    "full": None,  # save nothing inside a layer; recompute it all in the backward pass
    # keep the attention projections and block outputs; recompute softmax and the MLP interior
    "selective": jax.checkpoint_policies.save_only_these_names(
        "q_proj", "k_proj", "v_proj", "attn_out", "mlp_out"),
}


def _is_quantized(w) -> bool:
    return hasattr(w, "qvalue")  # a qwix QArray (lmsys.models.quantize)


def materialize(tree, dtype):
    """Parameters in the compute dtype; quantized ones are dequantized first."""
    def one(w):
        if _is_quantized(w):
            import qwix

            w = qwix.dequantize(w)
        return w.astype(dtype)

    return jax.tree.map(one, tree, is_leaf=_is_quantized)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    """A KV cache for `batch` rows of up to `max_len` tokens: the paged layout (see `forward`)
    with one page of `max_len` slots per row."""
    return {"k": jnp.zeros((cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim), dtype),
            "v": jnp.zeros((cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim), dtype),
            "page_table": jnp.arange(batch, dtype=jnp.int32)[:, None]}


def _layer_axes(cfg: ModelConfig) -> dict:
    return jax.tree.map(lambda a: a[1:], param_axes(cfg)["layers"], is_leaf=lambda t: isinstance(t, tuple))


def _gather_layer(lp, cfg: ModelConfig, rules, dtype):
    """One layer's parameters in the compute dtype, all-gathered over `fsdp` (still split over
    tensor/expert). Inside a rematerialized layer this is the one gather per pass that the
    recomputed forward and the backward share, and its transpose is one reduce-scatter of the
    gradients in the compute dtype; left implicit, the partitioner gathers per matmul use."""
    return jax.tree.map(lambda w, a: fsdp_gather(w, rules, a), materialize(lp, dtype), _layer_axes(cfg),
                        is_leaf=lambda t: isinstance(t, tuple))


def _layer(x_BTD, lp, kv, layer, *, cfg, rules, positions_BT, segment_ids_BT, inv_freq,
           page_table_BP, gather: bool = False):
    """One decoder block; `kv` is the (k, v) page pool of all layers, or None. Returns
    (x_BTD, kv, moe_stats, acts): `moe_mlp`'s router statistics, None for a dense MLP; `acts` the
    block's outputs `forward(capture=...)` can return ("attn", "mlp": what each adds to the
    residual stream; "residual": the stream after the block). `gather`: all-gather the layer's
    fsdp-split parameters once up front (`_gather_layer`)."""
    dtype = x_BTD.dtype
    lp, ad = lora.split_layer(lp)  # the low-rank adapters (lmsys.models.lora), if any
    ad = lora.prepare(ad, dtype, _layer_axes(cfg), rules if gather else None)
    lp = _gather_layer(lp, cfg, rules, dtype) if gather else materialize(lp, dtype)
    act = ("batch", "seq", None)

    if inv_freq.ndim == 2:  # [global, windowed] RoPE bases (Gemma 3)
        inv_freq = jnp.where(is_global_layer(cfg, layer), inv_freq[0], inv_freq[1])
    h_BTD = rms_norm(x_BTD, lp["attn_norm"], cfg.norm_eps, cfg.norm_plus_one)
    q_BTNH = lora.add(jnp.einsum("btd,dnh->btnh", h_BTD, lp["wq"]), ad, "wq", h_BTD)
    k_BTKH = lora.add(jnp.einsum("btd,dkh->btkh", h_BTD, lp["wk"]), ad, "wk", h_BTD)
    v_BTKH = lora.add(jnp.einsum("btd,dkh->btkh", h_BTD, lp["wv"]), ad, "wv", h_BTD)
    if cfg.qkv_bias:
        q_BTNH, k_BTKH, v_BTKH = q_BTNH + lp["bq"], k_BTKH + lp["bk"], v_BTKH + lp["bv"]
    if cfg.qk_norm:  # per head, over head_dim, before RoPE (HF Qwen3Attention)
        q_BTNH = rms_norm(q_BTNH, lp["q_norm"], cfg.norm_eps, cfg.norm_plus_one)
        k_BTKH = rms_norm(k_BTKH, lp["k_norm"], cfg.norm_eps, cfg.norm_plus_one)
    q_BTNH = constrain(rules, apply_rope(q_BTNH, positions_BT, inv_freq), ("batch", "seq", "heads", None))
    k_BTKH = constrain(rules, apply_rope(k_BTKH, positions_BT, inv_freq), ("batch", "seq", "kv_heads", None))
    v_BTKH = constrain(rules, v_BTKH, ("batch", "seq", "kv_heads", None))
    q_BTNH = checkpoint_name(q_BTNH, "q_proj")
    k_BTKH = checkpoint_name(k_BTKH, "k_proj")
    v_BTKH = checkpoint_name(v_BTKH, "v_proj")

    o_BTNH, kv = layer_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT=segment_ids_BT,
                                 positions_BT=positions_BT, kv=kv, layer=layer,
                                 page_table_BP=page_table_BP, impl=cfg.attention_impl, rules=rules,
                                 **attention_options(cfg, layer))
    attn_BTD = lora.add(jnp.einsum("btnh,nhd->btd", o_BTNH, lp["wo"]), ad, "wo", o_BTNH)
    if cfg.post_norms:
        attn_BTD = rms_norm(attn_BTD, lp["post_attn_norm"], cfg.norm_eps, cfg.norm_plus_one)
    x_BTD = x_BTD + checkpoint_name(constrain(rules, attn_BTD, act), "attn_out")

    h_BTD = rms_norm(x_BTD, lp["mlp_norm"], cfg.norm_eps, cfg.norm_plus_one)
    moe_stats = None
    if cfg.n_experts:
        mlp_BTD, moe_stats = moe_mlp(h_BTD, lp, cfg=cfg, rules=rules)
    else:
        mlp_BTD = swiglu(h_BTD, lp["w_gate"], lp["w_up"], lp["w_down"], rules, ad, cfg.mlp_act)
    if cfg.post_norms:
        mlp_BTD = rms_norm(mlp_BTD, lp["post_mlp_norm"], cfg.norm_eps, cfg.norm_plus_one)
    x_BTD = x_BTD + checkpoint_name(constrain(rules, mlp_BTD, act), "mlp_out")
    return x_BTD, kv, moe_stats, {"attn": attn_BTD, "mlp": mlp_BTD, "residual": x_BTD}


def forward(params: dict, tokens_BT: jax.Array, positions_BT: jax.Array,
            segment_ids_BT: jax.Array | None = None, *, cfg: ModelConfig, rules=None,
            dtype=jnp.float32, remat: str = "none", cache: dict | None = None,
            logits: bool = True, capture: tuple[str, ...] = ()):
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
    capture: per-layer activations to return as aux["captured"][name], each [layers, batch, seq,
      d_model] in the compute dtype: "residual" (the residual stream after each block), "attn"
      (each block's attention output, before it is added), "mlp" (each block's MLP output).
      Empty (the default): the traced program is exactly the one without capture.
    """
    if unknown := set(capture) - set(CAPTURES):
        raise ValueError(f"capture: unknown activations {sorted(unknown)}; one of {CAPTURES}")
    inv_freq = rope_frequencies(cfg)
    if cfg.global_every and (cfg.rope_local_theta or cfg.rope_linear_factor):
        inv_freq = jnp.stack([inv_freq, rope_frequencies(cfg, local=True)])  # each layer its row
    x_BTD = embed_lookup(params["embed"].astype(dtype), tokens_BT, rules)
    if cfg.embed_scale:  # Gemma: x sqrt(d_model), rounded to the compute dtype first
        x_BTD = x_BTD * jnp.asarray(cfg.d_model ** 0.5, dtype)
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
        x, kv, moe_stats, acts = _layer(x, lp, kv, layer, cfg=cfg, rules=rules, positions_BT=positions_BT,
                                        segment_ids_BT=segment_ids_BT, inv_freq=inv_freq,
                                        page_table_BP=page_table_BP, gather=gather)
        return (x, kv), (moe_stats, {name: acts[name] for name in capture})

    if remat_layer is not None:
        body = remat_layer(body)
    kv = None if cache is None else (cache["k"], cache["v"])
    if cache is None and rules is not None and rules.mesh.shape.get("stage", 1) > 1:
        if capture:
            raise ValueError("capture is not supported with pipeline stages")
        def block(x, lp, pos_BT, seg_BT, stage_rules):  # one layer inside a pipeline stage
            x, _, moe_stats, _ = _layer(x, lp, None, 0, cfg=cfg, rules=stage_rules, positions_BT=pos_BT,
                                        segment_ids_BT=seg_BT, inv_freq=inv_freq, page_table_BP=None,
                                        gather=gather)
            return x, moe_stats

        x_BTD, moe_stats_L = pipeline(block, params["layers"], x_BTD, positions_BT, segment_ids_BT,
                                      rules=rules, remat=remat_layer)
    else:
        (x_BTD, kv), (moe_stats_L, captured) = jax.lax.scan(body, (x_BTD, kv),
                                                            (params["layers"], jnp.arange(cfg.n_layers)))

    x_BTD = rms_norm(x_BTD, params["final_norm"].astype(dtype), cfg.norm_eps, cfg.norm_plus_one)
    aux = {}
    if cfg.n_experts:  # summed over the layers
        losses_L2 = jax.vmap(partial(router_losses, cfg=cfg))(moe_stats_L)
        aux["moe_aux_loss"], aux["moe_z_loss"] = jnp.sum(losses_L2, axis=0)
    if cache is not None:
        aux["cache"] = {"k": kv[0], "v": kv[1], "page_table": page_table_BP}
    if capture:
        aux["captured"] = captured
    return (unembed(params, x_BTD, cfg=cfg, rules=rules, dtype=dtype) if logits else x_BTD), aux


def unembed(params: dict, x_BTD: jax.Array, *, cfg: ModelConfig, rules=None, dtype=jnp.float32):
    """Logits [batch, seq, vocab] in float32 of final-normed hidden states (`forward`'s output
    projection)."""
    logits_BTV = jnp.einsum("btd,dv->btv", x_BTD, unembed_weight(params, cfg=cfg, dtype=dtype),
                            preferred_element_type=jnp.float32)
    if cfg.final_soft_cap:  # Gemma 2
        logits_BTV = cfg.final_soft_cap * jnp.tanh(logits_BTV / cfg.final_soft_cap)
    return constrain(rules, logits_BTV, ("batch", "seq", "vocab"))


def unembed_weight(params: dict, *, cfg: ModelConfig, dtype=jnp.float32):
    """The output projection [d_model, vocab] in the compute dtype (the embedding's transpose
    when tied); `unembed(params, x)` is x @ unembed_weight(params)."""
    return materialize(params["embed"].T if cfg.tie_embeddings else params["unembed"], dtype)
