"""FlashAttention-2 in Pallas: online-softmax forward, dq and dk/dv backward kernels.

    out_BTNH = flash_attention(q_BTNH, k_BSKH, v_BSKH, causal=True, segment_ids=seg_BT)

One kernel body per pass, shared by every backend (lmsys.kernels.flash_attention_body); the thin
wrappers here pick the layout, block sizes and compiler parameters:
  - GPU (Pallas Triton): arrays stay [batch, seq, heads, head_dim]; head_dim is zero-padded to a
    power of two >= 16 (Triton tiles are powers of two).
  - TPU (Pallas Mosaic): arrays are transposed to [batch, heads, seq, head_dim] so each tile's
    last two dims are (seq block, head_dim).
  - CPU: interpret mode only (slow; for tests), GPU layout.
Each grid step owns one (batch, head, q block) [or (batch, kv head, k block) for dk/dv] and loops
over the other sequence inside the kernel, so the whole K/V (or Q/dO) sequence of one head is the
kernel's input block: free on GPU (a pointer), but it must fit VMEM on TPU. With bf16, head_dim
128 and 4 q heads per kv head, the backward compiles (AOT) up to seq 2K on v4 (16 MiB VMEM), 8K
on v5p (64 MiB), 16K on v6e (128 MiB); longer needs a tiled-grid variant, not written yet.

Masking: causal by index (key j <= query i), sliding window (i - window < j), segment ids (equal
ids only), padded keys. Blocks that are entirely masked by the causal or window rule are skipped
by the loop bounds (never loaded). Grouped-query attention maps q head n to kv head n // G in the
index maps; dk/dv of a kv head sum over its G q heads inside the kernel (K/V are never repeated).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from lmsys.kernels import flash_attention_hopper as _hopper
from lmsys.kernels.flash_attention_body import _Cfg, _div, _dkv_kernel, _dq_kernel, _fwd_kernel

BACKENDS = ("gpu", "tpu", "cpu")


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Tile sizes of one pass and, on GPU, its Triton launch parameters. block_q and block_k
    are the q and k rows per tile: the grid walks the outer one (q for fwd and dq, k for dkv),
    the kernel loops over the other."""
    block_q: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2


def default_tiles(backend: str, head_dim: int) -> dict[str, Tiles]:
    """Tiles per pass ("fwd", "dq", "dkv"). GPU figures were tuned on an H100 with bf16
    (`python -m lmsys.bench.attention --sweep`, BENCHMARKS.md); TPU tiles are (8, 128)-aligned;
    CPU (interpret mode) favours few grid steps."""
    if backend == "gpu":
        if head_dim <= 64:
            return {"fwd": Tiles(128, 64, 4, 3), "dq": Tiles(128, 64, 4, 3),
                    "dkv": Tiles(32, 128, 4, 3)}
        return {"fwd": Tiles(128, 128, 8, 3), "dq": Tiles(64, 64, 4, 2),
                "dkv": Tiles(64, 64, 4, 2)}
    block = 128 if backend == "tpu" else 64
    return {name: Tiles(block, block) for name in ("fwd", "dq", "dkv")}


# ----------------------------------------------------------------------------- pallas_call wrappers


def _call(kernel, c: _Cfg, *, grid, in_specs, out_specs, out_shape, name, pass_name):
    """pl.pallas_call with the backend's compiler parameters."""
    params = None
    if c.backend == "gpu":
        t = dict(c.tiles)[pass_name]
        params = plgpu.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages)
    elif c.backend == "tpu":
        params = pltpu.CompilerParams(dimension_semantics=("parallel",) * len(grid),
                                      vmem_limit_bytes=_tpu_vmem_limit(in_specs, out_specs))
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                          out_shape=out_shape, interpret=c.interpret, compiler_params=params,
                          name=name)


def _tpu_vmem_limit(in_specs, out_specs) -> int | None:
    """Raise the scoped VMEM limit when the double-buffered blocks (whole sequences of one head,
    padded to (8, 128) tiles, 4 bytes an element at most) need more than the default allows."""
    need = 4 << 20  # logits tiles, accumulators, Mosaic internal scratch
    for spec in [*in_specs, *(out_specs if isinstance(out_specs, list) else [out_specs])]:
        *lead, sub, lane = [1 if d is None else d for d in spec.block_shape]
        need += 2 * 4 * _round_up(sub, 8) * _round_up(lane, 128) * max(1, int(np.prod(lead)))
    if need <= 16 << 20:
        return None
    try:
        capacity = pltpu.get_tpu_info().vmem_capacity_bytes
    except (ValueError, RuntimeError):  # no TPU attached (ahead-of-time compile): assume the smaller chips
        capacity = 64 << 20
    return int(min(need, capacity * 0.9))


def _specs(c: _Cfg, H: int, G: int):
    """BlockSpec makers for the layout: per-head row blocks, per-head whole sequences, and the
    whole sequences of a kv head's group of G q heads. Grid is (batch, head, seq block)."""
    if c.heads_major:  # [B, N, T, H]
        def rows(n, head_of):
            return pl.BlockSpec((None, None, n, H), lambda b, h, i: (b, head_of(h), i, 0))

        def seq(n, head_of):
            return pl.BlockSpec((None, None, n, H), lambda b, h, i: (b, head_of(h), 0, 0))

        def group(n):
            return pl.BlockSpec((None, G, n, H), lambda b, h, i: (b, h, 0, 0))
    else:  # [B, T, N, H]
        def rows(n, head_of):
            return pl.BlockSpec((None, n, None, H), lambda b, h, i: (b, i, head_of(h), 0))

        def seq(n, head_of):
            return pl.BlockSpec((None, n, None, H), lambda b, h, i: (b, 0, head_of(h), 0))

        def group(n):
            return pl.BlockSpec((None, n, G, H), lambda b, h, i: (b, 0, h, 0))
    return rows, seq, group


def _shape(c: _Cfg, x):
    """(batch, seq, heads, head_dim) of an array in the kernel layout."""
    B, a, b, H = x.shape
    return (B, b, a, H) if c.heads_major else (B, a, b, H)


def _fwd_call(c: _Cfg, q, k, v, segs):
    c = c.pass_("fwd")
    B, T, N, H = _shape(c, q)
    S, K = _shape(c, k)[1:3]
    G = N // K
    rows, seq, _ = _specs(c, H, G)
    same, kv_head = (lambda h: h), (lambda h: _div(h, G))
    in_specs = [rows(c.block_q, same), seq(S, kv_head), seq(S, kv_head)]
    args = [q, k, v]
    if c.has_seg:
        q_seg_BT1, _, _, kv_seg_B1S = segs
        in_specs += [pl.BlockSpec((None, c.block_q, 1), lambda b, h, i: (b, i, 0)),
                     pl.BlockSpec((None, 1, S), lambda b, h, i: (b, 0, 0))]
        args += [q_seg_BT1, kv_seg_B1S]
    out_specs = [rows(c.block_q, same),
                 pl.BlockSpec((None, None, c.block_q, 1), lambda b, h, i: (b, h, i, 0))]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((B, N, T, 1), jnp.float32)]
    o, lse_BNT1 = _call(
        functools.partial(_fwd_kernel, c=c), c, grid=(B, N, T // c.block_q), in_specs=in_specs,
        out_specs=out_specs, out_shape=out_shape, name="lmsys_flash_fwd", pass_name="fwd")(*args)
    return o, lse_BNT1


def _dq_call(c: _Cfg, q, k, v, do, lse_BNT1, delta_BNT1, segs):
    c = c.pass_("dq")
    B, T, N, H = _shape(c, q)
    S, K = _shape(c, k)[1:3]
    G = N // K
    rows, seq, _ = _specs(c, H, G)
    same, kv_head = (lambda h: h), (lambda h: _div(h, G))
    col = pl.BlockSpec((None, None, c.block_q, 1), lambda b, h, i: (b, h, i, 0))
    in_specs = [rows(c.block_q, same), seq(S, kv_head), seq(S, kv_head), rows(c.block_q, same),
                col, col]
    args = [q, k, v, do, lse_BNT1, delta_BNT1]
    if c.has_seg:
        q_seg_BT1, _, _, kv_seg_B1S = segs
        in_specs += [pl.BlockSpec((None, c.block_q, 1), lambda b, h, i: (b, i, 0)),
                     pl.BlockSpec((None, 1, S), lambda b, h, i: (b, 0, 0))]
        args += [q_seg_BT1, kv_seg_B1S]
    return _call(
        functools.partial(_dq_kernel, c=c), c, grid=(B, N, T // c.block_q), in_specs=in_specs,
        out_specs=rows(c.block_q, same), out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        name="lmsys_flash_dq", pass_name="dq")(*args)


def _dkv_call(c: _Cfg, q, k, v, do, lse_BN1T, delta_BN1T, segs):
    c = c.pass_("dkv")
    B, T, N, H = _shape(c, q)
    S, K = _shape(c, k)[1:3]
    G = N // K
    rows, _, group = _specs(c, H, G)
    same = lambda h: h
    row = pl.BlockSpec((None, G, 1, T), lambda b, h, j: (b, h, 0, 0))
    in_specs = [group(T), rows(c.block_k, same), rows(c.block_k, same), group(T), row, row]
    args = [q, k, v, do, lse_BN1T, delta_BN1T]
    if c.has_seg:
        _, q_seg_B1T, kv_seg_BS1, _ = segs
        in_specs += [pl.BlockSpec((None, 1, T), lambda b, h, j: (b, 0, 0)),
                     pl.BlockSpec((None, c.block_k, 1), lambda b, h, j: (b, j, 0))]
        args += [q_seg_B1T, kv_seg_BS1]
    out = jax.ShapeDtypeStruct(k.shape, k.dtype)
    return _call(
        functools.partial(_dkv_kernel, c=c, groups=G), c, grid=(B, K, S // c.block_k),
        in_specs=in_specs, out_specs=[rows(c.block_k, same), rows(c.block_k, same)],
        out_shape=[out, out], name="lmsys_flash_dkv", pass_name="dkv")(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(c: _Cfg, q, k, v, segs):
    return _fwd_call(c, q, k, v, segs)[0]


def _flash_fwd(c, q, k, v, segs):
    o, lse_BNT1 = _fwd_call(c, q, k, v, segs)
    return o, (q, k, v, segs, o, lse_BNT1)


def _flash_bwd(c, res, do):
    q, k, v, segs, o, lse_BNT1 = res
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    delta_BNT = delta if c.heads_major else delta.transpose(0, 2, 1)
    B, N, T = delta_BNT.shape
    delta_BNT1 = delta_BNT[..., None]
    dq = _dq_call(c, q, k, v, do, lse_BNT1, delta_BNT1, segs)
    dk, dv = _dkv_call(c, q, k, v, do, lse_BNT1.reshape(B, N, 1, T),
                       delta_BNT.reshape(B, N, 1, T), segs)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- public entry


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def flash_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, *,
                    causal: bool = True,
                    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
                    sm_scale: float | None = None,
                    sliding_window: int | None = None,
                    logits_soft_cap: float | None = None,
                    block_q: int | None = None, block_k: int | None = None,
                    tiles: dict[str, Tiles] | None = None,
                    interpret: bool | None = None, backend: str | None = None,
                    hopper: bool | None = None) -> jax.Array:
    """Softmax attention as a Pallas kernel with a Pallas backward; out_BTNH in q's dtype.

    segment_ids: [batch, seq] int shared by q and kv (packed documents), or a pair
      (q_segment_ids_BT, kv_segment_ids_BS). Positions are the indices along the sequence.
    sliding_window: query i sees keys j with i - window < j (needs causal=True).
    logits_soft_cap: logits = cap * tanh(logits / cap), before masking.
    tiles: {"fwd"|"dq"|"dkv": Tiles} overriding `default_tiles(backend, head_dim)` per pass;
      block_q/block_k set the blocks of every pass at once. Blocks are clamped to the sequence
      (power of two >= 16); sequences are zero-padded to a multiple of every pass's blocks and
      padded keys masked.
    backend: "gpu" | "tpu" | "cpu" (default: jax.default_backend()); interpret: default True
      only on CPU. Differentiable (custom VJP: lse saved, dq and dk/dv Pallas kernels).
    hopper: on a Hopper GPU the calls `flash_attention_hopper.supported` takes run the Mosaic
      GPU kernels of lmsys.kernels.flash_attention_hopper (wgmma, TMA; about 1.5x these Triton
      kernels on an H100, BENCHMARKS.md) unless hopper=False; hopper=True requires them.
    """
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    if k_BSKH.shape != (B, S, K, H) or v_BSKH.shape != k_BSKH.shape or N % K:
        raise ValueError(f"flash_attention: q {q_BTNH.shape}, k {k_BSKH.shape}, v {v_BSKH.shape}: "
                         "expected q [B,T,N,H], k = v [B,S,K,H] with N a multiple of K")
    if sliding_window is not None and (not causal or sliding_window < 1):
        raise ValueError(f"flash_attention: sliding_window={sliding_window} needs causal=True "
                         "and a window >= 1")
    backend = backend or jax.default_backend()
    backend = {"cuda": "gpu", "rocm": "gpu"}.get(backend, backend)
    if backend not in BACKENDS:
        raise ValueError(f"flash_attention: backend '{backend}' is not one of gpu, tpu, cpu")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    if hopper or (hopper is None and backend == "gpu" and not interpret):
        ok = _hopper.supported(q_BTNH, k_BSKH, causal=causal, segments=segment_ids is not None,
                               window=sliding_window, soft_cap=logits_soft_cap)
        if hopper and not ok:
            raise ValueError("flash_attention: hopper=True needs a Hopper GPU and a call "
                             "flash_attention_hopper takes (bf16/fp16, head_dim 64 or 128, no "
                             "segment ids, window or soft cap, causal or seq % 128 == 0)")
        if hopper or (ok and (block_q, block_k, tiles) == (None, None, None)):
            return _hopper.flash_attention_hopper(q_BTNH, k_BSKH, v_BSKH, causal=causal,
                                                  sm_scale=sm_scale)
    chosen = {**default_tiles(backend, H), **(tiles or {})}
    fit = lambda b, n: min(b, max(16, pl.next_power_of_2(n)))
    chosen = {name: dataclasses.replace(t, block_q=fit(block_q or t.block_q, T),
                                        block_k=fit(block_k or t.block_k, S))
              for name, t in chosen.items()}
    Tp = _round_up(T, max(t.block_q for t in chosen.values()))
    Sp = _round_up(S, max(t.block_k for t in chosen.values()))
    c = _Cfg(causal=causal, scale=float(H ** -0.5 if sm_scale is None else sm_scale),
             window=sliding_window,
             cap=None if logits_soft_cap is None else float(logits_soft_cap),
             block_q=0, block_k=0, q_len=T, kv_len=S, kv_padded=Sp != S, backend=backend,
             interpret=bool(interpret), has_seg=segment_ids is not None,
             tiles=tuple(sorted(chosen.items())))

    Hp = max(16, pl.next_power_of_2(H)) if backend == "gpu" else H

    def prep(x, length):
        x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, Hp - H)))
        return x.transpose(0, 2, 1, 3) if c.heads_major else x

    q, k, v = prep(q_BTNH, Tp), prep(k_BSKH, Sp), prep(v_BSKH, Sp)
    segs = None
    if segment_ids is not None:
        q_seg, kv_seg = segment_ids if isinstance(segment_ids, tuple) else (segment_ids,) * 2
        q_seg_BT = jnp.pad(q_seg.astype(jnp.int32), ((0, 0), (0, Tp - T)))
        kv_seg_BS = jnp.pad(kv_seg.astype(jnp.int32), ((0, 0), (0, Sp - S)))
        segs = (q_seg_BT[:, :, None], q_seg_BT[:, None, :], kv_seg_BS[:, :, None],
                kv_seg_BS[:, None, :])
    o = _flash(c, q, k, v, segs)
    if c.heads_major:
        o = o.transpose(0, 2, 1, 3)
    return o[:, :T, :, :H]
