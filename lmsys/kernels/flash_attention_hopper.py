"""FlashAttention for Hopper GPUs (H100/H200) in Pallas Mosaic GPU: forward, dq and dk/dv kernels.

    out_BTNH = flash_attention_hopper(q_BTNH, k_BSKH, v_BSKH, causal=True)

The Triton kernels of lmsys.kernels.flash_attention are FlashAttention-2: each warp multiplies its
own rows with mma.sync. On Hopper, cuDNN and FlashAttention-3 reach about twice their rate with
three Hopper features that Pallas exposes only through its Mosaic GPU backend, used here:
  - warpgroup matrix multiply (`plgpu.wgmma`): 128 threads multiply a 64-row tile read straight
    from shared memory, asynchronously, accumulating in fp32 registers;
  - bulk tensor copies (TMA, `plgpu.copy_gmem_to_smem`) into a ring of `stages` shared-memory
    slots, completion signalled on barriers;
  - warp specialization: each CTA runs three warpgroups, two computing (64 rows each) and one
    copying, which lowers its register budget so the compute warpgroups can raise theirs.
In the forward, the two compute warpgroups take turns on the tensor cores (a rendezvous barrier
around each QK^T: one's softmax runs while the other's matmul does, FlashAttention-3's ping-pong).

Kernels (one CTA per grid step; grid (heads, row tiles, batch)):
  forward: 128 query rows per CTA; K/V tiles of `block_kv` rows stream through the ring. Saves the
    output and the log2-domain log-sum-exp (lse2 = max2 + log2(sum)), [batch, heads, seq] f32.
  dq: 128 query rows per CTA, K/V stream; dS = P (dP - delta), dQ += dS K.
  dk/dv: 128 key rows per CTA of one kv head; Q, dO, lse, delta tiles of every q head of its group
    stream through the ring, so dK/dV of a kv head sum its G q heads in registers (grouped-query
    attention never repeats K/V nor writes per-q-head gradients).
The pieces the three kernels share (shared-memory tiles, the warpgroup matmuls, the copy
warpgroup's ring, the launch) are in lmsys.kernels.flash_attention_hopper_blocks.
Causal attention skips the tiles above the diagonal (loop bounds) and masks only the tiles that
cross it. Sequences are padded to a multiple of 128: exact for causal attention (a padded key is
after every real query; padded queries are cut off and their dO is zero), so non-causal calls
need seq % 128 == 0 (`supported` says which calls this kernel takes; the Triton kernel takes
the rest). bf16/fp16 inputs, head_dim 64 or 128, no segment ids, window or soft cap.

Testing: jax's GPU interpret mode runs these kernels on CPU (threads, barriers, TMA and wgmma
simulated) from jax 0.11 on (0.10's interpreter has no transposed wgmma operands); the tests
run them there when the installed jax can, and on the GPU. The softmax arithmetic is the same
function family as the Triton kernel's (log2 domain here, so exp2 runs on the FMA path).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from lmsys.kernels.flash_attention_hopper_blocks import (
    PAD, ROWS, WGS, _causal_mask, _copy_kv, _copy_ring, _kernel, _kv_tiles, _load, _Mma, _rows,
    _skip_tile, _smem, _stage, _sweep_kv, _t, _unmasked_tiles, _zeros)

LOG2E = math.log2(math.e)
_MASK = -1e30  # finite: exp2(_MASK - m) == 0 with no inf arithmetic


@dataclasses.dataclass(frozen=True)
class HopperTiles:
    """block_kv / dq_block_kv: key rows per streamed tile in the forward / dq pass; dkv_block_q:
    query rows per streamed tile in the dk/dv pass (each 64 or 128, so a tile never straddles the
    128-row padding); stages: shared-memory ring slots per streamed operand."""
    block_kv: int = 128
    dq_block_kv: int = 64
    dkv_block_q: int = 64
    stages: int = 2


def _takes(q_BTNH, k_BSKH, causal: bool) -> bool:
    """The inputs this kernel computes: bf16/fp16, head_dim 64 or 128, q and kv of one length,
    and causal or a length that is a multiple of PAD."""
    T, H = q_BTNH.shape[1], q_BTNH.shape[3]
    return (q_BTNH.dtype in (jnp.bfloat16, jnp.float16) and H in (64, 128)
            and k_BSKH.shape[1] == T and (causal or T % PAD == 0))


def supported(q_BTNH, k_BSKH, *, causal: bool, segments: bool, window, soft_cap,
              device=None) -> bool:
    """Whether a call can run on this kernel: a Hopper GPU (sm_90), no segment ids, sliding
    window or soft cap, and inputs `_takes` (bf16/fp16, head_dim 64 or 128, self-attention
    shapes, causal or a length that is a multiple of 128)."""
    device = device or jax.devices()[0]
    if device.platform != "gpu" or getattr(device, "compute_capability", "") != "9.0":
        return False
    return not segments and window is None and soft_cap is None and _takes(q_BTNH, k_BSKH, causal)


@dataclasses.dataclass(frozen=True)
class _Cfg:
    causal: bool
    scale: float
    tiles: HopperTiles
    interpret: bool


# ----------------------------------------------------------------------------- forward


def _fwd(c: _Cfg, q, k, v):
    causal, scale, t, interpret = c.causal, c.scale, c.tiles, c.interpret
    B, T, N, H = q.shape
    G = N // k.shape[2]
    bk, stages, dtype = t.block_kv, t.stages, q.dtype
    n_kv = T // bk
    s2 = scale * LOG2E  # logits into the log2 domain

    def body(q_ref, k_ref, v_ref, o_ref, lse_ref, qo_smem, k_smem, v_smem, lse_smem,
             k_ready, v_ready, q_ready, k_free, v_free, turn, *stage):
        b, n, wg = lax.axis_index("b"), lax.axis_index("n"), lax.axis_index("wg")
        cta_q0 = lax.axis_index("t") * PAD
        cta_steps = _kv_tiles(cta_q0, PAD, bk, n_kv, causal)

        def rendezvous():  # the two compute warpgroups alternate on the tensor cores
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

        @pl.when(wg < WGS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            mma = _Mma(stage[0].at[wg] if stage else None)
            q0 = cta_q0 + wg * ROWS
            steps = _kv_tiles(q0, ROWS, bk, n_kv, causal)
            unmasked = _unmasked_tiles(q0, bk, n_kv, causal)
            q_tile = qo_smem.at[wg]
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q0, ROWS), n], q_tile, q_ready.at[wg])
            plgpu.barrier_wait(q_ready.at[wg])
            row = plgpu.Layout.WGMMA.reduce(1)
            m = plgpu.layout_cast(jnp.full((ROWS,), _MASK, jnp.float32), row)
            l = plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), row)
            acc = _zeros((ROWS, H))
            plgpu.barrier_wait(k_ready.at[0])
            pl.when(wg == 1)(rendezvous)

            def step(i, carry, masked):
                acc, m, l = carry
                slot = lax.rem(i, stages)

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, q_tile, _t(k_smem.at[slot]))
                    rendezvous()
                    return acc_ref[...]
                s = pl.run_scoped(qk, plgpu.ACC((ROWS, bk), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])
                s = s * s2
                if masked:
                    s = jnp.where(_causal_mask(s, q0, i * bk, rows_are_q=True), s, _MASK)
                m_new = jnp.maximum(m, s.max(axis=1))
                alpha = jnp.exp2(m - m_new)
                p = jnp.exp2(s - _rows(m_new, s.shape, 0))
                acc = acc * _rows(alpha, acc.shape, 0)
                l = l * alpha + p.sum(axis=1)
                p = p.astype(dtype)
                acc, l, m_new, p = lax.optimization_barrier((acc, l, m_new, p))
                plgpu.barrier_arrive(turn)          # softmax done: the other's turn
                plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_wait(turn)

                def next_k():  # while P @ V runs
                    nxt = i + 1

                    @pl.when(nxt < steps)
                    def _():
                        plgpu.barrier_wait(k_ready.at[lax.rem(nxt, stages)])
                (acc,) = mma.accumulate((acc,), ((p, v_smem.at[slot]),), next_k)
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l

            def skip(i):  # a tile only the other warpgroup needs: free it, keep the turns
                _skip_tile(lax.rem(i, stages), (k_ready, v_ready), (k_free, v_free))
                rendezvous()
                rendezvous()
            acc, m, l = _sweep_kv(step, (acc, m, l), unmasked=unmasked, steps=steps,
                                  cta_steps=cta_steps, causal=causal, skip=skip)
            pl.when(wg == 0)(rendezvous)
            q_tile[...] = (acc * _rows(1.0 / l, acc.shape, 0)).astype(dtype)
            lse_smem.at[wg][...] = m + jnp.log2(l)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_tile, o_ref.at[b, pl.ds(q0, ROWS), n])
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, n, pl.ds(q0, ROWS)])
            plgpu.wait_smem_to_gmem(0)

        pl.when(wg == WGS)(lambda: _copy_kv(
            (k_ref, v_ref), (k_smem, v_smem), (k_ready, v_ready), (k_free, v_free), b=b,
            kv_n=lax.div(n, G), rows=bk, total=cta_steps, stages=stages, most=n_kv))

    scratch = [
        _smem((WGS, ROWS, H), dtype), _smem((stages, bk, H), dtype),
        _smem((stages, bk, H), dtype), plgpu.SMEM((WGS, ROWS), jnp.float32),
        plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=WGS),
        plgpu.Barrier(num_arrivals=WGS, num_barriers=stages),
        plgpu.Barrier(num_arrivals=WGS, num_barriers=stages),
        plgpu.Barrier(num_arrivals=WGS),
    ] + _stage(interpret, bk, dtype)
    out_type = [jax.ShapeDtypeStruct(q.shape, dtype),
                jax.ShapeDtypeStruct((B, N, T), jnp.float32)]
    return _kernel(body, out_type=out_type, scratch=scratch, grid=(N, T // PAD, B),
                   names=("n", "t", "b"), interpret=interpret)(q, k, v)


# ----------------------------------------------------------------------------- dq


def _dq(c: _Cfg, q, k, v, do, lse, delta):
    causal, scale, t, interpret = c.causal, c.scale, c.tiles, c.interpret
    B, T, N, H = q.shape
    G = N // k.shape[2]
    bk, stages, dtype = t.dq_block_kv, t.stages, q.dtype
    n_kv = T // bk
    s2 = scale * LOG2E  # logits into the log2 domain

    def body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref,
             q_smem, do_smem, lse_smem, delta_smem, k_smem, v_smem,
             row_ready, k_ready, v_ready, k_free, v_free, *stage):
        b, n, wg = lax.axis_index("b"), lax.axis_index("n"), lax.axis_index("wg")
        cta_q0 = lax.axis_index("t") * PAD
        cta_steps = _kv_tiles(cta_q0, PAD, bk, n_kv, causal)

        @pl.when(wg < WGS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            mma = _Mma(stage[0].at[wg] if stage else None)
            q0 = cta_q0 + wg * ROWS
            steps = _kv_tiles(q0, ROWS, bk, n_kv, causal)
            unmasked = _unmasked_tiles(q0, bk, n_kv, causal)
            rows = (b, pl.ds(q0, ROWS), n)
            ready = row_ready.at[wg]
            plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem.at[wg], ready)
            plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem.at[wg], ready)
            plgpu.copy_gmem_to_smem(lse_ref.at[b, n, pl.ds(q0, ROWS)], lse_smem.at[wg], ready)
            plgpu.copy_gmem_to_smem(delta_ref.at[b, n, pl.ds(q0, ROWS)], delta_smem.at[wg],
                                    ready)
            plgpu.barrier_wait(ready)
            row = plgpu.Layout.WGMMA.reduce(1)
            lse_r = _load(lse_smem.at[wg], row)
            delta_r = _load(delta_smem.at[wg], row)

            def step(i, dq, masked):
                slot = lax.rem(i, stages)
                plgpu.barrier_wait(k_ready.at[slot])
                s = mma.matmul(q_smem.at[wg], _t(k_smem.at[slot]), (ROWS, bk))
                p = jnp.exp2(s * s2 - _rows(lse_r, s.shape, 0))
                if masked:
                    p = jnp.where(_causal_mask(p, q0, i * bk, rows_are_q=True), p, 0.0)
                plgpu.barrier_wait(v_ready.at[slot])
                dp = mma.matmul(do_smem.at[wg], _t(v_smem.at[slot]), (ROWS, bk))
                plgpu.barrier_arrive(v_free.at[slot])
                ds = p * (dp - _rows(delta_r, dp.shape, 0))
                (dq,) = mma.accumulate((dq,), ((ds.astype(dtype), k_smem.at[slot]),))
                plgpu.barrier_arrive(k_free.at[slot])
                return dq

            def skip(i):  # a tile only the other warpgroup needs
                _skip_tile(lax.rem(i, stages), (k_ready, v_ready), (k_free, v_free))
            dq = _sweep_kv(step, _zeros((ROWS, H)), unmasked=unmasked, steps=steps,
                           cta_steps=cta_steps, causal=causal, skip=skip)
            q_smem.at[wg][...] = (dq * scale).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem.at[wg], dq_ref.at[rows])
            plgpu.wait_smem_to_gmem(0)

        pl.when(wg == WGS)(lambda: _copy_kv(
            (k_ref, v_ref), (k_smem, v_smem), (k_ready, v_ready), (k_free, v_free), b=b,
            kv_n=lax.div(n, G), rows=bk, total=cta_steps, stages=stages, most=n_kv))

    scratch = [
        _smem((WGS, ROWS, H), dtype), _smem((WGS, ROWS, H), dtype),
        plgpu.SMEM((WGS, ROWS), jnp.float32), plgpu.SMEM((WGS, ROWS), jnp.float32),
        _smem((stages, bk, H), dtype), _smem((stages, bk, H), dtype),
        plgpu.Barrier(num_arrivals=4, num_barriers=WGS),
        plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_arrivals=WGS, num_barriers=stages),
        plgpu.Barrier(num_arrivals=WGS, num_barriers=stages),
    ] + _stage(interpret, bk, dtype)
    return _kernel(body, out_type=jax.ShapeDtypeStruct(q.shape, dtype), scratch=scratch,
                   grid=(N, T // PAD, B), names=("n", "t", "b"),
                   interpret=interpret)(q, k, v, do, lse, delta)


# ----------------------------------------------------------------------------- dk, dv


def _dkv(c: _Cfg, q, k, v, do, lse, delta):
    causal, scale, t, interpret = c.causal, c.scale, c.tiles, c.interpret
    B, T, N, H = q.shape
    K = k.shape[2]
    G = N // K
    bq, stages, dtype = t.dkv_block_q, t.stages, q.dtype
    n_q = T // bq
    s2 = scale * LOG2E  # logits into the log2 domain

    def body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
             k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem,
             kv_ready, q_ready, do_ready, q_free, do_free, *stage):
        b, kv_n, wg = lax.axis_index("b"), lax.axis_index("n"), lax.axis_index("wg")
        cta_k0 = lax.axis_index("t") * PAD
        first = lax.div(cta_k0, bq) if causal else 0     # q tiles above the CTA's keys: none
        per_head = n_q - first                             # q tiles streamed per q head
        crossing = min(PAD // bq, n_q) if causal else 0    # of those, the ones that need a mask

        @pl.when(wg < WGS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            mma = _Mma(stage[0].at[wg] if stage else None)
            k0 = cta_k0 + wg * ROWS
            rows = (b, pl.ds(k0, ROWS), kv_n)
            plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[wg], kv_ready.at[wg])
            plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[wg], kv_ready.at[wg])
            plgpu.barrier_wait(kv_ready.at[wg])
            col = plgpu.Layout.WGMMA.reduce(0)

            def step(j, carry, g, masked):
                dk, dv = carry
                i = g * per_head + j                       # stream position
                slot = lax.rem(i, stages)
                q_pos0 = (first + j) * bq
                plgpu.barrier_wait(q_ready.at[slot])
                st = mma.matmul(k_smem.at[wg], _t(q_smem.at[slot]), (ROWS, bq))
                lse_c = _load(lse_smem.at[slot], col)
                pt = jnp.exp2(st * s2 - _rows(lse_c, st.shape, 1))
                if masked:
                    pt = jnp.where(_causal_mask(pt, k0, q_pos0, rows_are_q=False), pt, 0.0)
                plgpu.barrier_wait(do_ready.at[slot])

                dv, dpt = mma.accumulate(
                    (dv, _zeros((ROWS, bq))),
                    ((pt.astype(dtype), do_smem.at[slot]), (v_smem.at[wg], _t(do_smem.at[slot]))))
                delta_c = _load(delta_smem.at[slot], col)
                plgpu.barrier_arrive(do_free.at[slot])
                dst = pt * (dpt - _rows(delta_c, dpt.shape, 1))
                (dk,) = mma.accumulate((dk,), ((dst.astype(dtype), q_smem.at[slot]),))
                plgpu.barrier_arrive(q_free.at[slot])
                return dk, dv

            def head(g, carry):
                carry = lax.fori_loop(0, crossing,
                                      functools.partial(step, g=g, masked=True), carry)
                return lax.fori_loop(crossing, per_head,
                                     functools.partial(step, g=g, masked=False), carry)

            dk, dv = lax.fori_loop(0, G, head, (_zeros((ROWS, H)), _zeros((ROWS, H))))
            k_smem.at[wg][...] = (dk * scale).astype(dtype)
            v_smem.at[wg][...] = dv.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(k_smem.at[wg], dk_ref.at[rows])
            plgpu.copy_smem_to_gmem(v_smem.at[wg], dv_ref.at[rows])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == WGS)
        def _copy():
            total = G * per_head

            def load(i, slot):
                n = kv_n * G + lax.div(i, per_head)
                q_pos0 = (first + lax.rem(i, per_head)) * bq
                rows = (b, pl.ds(q_pos0, bq), n)
                cols = (b, n, pl.ds(q_pos0, bq))
                plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem.at[slot], q_ready.at[slot])
                plgpu.copy_gmem_to_smem(lse_ref.at[cols], lse_smem.at[slot], q_ready.at[slot])
                plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem.at[slot], do_ready.at[slot])
                plgpu.copy_gmem_to_smem(delta_ref.at[cols], delta_smem.at[slot],
                                        do_ready.at[slot])

            _copy_ring(load, total, stages, G * n_q, (q_free, do_free))

    scratch = [
        _smem((WGS, ROWS, H), dtype), _smem((WGS, ROWS, H), dtype),
        _smem((stages, bq, H), dtype), _smem((stages, bq, H), dtype),
        plgpu.SMEM((stages, bq), jnp.float32), plgpu.SMEM((stages, bq), jnp.float32),
        plgpu.Barrier(num_arrivals=2, num_barriers=WGS),
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        plgpu.Barrier(num_arrivals=WGS, num_barriers=stages),
        plgpu.Barrier(num_arrivals=WGS, num_barriers=stages),
    ] + _stage(interpret, bq, dtype)
    out = jax.ShapeDtypeStruct(k.shape, dtype)
    return _kernel(body, out_type=[out, out], scratch=scratch, grid=(K, T // PAD, B),
                   names=("n", "t", "b"), interpret=interpret)(q, k, v, do, lse, delta)


# ----------------------------------------------------------------------------- entry


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(c: _Cfg, q, k, v):
    return _fwd(c, q, k, v)[0]


def _flash_fwd(c: _Cfg, q, k, v):
    o, lse = _fwd(c, q, k, v)
    return o, (q, k, v, o, lse)


def _flash_bwd(c: _Cfg, res, do):
    q, k, v, o, lse = res
    delta = jnp.einsum("btnh,btnh->bnt", o.astype(jnp.float32), do.astype(jnp.float32))
    dq = _dq(c, q, k, v, do, lse, delta)
    dk, dv = _dkv(c, q, k, v, do, lse, delta)
    return dq, dk, dv


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention_hopper(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, *,
                           causal: bool = True, sm_scale: float | None = None,
                           tiles: HopperTiles | None = None,
                           interpret: bool = False) -> jax.Array:
    """Softmax self-attention on Hopper, out_BTNH in q's dtype; differentiable (custom VJP: the
    output and lse are the only residuals besides q, k, v). q [B, T, N, H], k = v [B, T, K, H]
    with N a multiple of K; bf16/fp16; H 64 or 128; T padded to a multiple of 128 when causal,
    else it must be one. interpret=True runs jax's GPU interpreter (CPU; jax >= 0.11)."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    if (k_BSKH.shape != (B, T, K, H) or v_BSKH.shape != k_BSKH.shape or N % K
            or not _takes(q_BTNH, k_BSKH, causal)):
        raise ValueError(
            f"flash_attention_hopper: q {q_BTNH.shape} {q_BTNH.dtype}, k {k_BSKH.shape}, "
            f"v {v_BSKH.shape}, causal={causal}: needs q [B,T,N,H], k = v [B,T,K,H] with N a "
            f"multiple of K, H 64 or 128, bf16/fp16, and causal or T a multiple of {PAD}")
    t = tiles or HopperTiles()
    if any(b not in (64, 128) for b in (t.block_kv, t.dq_block_kv, t.dkv_block_q)) or t.stages < 1:
        raise ValueError(f"flash_attention_hopper: {t}: tiles must be 64 or 128 rows and stages "
                         ">= 1")
    Tp = -(-T // PAD) * PAD
    pad = lambda x: jnp.pad(x, ((0, 0), (0, Tp - T), (0, 0), (0, 0)))
    c = _Cfg(causal=causal, scale=float(H ** -0.5 if sm_scale is None else sm_scale),
             tiles=t, interpret=bool(interpret))
    return _flash(c, pad(q_BTNH), pad(k_BSKH), pad(v_BSKH))[:, :T]
