"""Pallas kernels on a mesh: XLA cannot split a Pallas call itself, so each device runs the
kernel on its own shard under `jax.shard_map` (batch split as the rule table says for `batch`,
heads for `heads`); the result is the same array as one big call would give."""

from __future__ import annotations


import jax
import jax.numpy as jnp


def sharded_flash_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, *, rules, causal: bool = True):
    """lmsys.kernels.flash_attention per shard. KV heads that the rule table leaves replicated
    (fewer KV heads than the `tensor` axis) are narrowed on each device to the one KV head its
    query heads use."""
    from lmsys.kernels.flash_attention import flash_attention

    N, K = q_BTNH.shape[2], k_BTKH.shape[2]
    q_spec = rules.spec(("batch", None, "heads", None), q_BTNH.shape)
    kv_spec = rules.spec(("batch", None, "kv_heads", None), k_BTKH.shape)
    seg_spec = rules.spec(("batch", None), q_BTNH.shape[:2])
    head_axes = _axes(q_spec, 2)
    narrow = bool(head_axes) and not _axes(kv_spec, 2)  # q heads split, KV heads replicated
    if segment_ids_BT is None:
        segment_ids_BT = jnp.ones(q_BTNH.shape[:2], jnp.int32)

    def local(q, k, v, seg):
        if narrow:  # this device's q heads all map to one KV head
            shard = jax.lax.axis_index(head_axes)
            k_head = shard * q.shape[2] // (N // K)
            k = jax.lax.dynamic_slice_in_dim(k, k_head, 1, axis=2)
            v = jax.lax.dynamic_slice_in_dim(v, k_head, 1, axis=2)
        return flash_attention(q, k, v, causal=causal, segment_ids=seg)

    return jax.shard_map(local, mesh=rules.mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec),
                         out_specs=q_spec, check_vma=False)(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)


def _axes(spec, dim: int) -> tuple[str, ...]:
    entry = (tuple(spec) + (None,) * 4)[dim]
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
