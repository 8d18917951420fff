"""Attention routing for a model layer: the one call a decoder block makes for its attention.

    o_BTNH, kv = layer_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT=..., positions_BT=...,
                                 kv=kv, layer=layer, page_table_BP=..., impl=..., rules=rules)

Every choice that depends on the mesh, the backend or a KV cache is made here, in this order:
  - with a KV cache (`kv`, the paged pool of all layers; serving): `_cached_attention` writes the
    call's keys/values into the pool and attends over each row's pages: the Pallas paged decode
    kernel (lmsys.kernels.paged_attention; per shard of the pool on a mesh,
    lmsys.parallel.sharded_kernels), the XLA:CPU decode path, the first prefill chunk over its
    own keys, or the pages gathered into a dense sequence;
  - without one, on a mesh with `sequence` > 1: context parallelism (lmsys.parallel.context);
  - on a mesh of several devices where `impl` resolves to "pallas": the flash kernel per shard
    (lmsys.parallel.sharded_kernels), since XLA cannot split a Pallas call;
  - else `lmsys.kernels.attention`: the per-device dispatch between the Pallas kernels, cuDNN
    and plain XLA.
Every path takes the layer's options (`attention_options`): the query scale, a logits soft cap
and a sliding window; with local and global layers mixed (Gemma) the window is chosen per layer
by `lax.cond` on the (scanned) layer index, so each kernel sees a static window.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from functools import partial

from lmsys.kernels import attention, paged_attention, resolve_impl
from lmsys.kernels.paged_attention import supported as paged_supported
from lmsys.parallel.context import context_parallel_attention
from lmsys.parallel.sharded_kernels import sharded_flash_attention, sharded_paged_attention


def is_global_layer(cfg, layer):
    """Whether `layer` (an int or a traced index) attends over the whole sequence: every layer
    without a window, none with a window and no `global_every`, else every global_every-th."""
    if not cfg.sliding_window:
        return True
    if not cfg.global_every:
        return False
    return (layer + 1) % cfg.global_every == 0


def attention_options(cfg, layer) -> dict:
    """`layer_attention`'s options for this layer of a model config: the query scale
    (query_pre_attn_scalar^-0.5, default head_dim^-0.5), the logits soft cap and the window (with
    `global_layer`, a traced bool, when windowed and global layers are mixed)."""
    scale = float(cfg.query_pre_attn_scalar) ** -0.5 if cfg.query_pre_attn_scalar else None
    options = dict(sm_scale=scale, logits_soft_cap=cfg.attn_soft_cap or None,
                   sliding_window=cfg.sliding_window or None, global_layer=None)
    if cfg.sliding_window and cfg.global_every:
        options["global_layer"] = is_global_layer(cfg, layer)
    return options


def layer_attention(q_BTNH, k_BTKH, v_BTKH, *, segment_ids_BT, positions_BT, kv, layer,
                    page_table_BP, impl: str, rules=None, sm_scale=None, logits_soft_cap=None,
                    sliding_window=None, global_layer=None):
    """Causal attention of one layer's queries, out [batch, seq, heads, head_dim], and the KV
    pool `kv` with this call's keys/values written (None without a cache; see
    lmsys.models.llama.forward for the cache layout). `rules`: the rule table of the mesh the
    call is laid out on (None: one device, JAX's default backend). sm_scale, logits_soft_cap,
    sliding_window: as in lmsys.kernels.attention (`attention_options`); global_layer: a traced
    bool that, when true, drops the window (this layer attends globally)."""
    if sliding_window is not None and global_layer is not None:
        def one(window):
            return layer_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT=segment_ids_BT,
                                   positions_BT=positions_BT, kv=kv, layer=layer,
                                   page_table_BP=page_table_BP, impl=impl, rules=rules,
                                   sm_scale=sm_scale, logits_soft_cap=logits_soft_cap,
                                   sliding_window=window)
        return jax.lax.cond(global_layer, partial(one, None), partial(one, sliding_window))
    options = dict(sm_scale=sm_scale, sliding_window=sliding_window, logits_soft_cap=logits_soft_cap)
    if kv is not None:
        return _cached_attention(q_BTNH, k_BTKH, v_BTKH, kv, layer, page_table_BP, positions_BT,
                                 impl, rules, options)
    if rules is not None and rules.mesh.shape.get("sequence", 1) > 1:
        o_BTNH = context_parallel_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, rules=rules,
                                            **options)
    elif rules is not None and rules.mesh.size > 1 and resolve_impl(impl, rules.backend) == "pallas":
        o_BTNH = sharded_flash_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, rules=rules,
                                         **options)
    else:
        o_BTNH = attention(q_BTNH, k_BTKH, v_BTKH, q_segment_ids_BT=segment_ids_BT, causal=True,
                           impl=impl, backend=None if rules is None else rules.backend, **options)
    return o_BTNH, None


def _cached_attention(q_BTNH, k_BTKH, v_BTKH, kv, layer, page_table_BP, positions_BT, impl,
                      rules=None, options=None):
    """Writes this call's keys/values into the paged pool of `layer` and attends over each
    row's pages. Tokens at position < 0 are padding: their writes are dropped. A decode step
    (one token per row) with impl resolving to "pallas" runs the paged kernel where it reads the
    pool in place (GPU with a power-of-two head_dim, TPU; CPU interpret; on a mesh per shard of
    the pool, lmsys.parallel.sharded_kernels); on XLA:CPU a decode step gathers the pages in the
    pool's layout and attends with two batched matmuls (`_cpu_decode_attention`); else the pages
    are gathered into a dense sequence for `attention`. A call whose every row holds the first
    tokens of its sequence (a prompt's first prefill chunk) attends over its own keys. With a
    sliding window, the decode kernel skips the pages wholly before each row's window."""
    options = options or {}
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
            o_BNH = sharded_paged_attention(q_BTNH[:, 0], k_LPSKH, v_LPSKH, lengths_B,
                                            page_table_BP, layer=layer, rules=rules, **options)
        else:
            o_BNH = paged_attention(q_BTNH[:, 0], k_LPSKH, v_LPSKH, lengths_B, page_table_BP,
                                    layer=layer, **options)
        return o_BNH[:, None], (k_LPSKH, v_LPSKH)
    K, H = k_LPSKH.shape[3], k_LPSKH.shape[4]
    backend = jax.default_backend() if rules is None else rules.backend
    if q_BTNH.shape[1] == 1 and backend == "cpu" and (
            rules is None or not rules.spec(("kv_heads",), (K,))):
        o_BTNH = _cpu_decode_attention(q_BTNH, k_LPSKH, v_LPSKH, layer, page_table_BP, positions_BT,
                                       **options)
        return o_BTNH, (k_LPSKH, v_LPSKH)
    T = q_BTNH.shape[1]

    def over_pages(_):
        k_BSKH = k_LPSKH[layer, page_table_BP].reshape(B, P * page_size, K, H).astype(q_BTNH.dtype)
        v_BSKH = v_LPSKH[layer, page_table_BP].reshape(B, P * page_size, K, H).astype(q_BTNH.dtype)
        return attention(q_BTNH, k_BSKH, v_BSKH, q_positions_BT=positions_BT,
                         kv_positions_BS=jnp.arange(P * page_size)[None, :], causal=True,
                         impl=impl, **options)

    if T == 1 or T >= P * page_size:
        return over_pages(None), (k_LPSKH, v_LPSKH)

    def over_chunk(_):  # the keys at positions <= a query's are exactly this call's tokens
        kv_positions_BT = jnp.where(positions_BT >= 0, positions_BT, jnp.iinfo(jnp.int32).max)
        k_BTKH_, v_BTKH_ = (x.astype(k_LPSKH.dtype).astype(q_BTNH.dtype) for x in (k_BTKH, v_BTKH))
        return attention(q_BTNH, k_BTKH_, v_BTKH_,
                         q_positions_BT=positions_BT, kv_positions_BS=kv_positions_BT,
                         causal=True, impl=impl, **options)

    def per_row(_):  # each row's numbers never depend on its neighbours (batch invariance)
        return jnp.where(first_B[:, None, None, None], over_chunk(None), over_pages(None))

    # a row that starts its sequence (each token's position is its index in the chunk, padding
    # < 0) attends over its own T keys, not the P x page_size of its pages; a call of only such
    # rows (a prompt's first prefill chunk) reads no pages at all
    first_B = jnp.all((positions_BT == jnp.arange(T)[None, :]) | (positions_BT < 0), axis=1)
    o_BTNH = jax.lax.cond(jnp.all(first_B), over_chunk, per_row, None)
    return o_BTNH, (k_LPSKH, v_LPSKH)


def _cpu_decode_attention(q_BTNH, k_LPSKH, v_LPSKH, layer, page_table_BP, positions_BT, *,
                          sm_scale=None, sliding_window=None, logits_soft_cap=None):
    """A decode step (one query per row) on XLA:CPU over the written pool: each row's pages
    gathered in the pool's own layout, both products as batched matmuls over the rows that read
    it as is, the query block-diagonal over the K KV heads (K x the multiply-adds, but no
    transposing copy of the gathered pages: that copy, fused with the gather, cost more than the
    attention itself)."""
    page_size, K, H = k_LPSKH.shape[2], k_LPSKH.shape[3], k_LPSKH.shape[4]
    B, P = page_table_BP.shape
    k_BSD = k_LPSKH[layer, page_table_BP].reshape(B, P * page_size, K * H)
    v_BSD = v_LPSKH[layer, page_table_BP].reshape(B, P * page_size, K * H)
    N = q_BTNH.shape[2]
    eye_KK = jnp.eye(K, dtype=k_BSD.dtype)
    q_BDN = jnp.einsum("bkgh,kj->bkhjg", q_BTNH[:, 0].reshape(B, K, N // K, H).astype(
        k_BSD.dtype), eye_KK).reshape(B, K * H, N)  # column (j, g) is zero outside rows of j
    logits_BSN = jnp.einsum("bsd,bdn->bsn", k_BSD, q_BDN,
                            preferred_element_type=jnp.float32) * (sm_scale or H ** -0.5)
    if logits_soft_cap is not None:
        logits_BSN = logits_soft_cap * jnp.tanh(logits_BSN / logits_soft_cap)
    live_BS = jnp.arange(P * page_size)[None, :] <= positions_BT
    if sliding_window is not None:
        live_BS &= jnp.arange(P * page_size)[None, :] > positions_BT - sliding_window
    logits_BSN = jnp.where(live_BS[:, :, None], logits_BSN, -1e30)
    probs_BSN = jax.nn.softmax(logits_BSN, axis=1).astype(v_BSD.dtype)
    o_BNKH = jnp.einsum("bsn,bsd->bnd", probs_BSN, v_BSD,
                        preferred_element_type=jnp.float32).reshape(B, N, K, H)
    # head n = (k, g) keeps its own KV head's block
    o_BNH = jnp.einsum("bkgjh,kj->bkgh", o_BNKH.reshape(B, K, N // K, K, H), eye_KK.astype(
        o_BNKH.dtype)).reshape(B, N, H)
    return o_BNH[:, None].astype(q_BTNH.dtype)
