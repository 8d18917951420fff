"""A Llama-family decoder as pure functions over a dict of arrays.

    params = init(key, cfg)                       # float32, layers stacked on a leading axis
    logits_BTV, aux = forward(params, tokens_BT, positions_BT, segment_ids_BT, cfg=cfg)

RMSNorm, RoPE (with Llama-3 frequency scaling), grouped-query attention, SwiGLU, tied or untied
embeddings, optional qkv bias. Each parameter's shape and logical axes are declared once, in
`param_specs`; the rule table in lmsys.parallel turns the axes into shardings.
"""

from __future__ import annotations

import math
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
    if cfg.qkv_bias:
        layers["bq"] = ParamSpec((L, N, H), ("layers", "heads", "head_dim"), "zeros")
        layers["bk"] = ParamSpec((L, K, H), ("layers", "kv_heads", "head_dim"), "zeros")
        layers["bv"] = ParamSpec((L, K, H), ("layers", "kv_heads", "head_dim"), "zeros")
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


def _cached_attention(q_BTNH, k_BTKH, v_BTKH, kv, layer, page_table_BP, positions_BT, impl):
    """Writes this call's keys/values into the paged pool of `layer` and attends over each
    row's pages. Tokens at position < 0 are padding: their writes are dropped. A decode step
    (one token per row) with impl resolving to "pallas" runs the paged kernel (GPU, TPU; CPU
    interpret), else the pages are gathered into a dense sequence for `attention`."""
    from lmsys.kernels import paged_attention, resolve_impl
    from lmsys.kernels.paged_attention import supported_backend as paged_supported
    k_LPSKH, v_LPSKH = kv
    n_pages, page_size = k_LPSKH.shape[1], k_LPSKH.shape[2]
    B, P = page_table_BP.shape
    page_BT = jnp.take_along_axis(page_table_BP, jnp.clip(positions_BT // page_size, 0, P - 1), axis=1)
    page_BT = jnp.where(positions_BT >= 0, page_BT, n_pages)  # out of range: scatter drops it
    slot_BT = positions_BT % page_size
    k_LPSKH = k_LPSKH.at[layer, page_BT, slot_BT].set(k_BTKH.astype(k_LPSKH.dtype), mode="drop")
    v_LPSKH = v_LPSKH.at[layer, page_BT, slot_BT].set(v_BTKH.astype(v_LPSKH.dtype), mode="drop")
    if q_BTNH.shape[1] == 1 and resolve_impl(impl) == "pallas" and paged_supported():
        # decode: the kernel reads this layer's pages in place; row b sees positions <= its own
        lengths_B = jnp.maximum(positions_BT[:, 0] + 1, 0)
        o_BNH = paged_attention(q_BTNH[:, 0], k_LPSKH, v_LPSKH, lengths_B, page_table_BP,
                                layer=layer)
        return o_BNH[:, None], (k_LPSKH, v_LPSKH)
    K, H = k_LPSKH.shape[3], k_LPSKH.shape[4]
    k_BSKH = k_LPSKH[layer, page_table_BP].reshape(B, P * page_size, K, H).astype(q_BTNH.dtype)
    v_BSKH = v_LPSKH[layer, page_table_BP].reshape(B, P * page_size, K, H).astype(q_BTNH.dtype)
    o_BTNH = attention(q_BTNH, k_BSKH, v_BSKH, q_positions_BT=positions_BT,
                       kv_positions_BS=jnp.arange(P * page_size)[None, :], causal=True, impl=impl)
    return o_BTNH, (k_LPSKH, v_LPSKH)


def _layer(x_BTD, lp, kv, layer, *, cfg, rules, positions_BT, segment_ids_BT, inv_freq,
           page_table_BP):
    """One decoder block; `kv` is the (k, v) page pool of all layers, or None."""
    dtype = x_BTD.dtype
    lp = materialize(lp, dtype)
    act = ("batch", "seq", None)

    h_BTD = rms_norm(x_BTD, lp["attn_norm"], cfg.norm_eps)
    q_BTNH = jnp.einsum("btd,dnh->btnh", h_BTD, lp["wq"])
    k_BTKH = jnp.einsum("btd,dkh->btkh", h_BTD, lp["wk"])
    v_BTKH = jnp.einsum("btd,dkh->btkh", h_BTD, lp["wv"])
    if cfg.qkv_bias:
        q_BTNH, k_BTKH, v_BTKH = q_BTNH + lp["bq"], k_BTKH + lp["bk"], v_BTKH + lp["bv"]
    q_BTNH = _constrain(rules, apply_rope(q_BTNH, positions_BT, inv_freq), ("batch", "seq", "heads", None))
    k_BTKH = _constrain(rules, apply_rope(k_BTKH, positions_BT, inv_freq), ("batch", "seq", "kv_heads", None))
    v_BTKH = _constrain(rules, v_BTKH, ("batch", "seq", "kv_heads", None))
    q_BTNH = checkpoint_name(q_BTNH, "q_proj")
    k_BTKH = checkpoint_name(k_BTKH, "k_proj")
    v_BTKH = checkpoint_name(v_BTKH, "v_proj")

    if kv is None and rules is not None and rules.mesh.shape.get("sequence", 1) > 1:
        from lmsys.parallel.context import context_parallel_attention

        o_BTNH = context_parallel_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, rules=rules)
    elif kv is None and rules is not None and rules.mesh.size > 1 and resolve_impl(cfg.attention_impl) == "pallas":
        from lmsys.parallel.kernels import sharded_flash_attention

        o_BTNH = sharded_flash_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, rules=rules)
    elif kv is None:
        o_BTNH = attention(q_BTNH, k_BTKH, v_BTKH, q_segment_ids_BT=segment_ids_BT,
                           causal=True, impl=cfg.attention_impl)
    else:
        o_BTNH, kv = _cached_attention(q_BTNH, k_BTKH, v_BTKH, kv, layer, page_table_BP,
                                       positions_BT, cfg.attention_impl)
    attn_BTD = jnp.einsum("btnh,nhd->btd", o_BTNH, lp["wo"])
    x_BTD = x_BTD + checkpoint_name(_constrain(rules, attn_BTD, act), "attn_out")

    h_BTD = rms_norm(x_BTD, lp["mlp_norm"], cfg.norm_eps)
    gate_BTF = jnp.einsum("btd,df->btf", h_BTD, lp["w_gate"])
    up_BTF = jnp.einsum("btd,df->btf", h_BTD, lp["w_up"])
    hidden_BTF = _constrain(rules, jax.nn.silu(gate_BTF) * up_BTF, ("batch", "seq", "mlp"))
    mlp_BTD = jnp.einsum("btf,fd->btd", hidden_BTF, lp["w_down"])
    x_BTD = x_BTD + checkpoint_name(_constrain(rules, mlp_BTD, act), "mlp_out")
    return x_BTD, kv


def forward(params: dict, tokens_BT: jax.Array, positions_BT: jax.Array,
            segment_ids_BT: jax.Array | None = None, *, cfg: ModelConfig, rules=None,
            dtype=jnp.float32, remat: str = "none", cache: dict | None = None):
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
    """
    inv_freq = rope_frequencies(cfg)
    # Gather the table's FSDP shards before the lookup (a gather from an fsdp-split model dim
    # would be replicated whole by the partitioner); vocab stays split over `tensor`.
    embed_VD = _constrain(rules, params["embed"].astype(dtype), ("vocab", None))
    x_BTD = embed_VD[tokens_BT]
    x_BTD = _constrain(rules, x_BTD, ("batch", "seq", None))
    page_table_BP = None if cache is None else cache["page_table"]

    def body(carry, scanned):
        x, kv = carry
        lp, layer = scanned
        x, kv = _layer(x, lp, kv, layer, cfg=cfg, rules=rules, positions_BT=positions_BT,
                       segment_ids_BT=segment_ids_BT, inv_freq=inv_freq, page_table_BP=page_table_BP)
        return (x, kv), None

    if remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
    kv = None if cache is None else (cache["k"], cache["v"])
    (x_BTD, kv), _ = jax.lax.scan(body, (x_BTD, kv), (params["layers"], jnp.arange(cfg.n_layers)))

    x_BTD = rms_norm(x_BTD, params["final_norm"].astype(dtype), cfg.norm_eps)
    unembed_DV = params["embed"].T if cfg.tie_embeddings else params["unembed"]
    logits_BTV = jnp.einsum("btd,dv->btv", x_BTD, materialize(unembed_DV, dtype),
                            preferred_element_type=jnp.float32)
    logits_BTV = _constrain(rules, logits_BTV, ("batch", "seq", "vocab"))
    aux = {}
    if cache is not None:
        aux["cache"] = {"k": kv[0], "v": kv[1], "page_table": page_table_BP}
    return logits_BTV, aux
