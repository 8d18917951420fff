"""The per-device dispatch point for attention, and its plain-XLA implementation.

`attention()` picks the kernel that one device (or one shard) runs: a Pallas kernel, cuDNN or
plain XLA. What depends on the mesh or a KV cache is decided before it, in one place, by
lmsys.models.attention.layer_attention (the one attention call of a model layer): context
parallelism, the kernels run per shard under shard_map (lmsys.parallel.sharded_kernels), and the
paged KV cache (the paged decode kernel, the XLA:CPU decode path, the gather of pages); that
routing calls `attention()` (or `resolve_impl`) for everything it does not run itself.

Shapes: q_BTNH [batch, q_len, heads, head_dim]; k_BSKH, v_BSKH [batch, kv_len, kv_heads, head_dim]
with heads a multiple of kv_heads (grouped-query attention).

Implementations: "xla" (plain jnp, below), "pallas" (lmsys.kernels.flash_attention; used for
self-attention where positions are the sequence indices — training and prefill. A call with
explicit q/kv positions runs "xla"; the KV-cache decode step (one query token per row) is routed
by lmsys.models.attention to lmsys.kernels.paged_attention when `resolve_impl(impl) == "pallas"`),
"cudnn" (GPU only: `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's fused kernel,
bf16/fp16; segment ids become a dense [batch, 1, q_len, kv_len] mask; no logits soft cap; calls
with explicit positions run "xla", as for "pallas"),
"auto": "xla" on CPU (Pallas only interprets there); on TPU "pallas"; on GPU the faster of
"pallas" and "cudnn" per call (`python -m lmsys.bench.attention`, BENCHMARKS.md): on a Hopper GPU
"pallas" (its Mosaic GPU kernel, lmsys.kernels.flash_attention_hopper) for the calls that kernel
takes up to HOPPER_MAX_AUTO_SEQ tokens, "cudnn" for longer ones and for the other bf16/fp16 calls
without segment ids or soft cap, "pallas" (Triton) for the rest (packed documents, soft cap,
fp32) and for the paged decode step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lmsys.kernels import flash_attention_hopper as _hopper
from lmsys.kernels.flash_attention import flash_attention

IMPLS = ("auto", "xla", "pallas", "cudnn")


def resolve_impl(impl: str, backend: str | None = None) -> str:
    """The kernel family `impl` runs as here: "auto" becomes "xla" on CPU, else "pallas" (the
    per-call choice of cuDNN under "auto" is `_call_impl`'s)."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl '{impl}' is not available; use one of {', '.join(IMPLS)}")
    backend = backend or jax.default_backend()
    if impl == "cudnn" and backend != "gpu":
        raise ValueError(f"attention impl 'cudnn' needs a GPU (this backend is {backend}); use "
                         "'auto', 'pallas' or 'xla'")
    if impl == "auto":
        return "xla" if backend == "cpu" else "pallas"
    return impl


HOPPER_MAX_AUTO_SEQ = 2048  # "auto" on an H100: lmsys's Hopper kernel up to here, cuDNN above


def _call_impl(impl: str, q_BTNH, k_BSKH, *, causal: bool, segments: bool, window, soft_cap,
               positions: bool, backend: str | None = None, device=None) -> str:
    """The implementation one call runs: `resolve_impl`, then "auto" on GPU takes the fastest of
    lmsys's Pallas kernel and cuDNN for the call (forward+backward, BENCHMARKS.md): on Hopper,
    lmsys's Mosaic GPU kernel for sequences up to HOPPER_MAX_AUTO_SEQ, cuDNN for longer ones and
    for the calls only it supports; explicit positions (a KV cache) run "xla"."""
    backend = backend or jax.default_backend()
    family = resolve_impl(impl, backend)
    if positions:
        return "xla"
    low_precision = q_BTNH.dtype in (jnp.bfloat16, jnp.float16)
    head_dim = q_BTNH.shape[-1]
    if impl == "cudnn" and (soft_cap is not None or not low_precision):
        raise ValueError("attention impl 'cudnn' supports bf16/fp16 inputs without a logits soft "
                         f"cap (got {q_BTNH.dtype}, soft cap {soft_cap}); use 'pallas'")
    if impl == "auto" and backend == "gpu":
        if (q_BTNH.shape[1] <= HOPPER_MAX_AUTO_SEQ and _hopper.supported(
                q_BTNH, k_BSKH, causal=causal, segments=segments, window=window,
                soft_cap=soft_cap, device=device)):
            return "pallas"
        if low_precision and not segments and soft_cap is None and head_dim % 8 == 0 \
                and head_dim <= 128:
            return "cudnn"
    return family


def attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, *,
              q_segment_ids_BT: jax.Array | None = None,
              kv_segment_ids_BS: jax.Array | None = None,
              q_positions_BT: jax.Array | None = None,
              kv_positions_BS: jax.Array | None = None,
              causal: bool = True,
              sm_scale: float | None = None,
              sliding_window: int | None = None,
              logits_soft_cap: float | None = None,
              impl: str = "xla", backend: str | None = None) -> jax.Array:
    """Softmax attention, out [batch, q_len, heads, head_dim] in q's dtype.

    Masking: a query attends to a key only if their segment ids are equal (when given; packed
    documents never see each other), when `causal` the key's position is <= the query's, and with
    `sliding_window` the key's position is > query's - window. Positions default to the index
    along the sequence; a KV cache passes its slot positions. `logits_soft_cap`: logits become
    cap * tanh(logits / cap). `backend`: the platform compiled for (default JAX's default
    backend; lmsys.parallel.Rules.backend for a mesh of other devices, e.g. a TPU AOT compile).
    """
    impl = _call_impl(impl, q_BTNH, k_BSKH, causal=causal,
                      segments=q_segment_ids_BT is not None, window=sliding_window,
                      soft_cap=logits_soft_cap,
                      positions=q_positions_BT is not None or kv_positions_BS is not None,
                      backend=backend)
    if impl == "cudnn":
        return _cudnn_attention(q_BTNH, k_BSKH, v_BSKH, q_segment_ids_BT, kv_segment_ids_BS,
                                causal=causal, sm_scale=sm_scale, sliding_window=sliding_window)
    if impl == "pallas":
        segs = None
        if q_segment_ids_BT is not None:
            segs = (q_segment_ids_BT,
                    q_segment_ids_BT if kv_segment_ids_BS is None else kv_segment_ids_BS)
        return flash_attention(q_BTNH, k_BSKH, v_BSKH, causal=causal, segment_ids=segs,
                               sm_scale=sm_scale, sliding_window=sliding_window,
                               logits_soft_cap=logits_soft_cap, backend=backend,
                               interpret=None if backend is None else backend == "cpu")
    return xla_attention(q_BTNH, k_BSKH, v_BSKH, q_segment_ids_BT=q_segment_ids_BT,
                         kv_segment_ids_BS=kv_segment_ids_BS, q_positions_BT=q_positions_BT,
                         kv_positions_BS=kv_positions_BS, causal=causal, sm_scale=sm_scale,
                         sliding_window=sliding_window, logits_soft_cap=logits_soft_cap)


def xla_attention(q_BTNH, k_BSKH, v_BSKH, *, q_segment_ids_BT=None, kv_segment_ids_BS=None,
                  q_positions_BT=None, kv_positions_BS=None, causal=True, sm_scale=None,
                  sliding_window=None, logits_soft_cap=None):
    """Reference attention in plain jnp: fp32 logits and softmax, grouped heads not repeated."""
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    G = N // K
    scale = H ** -0.5 if sm_scale is None else sm_scale
    if sliding_window is not None and (not causal or sliding_window < 1):
        raise ValueError(f"attention: sliding_window={sliding_window} needs causal=True and a "
                         "window >= 1")
    q_BTKGH = q_BTNH.reshape(B, T, K, G, H)
    logits_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH,
                              preferred_element_type=jnp.float32) * scale
    if logits_soft_cap is not None:
        logits_BKGTS = logits_soft_cap * jnp.tanh(logits_BKGTS / logits_soft_cap)
    mask_BTS = jnp.ones((B, T, S), dtype=bool)
    if causal:
        q_pos = jnp.arange(T)[None, :] if q_positions_BT is None else q_positions_BT
        kv_pos = jnp.arange(S)[None, :] if kv_positions_BS is None else kv_positions_BS
        mask_BTS = mask_BTS & (kv_pos[:, None, :] <= q_pos[:, :, None])
        if sliding_window is not None:
            mask_BTS = mask_BTS & (kv_pos[:, None, :] > q_pos[:, :, None] - sliding_window)
    if q_segment_ids_BT is not None:
        kv_seg = q_segment_ids_BT if kv_segment_ids_BS is None else kv_segment_ids_BS
        mask_BTS = mask_BTS & (q_segment_ids_BT[:, :, None] == kv_seg[:, None, :])
    logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, -1e30)
    probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(v_BSKH.dtype)
    out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", probs_BKGTS, v_BSKH,
                           preferred_element_type=jnp.float32)
    return out_BTKGH.reshape(B, T, N, H).astype(q_BTNH.dtype)


def _cudnn_attention(q_BTNH, k_BSKH, v_BSKH, q_seg_BT, kv_seg_BS, *, causal, sm_scale,
                     sliding_window):
    """cuDNN's fused attention through jax.nn; segment ids as a dense mask."""
    mask = None
    if q_seg_BT is not None:
        kv_seg_BS = q_seg_BT if kv_seg_BS is None else kv_seg_BS
        mask = (q_seg_BT[:, None, :, None] == kv_seg_BS[:, None, None, :])
    window = None if sliding_window is None else (sliding_window - 1, 0)
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask, scale=sm_scale,
                                        is_causal=causal, local_window_size=window,
                                        implementation="cudnn")
