"""Context (sequence) parallelism: attention over a sequence split across the `sequence` axis.

Layout. With n devices on the axis each holds T = seq_len / n tokens of every sequence:

- contiguous (`Rules.sequence_load_balance=False`): device i holds tokens [i*T, (i+1)*T). Under a
  causal mask device i's queries see only K/V chunks 0..i: the last device has n times the
  first one's work, and a ring step takes as long as its busiest device.
- load-balanced (the Trainer's default, `mesh.sequence_load_balance`): the sequence is cut into
  2n chunks of T/2 tokens and device i holds chunks i and 2n-1-i (the zig-zag layout of
  Megatron-LM's context parallelism and MaxText's `load_balance`). Every device then has the same
  causal work: against its own K/V 3 of the 4 half-blocks (its early chunk does not see its late
  one), against every other device's K/V exactly 2: its late chunk sees their early chunk, and
  either its early chunk sees their early chunk (they come before) or its late chunk sees their
  late chunk (they come after).
  The Trainer puts each batch in this order once (`to_load_balanced`, before the embedding):
  everything but attention works token by token, RoPE reads the explicit positions, and the loss
  is a sum over tokens, so nothing is ever put back.

Methods (`Rules.sequence_method`):

- `ring`: K/V chunks travel around the ring with `lax.ppermute`; each device folds every chunk
  into its queries' online softmax (running max, denominator, numerator), so no device holds
  more than two K/V chunks. Each step issues the ppermute of the chunk it holds (to the next
  device) before computing with it: the transfer and the compute are independent, so XLA's
  scheduler overlaps them (async collective-permute on GPU/TPU). n-1 transfers per layer, the
  minimum. Blocks entirely in a query chunk's future are skipped: with the contiguous layout by
  `lax.cond` (device i computes i+1 blocks), with the balanced layout by choosing which half of
  the query and K/V chunks meet (every device computes 1.5 + (n-1)/2 blocks of T x T, no branch).
- `allgather`: every device all-gathers K/V (and their segment ids) and attends its queries to
  the whole sequence: one collective, n times the K/V memory, T x nT masked logits on every
  device whatever the layout.

Both mask by global token index (causal) and by segment id (packed documents), and give the same
numbers as plain attention on the whole sequence.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

AXIS = "sequence"
MASKED = -1e30


def to_load_balanced(x_BT: jax.Array, n: int) -> jax.Array:
    """Reorders axis 1 (the sequence) into the load-balanced layout for a ring of n devices:
    2n chunks, chunks i and 2n-1-i next to each other, so that splitting the result into n
    contiguous pieces gives device i those two. Slices and a reversal, no gather; works on whole
    rows, before the sequence is split. Trailing axes are kept."""
    B, T = x_BT.shape[:2]
    _check_balanced_split(T, n)
    x = x_BT.reshape(B, 2, n, T // (2 * n), *x_BT.shape[2:])
    # first halves: chunks 0..n-1; second halves reversed: chunks 2n-1..n
    return jnp.stack([x[:, 0], jnp.flip(x[:, 1], axis=1)], axis=2).reshape(x_BT.shape)


def _check_balanced_split(T: int, n: int) -> None:
    if T % (2 * n):
        raise ValueError(f"a sequence of {T} tokens does not split into 2 x mesh.sequence = {2 * n} "
                         "equal chunks for the load-balanced ring; use a seq_len divisible by "
                         f"{2 * n} or set mesh.sequence_load_balance=false")


def _layout_index(dev, T: int, n: int, balance: bool) -> jax.Array:
    """Global token indices of device `dev`'s local tokens (dev may be traced), as [parts, T/parts]:
    one part (contiguous) or two (balanced: chunks dev and 2n-1-dev)."""
    if balance:
        c = T // 2
        return jnp.stack([dev * c + jnp.arange(c), (2 * n - 1 - dev) * c + jnp.arange(c)])
    return (dev * T + jnp.arange(T))[None]


def _mask(q_idx_T, kv_idx_S, q_seg_BT, kv_seg_BS, causal, window=None):
    mask_BTS = q_seg_BT[:, :, None] == kv_seg_BS[:, None, :]
    if causal:
        mask_BTS &= kv_idx_S[None, None, :] <= q_idx_T[None, :, None]
    if window is not None:
        mask_BTS &= kv_idx_S[None, None, :] > q_idx_T[None, :, None] - window
    return mask_BTS


def _logits(q_BTKGH, k_BSKH, mask_BTS, scale, soft_cap=None):
    """Masked logits of a query chunk against a key chunk."""
    logits_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH,
                              preferred_element_type=jnp.float32) * scale
    if soft_cap is not None:
        logits_BKGTS = soft_cap * jnp.tanh(logits_BKGTS / soft_cap)
    return jnp.where(mask_BTS[:, None, None], logits_BKGTS, MASKED)


def _ring_local(q_BTNH, k_BTKH, v_BTKH, seg_BT, *, causal, scale, n, balance, window=None,
                soft_cap=None):
    """Runs on one device inside shard_map: its query chunk against all K/V chunks. Returns the
    output and the number of query-key pairs it computed (per batch row and head)."""
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    G = N // K
    halves = balance and causal  # without a causal mask the layout changes no work
    parts = 2 if halves else 1
    c = T // parts
    me = jax.lax.axis_index(AXIS)

    def split(x):  # [B, T, ...] -> [parts, B, T/parts, ...]
        return jnp.moveaxis(x.reshape(B, parts, c, *x.shape[2:]), 1, 0)

    q_PBcKGH = split(q_BTNH.reshape(B, T, K, G, H))
    q_seg_PBc = split(seg_BT)
    q_idx_Pc = _layout_index(me, T, n, balance)
    pick = partial(jax.lax.dynamic_index_in_dim, axis=0, keepdims=False)

    def fold(stats, kv, src, qi, kj):
        """Folds query part qi against part kj of device src's K/V into the online softmax."""
        m_PBKGc, l_PBKGc, o_PBKGcH, work = stats
        k_PBcKH, v_PBcKH, kv_seg_PBc = kv
        mask = _mask(pick(q_idx_Pc, qi), pick(_layout_index(src, T, n, balance), kj),
                     pick(q_seg_PBc, qi), pick(kv_seg_PBc, kj), causal, window)
        logits = _logits(pick(q_PBcKGH, qi), pick(k_PBcKH, kj), mask, scale, soft_cap)
        m, l, o = pick(m_PBKGc, qi), pick(l_PBKGc, qi), pick(o_PBKGcH, qi)
        # The output does not depend on the running max: no gradient through it (nothing of the
        # max's backward is kept). Masked entries add exp(-1e30 - m) = 0, as the own chunk is
        # folded first and every query sees itself: m is a real logit from then on.
        m_new = jax.lax.stop_gradient(jnp.maximum(m, logits.max(-1)))
        p = jnp.exp(logits - m_new[..., None])
        correction = jnp.exp(m - m_new)
        v = pick(v_PBcKH, kj)
        pv = jnp.einsum("bkgts,bskh->bkgth", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        def put(full, new):
            return jax.lax.dynamic_update_index_in_dim(full, new, qi, 0)

        return (put(m_PBKGc, m_new), put(l_PBKGc, l * correction + p.sum(-1)),
                put(o_PBKGcH, o * correction[..., None] + pv), work + c * c)

    def own(stats, kv):  # this device's K/V: the diagonal
        for qi, kj in ((0, 0), (1, 1), (1, 0)) if halves else ((0, 0),):  # (0, 1) is all future
            stats = fold(stats, kv, me, qi, kj)
        return stats

    def other(stats, kv, src):  # another device's K/V
        if halves:
            # our late chunk sees their early chunk; then either both our chunks see their early
            # chunk (they are before us) or our late chunk also sees their late one (after us)
            stats = fold(stats, kv, src, 1, 0)
            x = (src > me).astype(jnp.int32)
            return fold(stats, kv, src, x, x)
        if causal:  # contiguous: a chunk from a later device is all future
            return jax.lax.cond(src < me, lambda s: fold(s, kv, src, 0, 0), lambda s: s, stats)
        return fold(stats, kv, src, 0, 0)

    perm = [(i, (i + 1) % n) for i in range(n)]
    kv = (split(k_BTKH), split(v_BTKH), split(seg_BT))
    stats = (jnp.full((parts, B, K, G, c), MASKED, jnp.float32), jnp.zeros((parts, B, K, G, c), jnp.float32),
             jnp.zeros((parts, B, K, G, c, H), jnp.float32), jnp.zeros((), jnp.float32))
    # Every step first passes on the chunk it holds, then computes with it: the two overlap.
    nxt = jax.lax.ppermute(kv, AXIS, perm)
    stats = own(stats, kv)
    if n > 2:
        def step(carry, t):
            stats, kv = carry
            nxt = jax.lax.ppermute(kv, AXIS, perm)
            return (other(stats, kv, (me - t) % n), nxt), None

        (stats, nxt), _ = jax.lax.scan(step, (stats, nxt), jnp.arange(1, n - 1))
    _, l, o, work = other(stats, nxt, (me - (n - 1)) % n)  # the last chunk: nothing to pass on
    out_PBKGcH = o / jnp.maximum(l, 1e-30)[..., None]
    out_BTNH = out_PBKGcH.transpose(1, 0, 4, 2, 3, 5).reshape(B, T, N, H).astype(q_BTNH.dtype)
    return out_BTNH, work[None]


def _allgather_local(q_BTNH, k_BTKH, v_BTKH, seg_BT, *, causal, scale, n, balance, window=None,
                     soft_cap=None):
    """Runs on one device inside shard_map: gathers all K/V, attends its query chunk to them.
    Returns the output and the number of query-key pairs it computed."""
    B, T, N, H = q_BTNH.shape
    K = k_BTKH.shape[2]
    k_BSKH = jax.lax.all_gather(k_BTKH, AXIS, axis=1, tiled=True)
    v_BSKH = jax.lax.all_gather(v_BTKH, AXIS, axis=1, tiled=True)
    seg_BS = jax.lax.all_gather(seg_BT, AXIS, axis=1, tiled=True)
    q_idx_T = _layout_index(jax.lax.axis_index(AXIS), T, n, balance).reshape(T)
    kv_idx_S = jnp.concatenate([_layout_index(d, T, n, balance).reshape(T) for d in range(n)])
    logits = _logits(q_BTNH.reshape(B, T, K, N // K, H), k_BSKH,
                     _mask(q_idx_T, kv_idx_S, seg_BT, seg_BS, causal, window), scale, soft_cap)
    probs = jax.nn.softmax(logits, axis=-1).astype(v_BSKH.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v_BSKH, preferred_element_type=jnp.float32)
    return out.reshape(B, T, N, H).astype(q_BTNH.dtype), jnp.full((1,), T * n * T, jnp.float32)


def _context_parallel(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, *, rules, causal, sm_scale,
                      window=None, soft_cap=None):
    n = rules.mesh.shape[AXIS]
    balance = rules.sequence_load_balance
    scale = q_BTNH.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    if segment_ids_BT is None:
        segment_ids_BT = jnp.ones(q_BTNH.shape[:2], jnp.int32)
    local = {"ring": _ring_local, "allgather": _allgather_local}[rules.sequence_method]
    q_spec = rules.spec(("batch", "seq", "heads", None), q_BTNH.shape)
    kv_spec = rules.spec(("batch", "seq", "kv_heads", None), k_BTKH.shape)
    seg_spec = rules.spec(("batch", "seq"), segment_ids_BT.shape)
    T = q_BTNH.shape[1]
    if AXIS not in (q_spec + (None, None))[1:2]:
        raise ValueError(f"the sequence ({T} tokens) does not split over mesh.sequence={n}")
    if balance:
        _check_balanced_split(T, n)
    fn = jax.shard_map(partial(local, causal=causal, scale=scale, n=n, balance=balance,
                               window=window, soft_cap=soft_cap),
                       mesh=rules.mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec),
                       out_specs=(q_spec, P(AXIS)), check_vma=False)
    return fn(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT)


def context_parallel_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, *, rules, causal: bool = True,
                               sm_scale: float | None = None, sliding_window: int | None = None,
                               logits_soft_cap: float | None = None):
    """Attention with the sequence split over the mesh's `sequence` axis (see the module doc),
    by `rules.sequence_method`, the tokens in `rules.sequence_load_balance`'s layout. Batch and
    heads stay split as the rule table says. `sliding_window` (keys at global index > query's -
    window) and `logits_soft_cap` as in lmsys.kernels.attention; a window masks inside the
    blocks (blocks wholly outside it are still computed)."""
    return _context_parallel(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, rules=rules, causal=causal,
                             sm_scale=sm_scale, window=sliding_window, soft_cap=logits_soft_cap)[0]


def attention_work_per_device(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, *, rules,
                              causal: bool = True) -> jax.Array:
    """[n]: the query-key pairs (per batch row and head) that each device of the `sequence` axis
    computes in `context_parallel_attention`, counted by the blocks it really runs (a skipped
    block adds nothing): the causal load balance."""
    return _context_parallel(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, rules=rules, causal=causal,
                             sm_scale=None)[1]
