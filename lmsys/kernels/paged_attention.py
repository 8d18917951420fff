"""Paged decode attention in Pallas: one query token per sequence over a paged KV pool.

    out_BNH = paged_attention(q_BNH, k_pages_PSKH, v_pages_PSKH, lengths_B, page_table_BP)

The pool is one layer of lmsys.serve.engine's page pool: [num_pages, page_size, kv_heads,
head_dim]; token t of row b lives in page `page_table_BP[b, t // page_size]`, slot
`t % page_size`, and row b attends to its first `lengths_B[b]` tokens (0: output zeros), with a `sliding_window` to
the last `window` of them (pages wholly before the window are never read). The
model passes all layers' pools [layers, num_pages, ...] and a (traced) `layer` instead, so the
kernel reads the layer's pages in place rather than a copied layer slice.

Split-K: each row's pages are cut into blocks of `pages_per_block`; the work of one (row,
block) walks the valid pages of the block one page at a time (online softmax, fp32) and writes a
partial result (unnormalized accumulator, running max, running sum); a plain-jnp combine
merges the blocks by their log-sum-exp. The G = heads / kv_heads query heads of a kv head are
one [G, head_dim] tile, so K/V are read once per kv head and never repeated. Pages past a row's
length are never read; slots past the length inside the last page are masked (keys and values,
so NaN there is harmless).

Page indirection, per backend (one kernel step `_page_step` shared):
  - GPU (Pallas Triton) and CPU (interpret): the whole pool of one kv head is the kernel's input
    block (a pointer on GPU); the program loops over its pages reading page ids from its slice of
    the page table (`k_ref[layer, page_id]`).
  - TPU (Mosaic): scalar prefetch (`PrefetchScalarGridSpec`: page table, lengths, layer) lets the
    K/V BlockSpec index maps DMA one page [page_size, kv_heads, head_dim] per grid step of a
    (row, block, page) grid; the outputs accumulate over the page axis. Past a row's last page
    the index map repeats the last page (no new DMA) and the step is skipped. Tests run it under
    `pltpu.force_tpu_interpret_mode()`.

int8 KV: pass `k_scales`/`v_scales` (float, [num_pages, page_size, kv_heads], or anything that
broadcasts to it, e.g. [num_pages, 1, 1] for per-page scales; with the layer axis, [layers, ...]);
key/value = int8 * scale. (The engine's pool is not int8 yet: the kernel side only.)

GPU: G is zero-padded to 16 rows and head_dim to a power of two >= 16 (Triton dot tiles;
a head_dim that needs padding copies the pool); page_size must be a power of two >= 16.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from lmsys.kernels.flash_attention_body import _NN, _NT, MASK_VALUE, _dot

BACKENDS = ("gpu", "tpu", "cpu")
DEFAULT_BLOCK_TOKENS = 512  # tokens (pages_per_block * page_size) per program, by default


@dataclasses.dataclass(frozen=True)
class _Cfg:
    scale: float
    page_size: int
    pages_per_block: int
    backend: str
    interpret: bool
    quantized: bool
    soft_cap: float | None = None


def _page_step(q_GH, k_SH, v_SH, ks_1S, vs_1S, valid_1S, valid_S1, carry, scale, soft_cap=None):
    """One page of online softmax (fp32). m, l in the carry are [G] (GPU) or [G, 1] (TPU)."""
    acc_GH, m, l = carry
    col = (lambda x: x) if m.ndim == 2 else (lambda x: x[:, None])
    s_GS = _dot(q_GH, k_SH.astype(q_GH.dtype), _NT) * scale
    if ks_1S is not None:
        s_GS = s_GS * ks_1S.astype(jnp.float32)
    if soft_cap is not None:
        s_GS = soft_cap * jnp.tanh(s_GS / soft_cap)
    s_GS = jnp.where(valid_1S, s_GS, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s_GS, axis=1, keepdims=m.ndim == 2))
    p_GS = jnp.exp(s_GS - col(m_new))
    alpha = jnp.exp(m - m_new)
    l_new = alpha * l + jnp.sum(p_GS, axis=1, keepdims=m.ndim == 2)
    if vs_1S is not None:
        p_GS = p_GS * vs_1S.astype(jnp.float32)
    v_SH = jnp.where(valid_S1, v_SH.astype(q_GH.dtype), 0)  # masked slots: no NaN * 0
    acc_new = col(alpha) * acc_GH + _dot(p_GS.astype(v_SH.dtype), v_SH, _NN)
    return acc_new, m_new, l_new


def _kernel(*refs, c: _Cfg):
    """GPU / CPU: one (row, kv head, block of pages) per program, a loop over its pages."""
    if c.quantized:
        q_ref, k_ref, v_ref, ks_ref, vs_ref, pt_ref, len_ref, layer_ref, o_ref, m_ref, l_ref = refs
    else:
        q_ref, k_ref, v_ref, pt_ref, len_ref, layer_ref, o_ref, m_ref, l_ref = refs
        ks_ref = vs_ref = None
    layer = layer_ref[0]
    ps = c.page_size
    q_GH = q_ref[...]
    length, start = len_ref[0], len_ref[1]  # row b sees positions [start, length)
    first_page = pl.program_id(2) * c.pages_per_block
    n_pages = jnp.clip(pl.cdiv(length, ps) - first_page, 0, c.pages_per_block)
    skip = jnp.clip(start // ps - first_page, 0, n_pages)  # pages wholly before the window

    def body(i, carry):
        page = pt_ref[i]
        pos_S = (first_page + i) * ps + lax.broadcasted_iota(jnp.int32, (ps,), 0)
        valid_S = (pos_S < length) & (pos_S >= start)
        ks_1S = None if ks_ref is None else ks_ref[layer, page][None, :]
        vs_1S = None if vs_ref is None else vs_ref[layer, page][None, :]
        return _page_step(q_GH, k_ref[layer, page], v_ref[layer, page], ks_1S, vs_1S,
                          valid_S[None, :], valid_S[:, None], carry, c.scale, c.soft_cap)

    G, H = q_GH.shape
    init = (jnp.zeros((G, H), jnp.float32), jnp.full((G,), MASK_VALUE, jnp.float32),
            jnp.zeros((G,), jnp.float32))
    acc_GH, m_G, l_G = lax.fori_loop(skip, n_pages, body, init)
    o_ref[...] = acc_GH
    m_ref[...] = m_G
    l_ref[...] = l_G


def _partials(c: _Cfg, q_BKGH, k_pages, v_pages, k_scales, v_scales, pt_BnJ, lengths_B2, layer_1):
    """Per-block (acc [B,K,n,G,H], max [B,K,n,G], sum [B,K,n,G]) from one pallas_call; the
    pools have a leading layer axis, `layer_1` picks one."""
    B, K, G, H = q_BKGH.shape
    L, n_pages_pool, ps = k_pages.shape[:3]
    n_blocks, ppb = pt_BnJ.shape[1:]
    pool = pl.BlockSpec((L, n_pages_pool, ps, None, H), lambda b, k, s: (0, 0, 0, k, 0))
    in_specs = [pl.BlockSpec((None, None, G, H), lambda b, k, s: (b, k, 0, 0)), pool, pool]
    args = [q_BKGH, k_pages, v_pages]
    if c.quantized:
        scale = pl.BlockSpec((L, n_pages_pool, ps, None), lambda b, k, s: (0, 0, 0, k))
        in_specs += [scale, scale]
        args += [k_scales, v_scales]
    in_specs += [pl.BlockSpec((None, None, ppb), lambda b, k, s: (b, s, 0)),
                 pl.BlockSpec((None, 2), lambda b, k, s: (b, 0)),
                 pl.BlockSpec((1,), lambda b, k, s: (0,))]
    args += [pt_BnJ, lengths_B2, layer_1]
    row = pl.BlockSpec((None, None, None, G), lambda b, k, s: (b, k, s, 0))
    out_specs = [pl.BlockSpec((None, None, None, G, H), lambda b, k, s: (b, k, s, 0, 0)), row, row]
    out_shape = [jax.ShapeDtypeStruct((B, K, n_blocks, G, H), jnp.float32),
                 jax.ShapeDtypeStruct((B, K, n_blocks, G), jnp.float32),
                 jax.ShapeDtypeStruct((B, K, n_blocks, G), jnp.float32)]
    params = None
    if c.backend == "gpu":
        params = plgpu.CompilerParams(num_warps=4, num_stages=2)
    return pl.pallas_call(
        functools.partial(_kernel, c=c), grid=(B, K, n_blocks), in_specs=in_specs,
        out_specs=out_specs, out_shape=out_shape, interpret=c.interpret, compiler_params=params,
        name="lmsys_paged_decode")(*args)


def _tpu_kernel(pt_ref, len_ref, start_ref, layer_ref, *refs, c: _Cfg):
    """TPU: one (row, block of pages, page) per grid step; the page's [page_size, K, H] tile
    was DMA'd by the BlockSpec (index map reads the prefetched page table). The outputs stay
    resident over the page axis and accumulate; K heads are a static loop."""
    del layer_ref
    if c.quantized:
        q_ref, k_ref, v_ref, ks_ref, vs_ref, o_ref, m_ref, l_ref = refs
    else:
        q_ref, k_ref, v_ref, o_ref, m_ref, l_ref = refs
        ks_ref = vs_ref = None
    b, blk, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    ps = c.page_size
    length, start = len_ref[b], start_ref[b]
    page_idx = blk * c.pages_per_block + j

    @pl.when(j == 0)
    def _init():
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)
        m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, m_ref.dtype)
        l_ref[...] = jnp.zeros(l_ref.shape, l_ref.dtype)

    @pl.when((page_idx * ps < length) & ((page_idx + 1) * ps > start))
    def _step():
        pos_1S = page_idx * ps + lax.broadcasted_iota(jnp.int32, (1, ps), 1)
        pos_S1 = page_idx * ps + lax.broadcasted_iota(jnp.int32, (ps, 1), 0)
        valid_1S = (pos_1S < length) & (pos_1S >= start)
        valid_S1 = (pos_S1 < length) & (pos_S1 >= start)
        dtype = q_ref.dtype
        k_SKH, v_SKH = k_ref[...].astype(dtype), v_ref[...].astype(dtype)  # int8 -> q dtype
        for kh in range(k_ref.shape[1]):
            ks_1S = None if ks_ref is None else ks_ref[pl.ds(kh, 1), :]
            vs_1S = None if vs_ref is None else vs_ref[pl.ds(kh, 1), :]
            carry = (o_ref[kh], m_ref[kh], l_ref[kh])
            acc, m, l = _page_step(q_ref[kh], k_SKH[:, kh, :], v_SKH[:, kh, :], ks_1S, vs_1S,
                                   valid_1S, valid_S1, carry, c.scale, c.soft_cap)
            o_ref[kh], m_ref[kh], l_ref[kh] = acc, m, l


def _tpu_partials(c: _Cfg, q_BKGH, k_pages, v_pages, k_scales, v_scales, pt_BP, lengths_B,
                  starts_B, layer_1):
    """TPU split-K partials with scalar prefetch; same outputs as `_partials`."""
    B, K, G, H = q_BKGH.shape
    n_pages_pool, ps = k_pages.shape[1:3]
    ppb, P = c.pages_per_block, pt_BP.shape[1]
    n_blocks = pl.cdiv(P, ppb)

    def page_map(b, s, j, pt_ref, len_ref, start_ref, layer_ref):
        # past the row's last page: repeat the previous block index, so nothing is fetched;
        # before its window's first page: fetch that page (once) instead
        last = jnp.maximum(pl.cdiv(len_ref[b], ps) - 1, 0)
        p = jnp.minimum(jnp.minimum(jnp.maximum(s * ppb + j, start_ref[b] // ps), P - 1), last)
        return layer_ref[0], jnp.clip(pt_ref[b, p], 0, n_pages_pool - 1), 0, 0, 0

    page = pl.BlockSpec((None, None, ps, K, H), page_map)
    in_specs = [pl.BlockSpec((None, K, G, H), lambda b, s, j, *_: (b, 0, 0, 0)), page, page]
    args = [q_BKGH, k_pages, v_pages]
    if c.quantized:
        scale = pl.BlockSpec((None, None, K, ps), lambda *a: page_map(*a)[:4])
        in_specs += [scale, scale]
        args += [k_scales.transpose(0, 1, 3, 2), v_scales.transpose(0, 1, 3, 2)]

    def out_block(last):  # resident over the page axis j: the accumulator
        return pl.BlockSpec((None, None, K, G, last), lambda b, s, j, *_: (b, s, 0, 0, 0))

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4, grid=(B, n_blocks, ppb), in_specs=in_specs,
        out_specs=[out_block(H), out_block(1), out_block(1)])
    out_shape = [jax.ShapeDtypeStruct((B, n_blocks, K, G, H), jnp.float32),
                 jax.ShapeDtypeStruct((B, n_blocks, K, G, 1), jnp.float32),
                 jax.ShapeDtypeStruct((B, n_blocks, K, G, 1), jnp.float32)]
    acc, m, l = pl.pallas_call(
        functools.partial(_tpu_kernel, c=c), grid_spec=grid_spec, out_shape=out_shape,
        interpret=c.interpret, name="lmsys_paged_decode_tpu",
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
    )(pt_BP, lengths_B, starts_B, layer_1, *args)
    acc, m, l = (x.transpose(0, 2, 1, 3, 4) for x in (acc, m, l))
    return acc, m[..., 0], l[..., 0]


def combine_blocks(acc_XnGH, m_XnG, l_XnG):
    """Merges split-K partial results over axis -3 (blocks): out = sum_i acc_i e^(m_i - m) /
    sum_i l_i e^(m_i - m). Rows with no visible key (every l = 0) give zeros."""
    m_XG = jnp.max(m_XnG, axis=-2)
    w_XnG = jnp.exp(m_XnG - m_XG[..., None, :])
    l_XG = jnp.sum(l_XnG * w_XnG, axis=-2)
    acc_XGH = jnp.sum(acc_XnGH * w_XnG[..., None], axis=-3)
    return acc_XGH / jnp.where(l_XG == 0.0, 1.0, l_XG)[..., None]


def supported(head_dim: int, backend: str | None = None) -> bool:
    """Whether this kernel serves pools of this head_dim on the backend (GPU, TPU, CPU
    interpret) reading them in place: on GPU Triton's tiles need a power of two >= 16, and any
    other head_dim is padded, which copies the whole pool on every call (use the gather + XLA
    attention path there)."""
    backend = _backend(backend)
    if backend == "gpu":
        return head_dim >= 16 and head_dim & (head_dim - 1) == 0
    return backend in BACKENDS


def _backend(backend):
    backend = backend or jax.default_backend()
    return {"cuda": "gpu", "rocm": "gpu"}.get(backend, backend)


def paged_attention(q_BNH: jax.Array, k_pages_PSKH: jax.Array, v_pages_PSKH: jax.Array,
                    lengths_B: jax.Array, page_table_BP: jax.Array, *,
                    layer: jax.Array | int | None = None,
                    k_scales: jax.Array | None = None, v_scales: jax.Array | None = None,
                    sm_scale: float | None = None, sliding_window: int | None = None,
                    logits_soft_cap: float | None = None, pages_per_block: int | None = None,
                    interpret: bool | None = None, backend: str | None = None) -> jax.Array:
    """Decode attention of one query token per row over its pages; out_BNH in q's dtype.

    k/v_pages_PSKH: one layer's pool [num_pages, page_size, kv_heads, head_dim] (any float
      dtype, cast to q's in the kernel; int8 with k_scales/v_scales, see the module docstring),
      or all layers' pools [layers, num_pages, ...] with `layer` (an int scalar, may be traced)
      picking one inside the kernel, so no layer slice is copied out of the pool.
    lengths_B: int, tokens visible to each row (its first lengths_B[b] positions).
    page_table_BP: int32 [batch, pages]; entries past a row's length are never read.
    sliding_window: row b sees only its last `sliding_window` tokens (positions >= lengths_B[b]
      - window); the pages wholly before them are skipped (never read: they may be recycled).
    logits_soft_cap: logits become cap * tanh(logits / cap) (Gemma 2).
    pages_per_block: pages per split-K program (default DEFAULT_BLOCK_TOKENS // page_size).
    backend: "gpu" | "tpu" | "cpu" (default: jax.default_backend()); interpret: default True on
      CPU (for "tpu" on CPU wrap the call in `pltpu.force_tpu_interpret_mode()`).
    """
    B, N, H = q_BNH.shape
    layered = k_pages_PSKH.ndim == 5
    if layered != (layer is not None):
        raise ValueError(f"paged_attention: k_pages {k_pages_PSKH.shape} with layer={layer}: pass "
                         "one layer's pool [num_pages,page_size,K,H] without `layer`, or the "
                         "pools of all layers [layers,num_pages,page_size,K,H] with `layer`")
    k_LPSKH = k_pages_PSKH if layered else k_pages_PSKH[None]
    v_LPSKH = v_pages_PSKH if layered else v_pages_PSKH[None]
    L, n_pages_pool, ps, K, Hk = k_LPSKH.shape
    P = page_table_BP.shape[1]
    if (v_LPSKH.shape != k_LPSKH.shape or Hk != H or N % K
            or page_table_BP.shape[0] != B or lengths_B.shape != (B,)):
        raise ValueError(
            f"paged_attention: q {q_BNH.shape}, k_pages {k_pages_PSKH.shape}, v_pages "
            f"{v_pages_PSKH.shape}, lengths {lengths_B.shape}, page_table {page_table_BP.shape}: "
            "expected q [B,N,H], k = v pages [num_pages,page_size,K,H] with N a multiple of K, "
            "lengths [B], page_table [B,pages]")
    if (k_scales is None) != (v_scales is None):
        raise ValueError("paged_attention: pass both k_scales and v_scales, or neither")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"paged_attention: sliding_window={sliding_window} must be >= 1")
    backend = _backend(backend)
    if backend not in BACKENDS:
        raise ValueError(f"paged_attention: backend '{backend}' is not one of "
                         f"{', '.join(BACKENDS)}; use the gather + XLA attention path there")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    ppb = pages_per_block or max(1, DEFAULT_BLOCK_TOKENS // ps)
    ppb = max(1, min(ppb, P))
    n_blocks = pl.cdiv(P, ppb)
    c = _Cfg(scale=float(H ** -0.5 if sm_scale is None else sm_scale), page_size=ps,
             pages_per_block=ppb, backend=backend, interpret=bool(interpret),
             quantized=k_scales is not None,
             soft_cap=None if logits_soft_cap is None else float(logits_soft_cap))

    G = N // K
    Gp, Hp = G, H
    if backend == "gpu":  # Triton dot tiles: >= 16 rows, power-of-two sizes
        Gp, Hp = max(16, pl.next_power_of_2(G)), max(16, pl.next_power_of_2(H))
    q_BKGH = jnp.pad(q_BNH.reshape(B, K, G, H), ((0, 0), (0, 0), (0, Gp - G), (0, Hp - H)))
    if Hp != H:  # copies the pool: keep head_dim a power of two >= 16 on GPU
        pad_h = ((0, 0),) * 4 + ((0, Hp - H),)
        k_LPSKH, v_LPSKH = jnp.pad(k_LPSKH, pad_h), jnp.pad(v_LPSKH, pad_h)
    if c.quantized:
        shape = (L, n_pages_pool, ps, K)

        def full(x):
            x = jnp.asarray(x, jnp.float32)
            return jnp.broadcast_to(x if layered else x[None], shape)
        k_scales, v_scales = full(k_scales), full(v_scales)
    pt_BnJ = jnp.pad(page_table_BP.astype(jnp.int32), ((0, 0), (0, n_blocks * ppb - P)))
    pt_BnJ = pt_BnJ.reshape(B, n_blocks, ppb)
    lengths_B = jnp.clip(lengths_B.astype(jnp.int32), 0, P * ps)
    starts_B = (jnp.zeros_like(lengths_B) if sliding_window is None
                else jnp.maximum(lengths_B - sliding_window, 0))
    layer_1 = jnp.asarray(0 if layer is None else layer, jnp.int32).reshape(1)
    if backend == "tpu":
        acc, m, l = _tpu_partials(c, q_BKGH, k_LPSKH, v_LPSKH, k_scales, v_scales,
                                  page_table_BP.astype(jnp.int32), lengths_B, starts_B, layer_1)
    else:
        acc, m, l = _partials(c, q_BKGH, k_LPSKH, v_LPSKH, k_scales, v_scales, pt_BnJ,
                              jnp.stack([lengths_B, starts_B], axis=1), layer_1)
    out_BKGH = combine_blocks(acc, m, l)
    return out_BKGH[:, :, :G, :H].reshape(B, N, H).astype(q_BNH.dtype)


def paged_attention_reference(q_BNH, k_pages_PSKH, v_pages_PSKH, lengths_B, page_table_BP, *,
                              k_scales=None, v_scales=None, sm_scale=None, sliding_window=None,
                              logits_soft_cap=None):
    """Plain jnp: gather each row's pages into a dense sequence, mask by length, softmax."""
    B, N, H = q_BNH.shape
    ps, K = k_pages_PSKH.shape[1:3]
    P = page_table_BP.shape[1]
    k, v = k_pages_PSKH.astype(jnp.float32), v_pages_PSKH.astype(jnp.float32)
    if k_scales is not None:
        k = k * jnp.broadcast_to(k_scales, k.shape[:3])[..., None]
        v = v * jnp.broadcast_to(v_scales, v.shape[:3])[..., None]
    k_BSKH = k[page_table_BP].reshape(B, P * ps, K, H)
    v_BSKH = v[page_table_BP].reshape(B, P * ps, K, H)
    valid_BS = jnp.arange(P * ps)[None, :] < lengths_B[:, None]
    if sliding_window is not None:
        valid_BS &= jnp.arange(P * ps)[None, :] >= lengths_B[:, None] - sliding_window
    v_BSKH = jnp.where(valid_BS[:, :, None, None], v_BSKH, 0.0)
    scale = H ** -0.5 if sm_scale is None else sm_scale
    q_BKGH = q_BNH.astype(jnp.float32).reshape(B, K, N // K, H)
    s_BKGS = jnp.einsum("bkgh,bskh->bkgs", q_BKGH, k_BSKH,
                        precision=lax.Precision.HIGHEST) * scale
    if logits_soft_cap is not None:
        s_BKGS = logits_soft_cap * jnp.tanh(s_BKGS / logits_soft_cap)
    s_BKGS = jnp.where(valid_BS[:, None, None], s_BKGS, -jnp.inf)
    m_BKG1 = jnp.max(s_BKGS, axis=-1, keepdims=True)
    p_BKGS = jnp.exp(s_BKGS - jnp.where(jnp.isfinite(m_BKG1), m_BKG1, 0.0))
    l_BKG1 = jnp.sum(p_BKGS, axis=-1, keepdims=True)
    out_BKGH = jnp.einsum("bkgs,bskh->bkgh", p_BKGS, v_BSKH, precision=lax.Precision.HIGHEST)
    out_BKGH = out_BKGH / jnp.where(l_BKG1 == 0.0, 1.0, l_BKG1)
    return out_BKGH.reshape(B, N, H).astype(q_BNH.dtype)
