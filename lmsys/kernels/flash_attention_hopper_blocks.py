"""The warpgroup building blocks of lmsys.kernels.flash_attention_hopper's Mosaic GPU kernels:
shared-memory tiles laid out for wgmma and TMA, the warpgroup matrix multiplies (`_Mma`, with its
interpret-mode staging), the causal mask of a tile, the K/V sweep of a compute warpgroup, the copy
warpgroup's ring of shared-memory slots and its barriers, and the kernel launch (two compute
warpgroups and one copy warpgroup per CTA).
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

ROWS = 64      # rows of one compute warpgroup's tile (the wgmma M dimension)
WGS = 2        # compute warpgroups per CTA; a CTA owns WGS * ROWS rows
PAD = WGS * ROWS


def _smem(shape, dtype):
    """A shared-memory tile laid out for wgmma and TMA: 8-row x 128-byte tiles, 128B swizzle."""
    elems = 128 // jnp.dtype(dtype).itemsize
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, elems)),
                                                plgpu.SwizzleTransform(128)))


def _t(ref):
    return ref.transpose((1, 0))


def _load(ref, layout):
    """A whole small shared-memory ref into registers (jax 0.10's plgpu.load needs an index)."""
    idx = inspect.signature(plgpu.load).parameters.get("idx")
    if idx is not None and idx.default is inspect.Parameter.empty:
        return plgpu.load(ref, (), layout=layout)
    return plgpu.load(ref, layout=layout)


def _zeros(shape):
    return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)


def _rows(value, shape, axis):
    """A per-row (axis 0) or per-column (axis 1) vector broadcast over a [rows, cols] tile."""
    return lax.broadcast_in_dim(value, shape, [axis])


class _Mma:
    """The warpgroup's matrix multiplies. On the GPU a register operand (a P or dS tile) feeds
    wgmma straight from registers and accumulators stay in registers (`pl.run_state`). jax's GPU
    interpreter reads wgmma operands from shared memory only and has no `run_state`, so with
    `stage` (a [ROWS, cols] shared-memory tile of the warpgroup, allocated only in interpret
    mode) a register operand is stored there first and products are added to accumulators: the
    same arithmetic."""

    def __init__(self, stage=None):
        self.stage = stage

    def matmul(self, a, b, shape):
        """a @ b into a fresh fp32 accumulator (a: smem ref or WGMMA-layout array; b: smem)."""
        if self.stage is not None and isinstance(a, jax.Array):
            self.stage[...] = a
            a = self.stage

        def body(acc):
            plgpu.wgmma(acc, a, b)
            return acc[...]
        return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))

    def accumulate(self, accs, products, during=None):
        """accs[i] + products[i][0] @ products[i][1], issued together; `during()` runs while
        the multiplies are in flight."""
        if self.stage is not None:
            out = tuple(acc + self.matmul(a, b, acc.shape) for acc, (a, b) in zip(accs, products))
            if during is not None:
                during()
            return out

        def body(refs):
            for ref, (a, b) in zip(refs, products):
                plgpu.wgmma(ref, a, b)
            if during is not None:
                during()
        return pl.run_state(body)(tuple(plgpu.ACC.init(acc) for acc in accs))


def _stage(interpret: bool, cols: int, dtype) -> list:
    """The interpret-mode staging tiles of `_Mma` (one per compute warpgroup), else nothing."""
    return [_smem((WGS, ROWS, cols), dtype)] if interpret else []


def _causal_mask(x, row0, col0, *, rows_are_q: bool):
    """Where x's key position <= its query position (rows start at row0, columns at col0)."""
    r = plgpu.broadcasted_iota(jnp.int32, x.shape, 0, layout=plgpu.Layout.WGMMA) + row0
    c = plgpu.broadcasted_iota(jnp.int32, x.shape, 1, layout=plgpu.Layout.WGMMA) + col0
    return (c <= r) if rows_are_q else (r <= c)


def _skip_tile(slot, ready, free):
    """Release a streamed tile this warpgroup does not use. It waits for the tile to land first:
    the copy into `slot` starts only after both warpgroups released the slot's previous tile, so
    the arrival then counts for this tile. Arriving early could complete the previous tile's
    release with two arrivals of one warpgroup while the other still reads it (a race seen in
    interpret mode)."""
    for barrier in ready:
        plgpu.barrier_wait(barrier.at[slot])
    for barrier in free:
        plgpu.barrier_arrive(barrier.at[slot])


def _sweep_kv(step, carry, *, unmasked, steps, cta_steps, causal, skip):
    """A compute warpgroup's pass over the CTA's streamed K/V tiles: `step(i, carry, masked)`
    over [0, unmasked) without the causal mask, then (causal) over [unmasked, steps) with it,
    and `skip(i)` for the tiles [steps, cta_steps) that only the other warpgroup reads."""
    carry = lax.fori_loop(0, unmasked, functools.partial(step, masked=False), carry)
    if causal:
        carry = lax.fori_loop(unmasked, steps, functools.partial(step, masked=True), carry)
        lax.fori_loop(steps, cta_steps, lambda i, _: skip(i), None)
    return carry


def _copy_ring(load, total, stages: int, most: int, free):
    """The copy warpgroup's loop: tile i (0 <= i < total <= most) into ring slot i % stages with
    `load(i, slot)`; before refilling a slot it waits until both compute warpgroups released it
    (the `free` barriers)."""
    plgpu.set_max_registers(40, action="decrease")
    for i in range(min(stages, most)):
        pl.when(i < total)(functools.partial(load, i, i))

    @pl.loop(stages, total)
    def _(i):
        slot = lax.rem(i, stages)
        for barrier in free:
            plgpu.barrier_wait(barrier.at[slot])
        load(i, slot)


def _copy_kv(srcs, smems, ready, free, *, b, kv_n, rows, total, stages, most):
    """`_copy_ring` over K and V tiles of `rows` keys of kv head kv_n (forward and dq)."""
    def load(i, slot):
        at = (b, pl.ds(i * rows, rows), kv_n)
        for src, smem, barrier in zip(srcs, smems, ready):
            plgpu.copy_gmem_to_smem(src.at[at], smem.at[slot], barrier.at[slot])
    _copy_ring(load, total, stages, most, free)


def _kv_tiles(q0, rows: int, bk: int, n_kv: int, causal: bool):
    """K/V tiles of `bk` keys that query rows [q0, q0 + rows) attend to (forward and dq)."""
    return lax.div(q0 + rows + bk - 1, bk) if causal else n_kv


def _unmasked_tiles(q0, bk: int, n_kv: int, causal: bool):
    """Of those, the first ones that lie wholly at or below the diagonal: no mask needed."""
    return lax.div(q0 + 1, bk) if causal else n_kv


def _kernel(body, *, out_type, scratch, grid, names, interpret):
    kwargs = {}
    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        kwargs["interpret"] = InterpretGPUParams()
    return plgpu.kernel(body, out_type=out_type, scratch_types=scratch,
                        compiler_params=plgpu.CompilerParams(approx_math=True), grid=grid, grid_names=names,
                        num_threads=WGS + 1, thread_name="wg", **kwargs)
