"""The FlashAttention-2 kernel bodies of lmsys.kernels.flash_attention: the forward (online
softmax, log-sum-exp saved), dq and dk/dv passes, one body per pass shared by every backend, and
the static config `_Cfg` they are built with. lmsys.kernels.flash_attention wraps them in
pallas_calls (layout, block specs, compiler parameters per backend) under a custom VJP.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: fully masked rows stay NaN-free
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


@dataclasses.dataclass(frozen=True)
class _Cfg:
    causal: bool
    scale: float
    window: int | None
    cap: float | None
    block_q: int         # of the pass being built (see `passes`)
    block_k: int
    q_len: int           # unpadded lengths
    kv_len: int
    kv_padded: bool      # keys were padded: mask them
    backend: str         # "gpu" | "tpu" | "cpu"
    interpret: bool
    has_seg: bool
    tiles: tuple         # ((pass name, Tiles), ...) for fwd, dq, dkv

    def pass_(self, name: str) -> "_Cfg":
        """This config with the block sizes of pass `name`."""
        t = dict(self.tiles)[name]
        return dataclasses.replace(self, block_q=t.block_q, block_k=t.block_k)

    @property
    def heads_major(self) -> bool:  # TPU layout [B, N, T, H]
        return self.backend == "tpu"


# ----------------------------------------------------------------------------- kernel bodies


def _dot(a, b, dims):
    prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, dims, precision=prec, preferred_element_type=jnp.float32)


def _logits(a, b, c: _Cfg):
    """Scaled (and soft-capped) logits a @ b.T in fp32; also returns tanh for the cap's grad."""
    s = _dot(a, b, _NT) * c.scale
    if c.cap is None:
        return s, None
    t = jnp.tanh(s / c.cap)
    return c.cap * t, t


def _mask(q_pos, k_pos, q_seg, k_seg, c: _Cfg):
    """Visibility of key k_pos to query q_pos (broadcasting [n,1] against [1,m]); None = all."""
    mask = []
    if c.causal:
        mask.append(k_pos <= q_pos)
    if c.window is not None:
        mask.append(k_pos > q_pos - c.window)
    if q_seg is not None:
        mask.append(q_seg == k_seg)
    if c.kv_padded:
        mask.append(k_pos < c.kv_len)
    if not mask:
        return None
    return functools.reduce(jnp.logical_and, mask)


def _div(a, b: int):
    """Floor division of a non-negative int32 scalar (lax.div truncates: no sign op for Mosaic)."""
    return lax.div(a, jnp.int32(b))


def _kv_block_range(qi, c: _Cfg, n_kv_blocks):
    """The k blocks that q block `qi` can see: [lo, hi)."""
    lo, hi = 0, n_kv_blocks
    if c.causal:  # last visible key: the block's last query
        hi = jnp.minimum(hi, _div((qi + 1) * c.block_q + c.block_k - 1, c.block_k))
    if c.window is not None:  # first visible key: first query - window + 1
        lo = _div(jnp.maximum(qi * c.block_q - c.window + 1, 0), c.block_k)
    return lo, hi


def _q_block_range(kj, c: _Cfg, n_q_blocks):
    """The q blocks that can see k block `kj`: [lo, hi)."""
    lo, hi = 0, n_q_blocks
    if c.causal:  # first query that sees the block's first key
        lo = _div(kj * c.block_k, c.block_q)
    if c.window is not None:  # last query that sees the block's last key
        hi = jnp.minimum(hi, _div((kj + 1) * c.block_k + c.window - 2, c.block_q) + 1)
    return lo, hi


def _split_refs(refs, n_in, has_seg):
    """(inputs, segment refs or (None, None), outputs)."""
    if has_seg:
        return refs[:n_in], refs[n_in:n_in + 2], refs[n_in + 2:]
    return refs[:n_in], (None, None), refs[n_in:]


def _fwd_kernel(*refs, c: _Cfg):
    (q_ref, k_ref, v_ref), (qseg_ref, kseg_ref), (o_ref, lse_ref) = _split_refs(refs, 3, c.has_seg)
    bq, bk = c.block_q, c.block_k
    qi = pl.program_id(2)
    q_QH = q_ref[...]
    q_pos_Q1 = qi * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    q_seg_Q1 = None if qseg_ref is None else qseg_ref[...]

    def body(j, carry):
        acc_QH, m_Q1, l_Q1 = carry
        start = pl.multiple_of(j * bk, bk)
        k_KH = k_ref[pl.ds(start, bk), :]
        v_KH = v_ref[pl.ds(start, bk), :]
        s_QK, _ = _logits(q_QH, k_KH, c)
        k_pos_1K = start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        k_seg_1K = None if kseg_ref is None else kseg_ref[:, pl.ds(start, bk)]
        mask = _mask(q_pos_Q1, k_pos_1K, q_seg_Q1, k_seg_1K, c)
        if mask is not None:
            s_QK = jnp.where(mask, s_QK, MASK_VALUE)
        m_new = jnp.maximum(m_Q1, jnp.max(s_QK, axis=1, keepdims=True))
        p_QK = jnp.exp(s_QK - m_new)
        alpha = jnp.exp(m_Q1 - m_new)
        l_new = alpha * l_Q1 + jnp.sum(p_QK, axis=1, keepdims=True)
        acc_new = alpha * acc_QH + _dot(p_QK.astype(v_KH.dtype), v_KH, _NN)
        return acc_new, m_new, l_new

    lo, hi = _kv_block_range(qi, c, k_ref.shape[0] // bk)
    init = (jnp.zeros(q_QH.shape, jnp.float32), jnp.full((bq, 1), MASK_VALUE, jnp.float32),
            jnp.zeros((bq, 1), jnp.float32))
    acc_QH, m_Q1, l_Q1 = lax.fori_loop(lo, hi, body, init)
    l_Q1 = jnp.where(l_Q1 == 0.0, 1.0, l_Q1)  # a row with no visible block: zeros, not NaN
    o_ref[...] = (acc_QH / l_Q1).astype(o_ref.dtype)
    lse_ref[...] = m_Q1 + jnp.log(l_Q1)


def _dq_kernel(*refs, c: _Cfg):
    ins, (qseg_ref, kseg_ref), (dq_ref,) = _split_refs(refs, 6, c.has_seg)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
    bq, bk = c.block_q, c.block_k
    qi = pl.program_id(2)
    q_QH, do_QH = q_ref[...], do_ref[...]
    lse_Q1, delta_Q1 = lse_ref[...], delta_ref[...]
    q_pos_Q1 = qi * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    q_seg_Q1 = None if qseg_ref is None else qseg_ref[...]

    def body(j, dq_QH):
        start = pl.multiple_of(j * bk, bk)
        k_KH = k_ref[pl.ds(start, bk), :]
        v_KH = v_ref[pl.ds(start, bk), :]
        s_QK, t_QK = _logits(q_QH, k_KH, c)
        p_QK = jnp.exp(s_QK - lse_Q1)
        k_pos_1K = start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        k_seg_1K = None if kseg_ref is None else kseg_ref[:, pl.ds(start, bk)]
        mask = _mask(q_pos_Q1, k_pos_1K, q_seg_Q1, k_seg_1K, c)
        if mask is not None:
            p_QK = jnp.where(mask, p_QK, 0.0)
        dp_QK = _dot(do_QH, v_KH, _NT)
        ds_QK = p_QK * (dp_QK - delta_Q1)
        if t_QK is not None:
            ds_QK = ds_QK * (1.0 - t_QK * t_QK)
        return dq_QH + _dot(ds_QK.astype(k_KH.dtype), k_KH, _NN)

    lo, hi = _kv_block_range(qi, c, k_ref.shape[0] // bk)
    dq_QH = lax.fori_loop(lo, hi, body, jnp.zeros(q_QH.shape, jnp.float32))
    dq_ref[...] = (dq_QH * c.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, c: _Cfg, groups: int):
    """One k block of one kv head; loops over its G q heads and the q blocks that see it.
    Works on transposed logits s_KQ so lse/delta/segment ids of q come in as rows [1, bq]."""
    ins, (qseg_ref, kseg_ref), (dk_ref, dv_ref) = _split_refs(refs, 6, c.has_seg)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = ins
    bq, bk = c.block_q, c.block_k
    kj = pl.program_id(2)
    k_KH, v_KH = k_ref[...], v_ref[...]
    k_pos_K1 = kj * bk + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)
    k_seg_K1 = None if kseg_ref is None else kseg_ref[...]
    n_q_blocks = lse_ref.shape[-1] // bq

    def rows(ref, g, start):  # [bq, H] of q head g in the group, either layout
        if c.heads_major:
            return ref[g, pl.ds(start, bq), :]
        return ref[pl.ds(start, bq), g, :]

    def q_body(i, carry, g):
        dk_KH, dv_KH = carry
        start = pl.multiple_of(i * bq, bq)
        q_QH, do_QH = rows(q_ref, g, start), rows(do_ref, g, start)
        lse_1Q = lse_ref[g, :, pl.ds(start, bq)]
        delta_1Q = delta_ref[g, :, pl.ds(start, bq)]
        s_KQ, t_KQ = _logits(k_KH, q_QH, c)
        p_KQ = jnp.exp(s_KQ - lse_1Q)
        q_pos_1Q = start + lax.broadcasted_iota(jnp.int32, (1, bq), 1)
        q_seg_1Q = None if qseg_ref is None else qseg_ref[:, pl.ds(start, bq)]
        mask = _mask(q_pos_1Q, k_pos_K1, q_seg_1Q, k_seg_K1, c)
        if mask is not None:
            p_KQ = jnp.where(mask, p_KQ, 0.0)
        dv_KH = dv_KH + _dot(p_KQ.astype(do_QH.dtype), do_QH, _NN)
        dp_KQ = _dot(v_KH, do_QH, _NT)
        ds_KQ = p_KQ * (dp_KQ - delta_1Q)
        if t_KQ is not None:
            ds_KQ = ds_KQ * (1.0 - t_KQ * t_KQ)
        dk_KH = dk_KH + _dot(ds_KQ.astype(q_QH.dtype), q_QH, _NN)
        return dk_KH, dv_KH

    lo, hi = _q_block_range(kj, c, n_q_blocks)

    def g_body(g, carry):
        return lax.fori_loop(lo, hi, functools.partial(q_body, g=g), carry)

    zeros = jnp.zeros(k_KH.shape, jnp.float32)
    dk_KH, dv_KH = lax.fori_loop(0, groups, g_body, (zeros, zeros))
    dk_ref[...] = (dk_KH * c.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_KH.astype(dv_ref.dtype)
