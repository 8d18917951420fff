"""Pallas kernels on a mesh: XLA cannot split a Pallas call itself, so each device runs the
kernel on its own shard under `jax.shard_map` (batch split as the rule table says for `batch`,
heads for `heads`); the result is the same array as one big call would give."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

# The serving engine's KV pool [layers, pages, page_size, kv_heads, head_dim] (lmsys.serve.engine)
POOL_AXES = (None, "kv_pages", None, "kv_heads", None)


def sharded_flash_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, *, rules, causal: bool = True,
                            **options):
    """lmsys.kernels.flash_attention per shard (`options`: its sm_scale, sliding_window,
    logits_soft_cap). KV heads that the rule table leaves replicated
    (fewer KV heads than the `tensor` axis) are narrowed on each device to the one KV head its
    query heads use."""
    from lmsys.kernels.flash_attention import flash_attention

    N, K = q_BTNH.shape[2], k_BTKH.shape[2]
    q_spec = rules.spec(("batch", None, "heads", None), q_BTNH.shape)
    kv_spec = rules.spec(("batch", None, "kv_heads", None), k_BTKH.shape)
    seg_spec = rules.spec(("batch", None), q_BTNH.shape[:2])
    head_axes = _axes(q_spec, 2)
    narrow = bool(head_axes) and not _axes(kv_spec, 2)  # q heads split, KV heads replicated

    def local(q, k, v, *seg):
        if narrow:  # this device's q heads all map to one KV head
            shard = jax.lax.axis_index(head_axes)
            k_head = shard * q.shape[2] // (N // K)
            k = jax.lax.dynamic_slice_in_dim(k, k_head, 1, axis=2)
            v = jax.lax.dynamic_slice_in_dim(v, k_head, 1, axis=2)
        return flash_attention(q, k, v, causal=causal, segment_ids=seg[0] if seg else None,
                               backend=rules.backend, interpret=rules.backend == "cpu", **options)

    args, specs = (q_BTNH, k_BTKH, v_BTKH), (q_spec, kv_spec, kv_spec)
    if segment_ids_BT is not None:  # without them the Hopper kernel can take the call
        args, specs = args + (segment_ids_BT,), specs + (seg_spec,)
    return jax.shard_map(local, mesh=rules.mesh, in_specs=specs, out_specs=q_spec,
                         check_vma=False)(*args)


def sharded_paged_attention(q_BNH, k_pages_LPSKH, v_pages_LPSKH, lengths_B, page_table_BP, *,
                            layer, rules, pool_spec: P | None = None, **options):
    """lmsys.kernels.paged_attention per shard of the KV pool (`options`: its sm_scale,
    sliding_window, logits_soft_cap): each device reads only its own
    pages, in place. The pool (all layers, with `layer` picking one) is laid out as `pool_spec`
    says (default: the rule table's POOL_AXES, as the engine lays it out): its KV heads split
    the query heads the same way; when its page axis is split too, the batch is split over the
    same mesh axes and the rows of shard g must use only shard g's pages (global page ids; each
    shard subtracts its first page). Pool KV heads that are replicated leave all query heads
    on every device. Mesh axes in none of these specs stay automatic (e.g. an outer shard_map
    that is manual over them, as in the engine, has already split the pool; such a shard_map
    needs check_vma=False: a Pallas call's outputs carry no manual-axis types, and interpret
    mode fails on varying inputs otherwise)."""
    from lmsys.kernels.paged_attention import paged_attention

    if pool_spec is None:
        pool_spec = rules.spec(POOL_AXES, k_pages_LPSKH.shape)
    page_axes, head_axes = _axes(pool_spec, 1), _axes(pool_spec, 3)
    batch_axes = page_axes or _axes(rules.spec(("batch",), q_BNH.shape[:1]), 0)
    shards = math.prod(rules.mesh.shape[a] for a in batch_axes)
    if q_BNH.shape[0] % shards:
        raise ValueError(f"sharded_paged_attention: batch {q_BNH.shape[0]} does not split over "
                         f"the {shards} shards of mesh axes {batch_axes} that split the pool's "
                         "pages; pad the batch to a multiple")
    manual = set(batch_axes) | set(head_axes)
    if not manual:
        return paged_attention(q_BNH, k_pages_LPSKH, v_pages_LPSKH, lengths_B, page_table_BP,
                               layer=layer, **options)
    rows = _entry(batch_axes)
    q_spec = P(rows, _entry(head_axes))

    def local(q, k, v, lengths, pt, layer):
        if page_axes:  # global page ids -> this shard's
            pt = pt - jax.lax.axis_index(page_axes) * k.shape[1]
        return paged_attention(q, k, v, lengths, pt, layer=layer, **options)

    return jax.shard_map(local, mesh=rules.mesh, axis_names=manual,
                         in_specs=(q_spec, pool_spec, pool_spec, P(rows), P(rows), P()),
                         out_specs=q_spec, check_vma=False)(
        q_BNH, k_pages_LPSKH, v_pages_LPSKH, lengths_B, page_table_BP, jnp.asarray(layer))


def _axes(spec, dim: int) -> tuple[str, ...]:
    entry = (tuple(spec) + (None,) * 5)[dim]
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _entry(axes: tuple[str, ...]):
    """A PartitionSpec entry for these mesh axes, as Rules.spec writes it."""
    return None if not axes else axes[0] if len(axes) == 1 else axes

