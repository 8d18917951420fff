"""Context (sequence) parallelism: attention over a sequence split across the `sequence` axis.

Each device holds a contiguous chunk of the sequence (queries, keys, values, segment ids).

- `ring`: K/V chunks travel around the ring with `lax.ppermute`; each device folds every chunk
  into its queries' online softmax (running max, denominator, numerator), so no device ever
  holds more than two K/V chunks. The next chunk's transfer is issued before the current
  chunk's compute, so XLA can overlap them.
- `allgather`: every device all-gathers K/V (and their segment ids) and attends its queries
  to the whole sequence: simpler, more memory, one collective.

Both mask by global position (causal) and by segment id (packed documents), and give the same
numbers as plain attention on the whole sequence.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

AXIS = "sequence"
MASKED = -1e30


def _block(q_BTKGH, k_BSKH, v_BSKH, mask_BTS, scale):
    """Logits of a query chunk against a key chunk, masked; and the chunk's value products."""
    logits_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH,
                              preferred_element_type=jnp.float32) * scale
    return jnp.where(mask_BTS[:, None, None], logits_BKGTS, MASKED)


def _mask(q_pos_T, kv_pos_S, q_seg_BT, kv_seg_BS, causal):
    mask_BTS = q_seg_BT[:, :, None] == kv_seg_BS[:, None, :]
    if causal:
        mask_BTS &= kv_pos_S[None, None, :] <= q_pos_T[None, :, None]
    return mask_BTS


def _ring_local(q_BTNH, k_BTKH, v_BTKH, seg_BT, *, causal, scale, n):
    """Runs on one device inside shard_map: its query chunk against all K/V chunks."""
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    me = jax.lax.axis_index(AXIS)
    q_pos_T = me * T + jnp.arange(T)
    perm = [(i, (i + 1) % n) for i in range(n)]

    def fold(carry, step):
        m_BKGT, l_BKGT, o_BKGTH, k, v, seg = carry
        # start passing this chunk on before using it: the transfer overlaps the compute
        nxt = jax.lax.ppermute((k, v, seg), AXIS, perm)
        src = (me - step) % n  # whose chunk this is
        kv_pos_S = src * T + jnp.arange(T)
        logits = _block(q_BTKGH, k, v, _mask(q_pos_T, kv_pos_S, seg_BT, seg, causal), scale)
        m_new = jnp.maximum(m_BKGT, logits.max(-1))
        p = jnp.exp(logits - m_new[..., None])
        correction = jnp.exp(m_BKGT - m_new)
        l_new = l_BKGT * correction + p.sum(-1)
        pv = jnp.einsum("bkgts,bskh->bkgth", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        o_new = o_BKGTH * correction[..., None] + pv
        return (m_new, l_new, o_new, *nxt), None

    G = N // K
    init = (jnp.full((B, K, G, T), MASKED, jnp.float32), jnp.zeros((B, K, G, T), jnp.float32),
            jnp.zeros((B, K, G, T, H), jnp.float32), k_BTKH, v_BTKH, seg_BT)
    (m, l, o, *_), _ = jax.lax.scan(fold, init, jnp.arange(n))
    out_BKGTH = o / jnp.maximum(l, 1e-30)[..., None]
    return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(q_BTNH.dtype)


def _allgather_local(q_BTNH, k_BTKH, v_BTKH, seg_BT, *, causal, scale, n):
    """Runs on one device inside shard_map: gathers all K/V, attends its query chunk to them."""
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    k_BSKH = jax.lax.all_gather(k_BTKH, AXIS, axis=1, tiled=True)
    v_BSKH = jax.lax.all_gather(v_BTKH, AXIS, axis=1, tiled=True)
    seg_BS = jax.lax.all_gather(seg_BT, AXIS, axis=1, tiled=True)
    me = jax.lax.axis_index(AXIS)
    q_pos_T = me * T + jnp.arange(T)
    logits = _block(q_BTNH.reshape(B, T, K, N // K, H), k_BSKH, v_BSKH,
                    _mask(q_pos_T, jnp.arange(n * T), seg_BT, seg_BS, causal), scale)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_BSKH.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v_BSKH, preferred_element_type=jnp.float32)
    return out.reshape(B, T, N, H).astype(q_BTNH.dtype)


def context_parallel_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, *, rules, causal: bool = True,
                               sm_scale: float | None = None):
    """Attention with the sequence split over the mesh's `sequence` axis (see the module doc),
    by `rules.sequence_method`. Batch and heads stay split as the rule table says."""
    n = rules.mesh.shape[AXIS]
    scale = q_BTNH.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    if segment_ids_BT is None:
        segment_ids_BT = jnp.ones(q_BTNH.shape[:2], jnp.int32)
    local = {"ring": _ring_local, "allgather": _allgather_local}[rules.sequence_method]
    q_spec = rules.spec(("batch", "seq", "heads", None), q_BTNH.shape)
    kv_spec = rules.spec(("batch", "seq", "kv_heads", None), k_BTKH.shape)
    seg_spec = rules.spec(("batch", "seq"), segment_ids_BT.shape)
    if AXIS not in (q_spec + (None, None))[1:2]:
        raise ValueError(f"the sequence ({q_BTNH.shape[1]} tokens) does not split over mesh.sequence={n}")
    fn = jax.shard_map(partial(local, causal=causal, scale=scale, n=n), mesh=rules.mesh,
                       in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec, check_vma=False)
    return fn(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)
