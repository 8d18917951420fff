"""Pipeline parallelism: the stacked layers split into stages over the mesh's `stage` axis.

Notation: p stages (`mesh.stage`), m microbatches (`pipeline.microbatches`), v repeats
(`pipeline.repeats`; 1 = GPipe, > 1 = circular/interleaved), L layers in p*v chunks of
c = L/(p*v) consecutive layers. Chunk k runs on stage k % p, in that stage's repeat k // p.

Layout. The state keeps layer params stacked [L, ...] in model order (checkpoints do not depend
on the pipeline) and the rule table splits `layers` over `stage`, so stage s stores layers
[s*L/p, (s+1)*L/p). For GPipe that is exactly its chunk. For circular, stage s needs chunks
s, p+s, 2p+s, ...: the step reorders the stacked axis to (stage, repeat, layer-in-chunk) on the
fly (`stage_major`), which costs an all-to-all of the layer params forward and of their
gradients backward.

Schedule. Rows j, j+m, j+2m, ... of the batch form microbatch j. At tick t stage s works on item
i = t - s, i.e. microbatch i % m in repeat i // m; it is real work when 0 <= i < m*v. Each tick
every stage runs one chunk on its input, then hands its output to the next stage with
`lax.ppermute`. Stage 0 reads microbatch i % m from its buffer: the embedded inputs at first;
with v > 1 stage p-1's output of an earlier repeat comes back around the ring and waits in the
buffer slot of its microbatch until stage 0's turn (m >= p ticks later, so a slot is never
overwritten before it is read). The last stage keeps the outputs of the last repeat. The run
takes m*v + p - 1 ticks, of which every stage idles p - 1: the bubble (p-1)/(m*v+p-1). Under
SPMD an idle stage still computes, on a placeholder input, and its result is dropped.

The body is a `jax.shard_map` manual over `stage` only: data/fsdp/tensor shardings stay
automatic inside (the model's constraints use `Rules.manual`). Autodiff through the scan over
ticks gives the backward pipeline (ppermute's transpose sends gradients one stage back).
`check_vma=False`: so that the shard_maps nested inside a layer (context-parallel attention,
Pallas kernels per shard) compose; the stage-replicated inputs' cotangents are summed over
stages by shard_map's transpose, and the equivalence tests pin the gradients.
Embedding, final norm and output head run outside, on the mesh as without a pipeline
(replicated over `stage`).

Per-layer statistics (a block's second result, e.g. the MoE router's sums) are added up over
the microbatches of each layer on real ticks only and come back stacked in model order, the
same sums as one pass over the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

AXIS = "stage"


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
    """The share of stage-ticks the schedule leaves idle: (p-1)/(m+p-1) for GPipe and
    (p-1)/(m*v+p-1) interleaved (each tick then runs 1/v of a stage's layers)."""
    return (stages - 1) / (microbatches * repeats + stages - 1)


def stage_major(w_L: jax.Array, stages: int, repeats: int) -> jax.Array:
    """Reorders a stacked [L, ...] array from model order to (stage, repeat, layer-in-chunk), so
    that splitting axis 0 into `stages` blocks gives stage s its chunks s, p+s, 2p+s, ..."""
    c = w_L.shape[0] // (stages * repeats)
    w = w_L.reshape(repeats, stages, c, *w_L.shape[1:]).swapaxes(0, 1)
    return w.reshape(w_L.shape)


def pipeline(block: Callable, layers: dict, x_BTD: jax.Array, positions_BT: jax.Array,
             segment_ids_BT: jax.Array | None, *, rules, remat: Callable | None = None):
    """Runs the stacked `layers` over x_BTD as a pipeline over `rules.mesh`'s `stage` axis (see
    the module doc); the same result as `lax.scan` of `block` over the layers.

    block(x_BTD, layer_params, positions_BT, segment_ids_BT, rules) -> (x_BTD, stats): one
      layer, with the rules to use inside the stage-manual region; `stats` is a pytree of
      arrays that add up over microbatches (or None).
    remat: wraps each layer for the backward pass (a `jax.checkpoint`; None: as is).
    Returns (x_BTD, stats_L): the output and each layer's stats summed over the microbatches,
    stacked [L, ...] in model order (None when the block gives None).
    """
    p = rules.mesh.shape[AXIS]
    v = rules.pipeline.repeats
    m = rules.pipeline.microbatches or p
    L = jax.tree.leaves(layers)[0].shape[0]
    B = x_BTD.shape[0]
    if L % (p * v):
        raise ValueError(f"pipeline: {L} layers do not split into mesh.stage x pipeline.repeats = "
                         f"{p} x {v} equal chunks; change mesh.stage or pipeline.repeats")
    if m < p:
        raise ValueError(f"pipeline: {m} microbatches are fewer than the {p} stages; set "
                         f"pipeline.microbatches >= {p}")
    if B % m:
        raise ValueError(f"pipeline: a batch of {B} rows does not split into {m} microbatches; "
                         f"make pipeline.microbatches divide {B}")
    if v > 1:
        layers = jax.tree.map(partial(stage_major, stages=p, repeats=v), layers)
    if segment_ids_BT is None:
        segment_ids_BT = jnp.ones(x_BTD.shape[:2], jnp.int32)
    positions_BT = jnp.broadcast_to(positions_BT, x_BTD.shape[:2])

    def split(a, axes):  # [B, ...] -> [m, B/m, ...]: microbatch j holds rows j, j+m, ...
        a = a.reshape(B // m, m, *a.shape[1:]).swapaxes(0, 1)
        return rules.constrain(a, (None, *axes))

    x_MbTD = split(x_BTD, ("batch", "seq", None))
    pos_MbT = split(positions_BT, ("batch", "seq"))
    seg_MbT = split(segment_ids_BT, ("batch", "seq"))
    run = partial(_stages, block=block, p=p, m=m, v=v, rules=rules, remat=remat)
    out_PMbTD, stats_PV = jax.shard_map(run, mesh=rules.mesh, axis_names={AXIS},
                                        in_specs=(jax.tree.map(lambda _: P(AXIS), layers), P(), P(), P()),
                                        out_specs=P(AXIS), check_vma=False)(layers, x_MbTD, pos_MbT, seg_MbT)
    out_MbTD = out_PMbTD[(p - 1) * m:]  # the last stage's outputs
    # [stage, repeat, layer in chunk, ...] -> model order: chunk r*p + s
    stats_L = jax.tree.map(lambda a: a.reshape(p, v, *a.shape[1:]).swapaxes(0, 1).reshape(
        L, *a.shape[2:]), stats_PV)
    return rules.constrain(out_MbTD.swapaxes(0, 1).reshape(x_BTD.shape), ("batch", "seq", None)), stats_L


def _stages(layers, x_MbTD, pos_MbT, seg_MbT, *, block, p, m, v, rules, remat):
    """One stage's part of the schedule (inside shard_map, manual over `stage`)."""
    inner = rules.manual({AXIS})
    s = jax.lax.axis_index(AXIS)
    # this stage's layers [v*c, ...] -> [v, c, ...]: chunk r holds repeat r's layers
    chunks = jax.tree.map(lambda w: w.reshape(v, w.shape[0] // v, *w.shape[1:]), layers)

    def run_chunk(x_bTD, r, pos_bT, seg_bT):  # -> (x_bTD, the chunk's stats [c, ...])
        def layer(x, lp):
            return block(x, lp, pos_bT, seg_bT, inner)

        if remat is not None:
            layer = remat(layer)
        chunk = jax.tree.map(lambda w: w[r], chunks)
        return jax.lax.scan(layer, x_bTD, chunk)

    # the last stage's output goes on to stage 0 only when there is a next repeat
    ring = [(k, k + 1) for k in range(p - 1)] + ([(p - 1, 0)] if v > 1 else [])

    def tick(carry, t):
        buf_MbTD, out_MbTD, recv_bTD, stats_V = carry
        if v > 1:  # stage 0 files what came back around the ring (item t - p) into its slot
            back = t - p
            keep = (s == 0) & (back >= 0) & (back < m * (v - 1))
            slot = jnp.maximum(back, 0) % m
            buf_MbTD = buf_MbTD.at[slot].set(jnp.where(keep, recv_bTD, buf_MbTD[slot]))
        i = t - s
        real = (i >= 0) & (i < m * v)
        i = jnp.clip(i, 0, m * v - 1)
        r, j = i // m, i % m
        x_bTD = jnp.where(s == 0, buf_MbTD[t % m], recv_bTD)
        y_bTD, stats = run_chunk(x_bTD, r, pos_MbT[j], seg_MbT[j])
        done = real & (s == p - 1) & (r == v - 1)
        out_MbTD = out_MbTD.at[j].set(jnp.where(done, y_bTD, out_MbTD[j]))
        stats_V = jax.tree.map(lambda acc, a: acc.at[r].add(jnp.where(real, a, 0)), stats_V, stats)
        return (buf_MbTD, out_MbTD, jax.lax.ppermute(y_bTD, AXIS, ring), stats_V), None

    x0_bTD = jnp.zeros_like(x_MbTD[0])
    stats_shape = jax.eval_shape(run_chunk, x0_bTD, 0, pos_MbT[0], seg_MbT[0])[1]
    stats_V = jax.tree.map(lambda a: jnp.zeros((v, *a.shape), a.dtype), stats_shape)
    init = (x_MbTD, jnp.zeros_like(x_MbTD), x0_bTD, stats_V)
    (_, out_MbTD, _, stats_V), _ = jax.lax.scan(tick, init, jnp.arange(m * v + p - 1))
    return out_MbTD, stats_V
