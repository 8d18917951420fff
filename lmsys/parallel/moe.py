"""Expert parallelism: the routed experts of an MoE layer with all-to-all dispatch and combine
over the `expert` mesh axis.

    y_EBCD = expert_parallel(ffn, x_EBCD, (w_gate, w_up, w_down), rules=rules)

`x_EBCD` holds each row's tokens already sorted into expert slots ([experts, batch, capacity,
d_model], lmsys.models.moe.moe_mlp); its rows are split over `expert` like the rest of the
batch. Inside a `jax.shard_map` manual over `expert` only (data/fsdp/tensor shardings stay
automatic; the model's constraints use `Rules.manual`), one all-to-all sends each device's slots
for expert e to the device holding expert e, the local experts run on the slots of all rows, and
a second all-to-all brings the results back to their rows. The weights' `experts` axis is split
over `expert` (the rule table), so each device holds n_experts / expert of them.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

AXIS = "expert"


def expert_parallel(ffn, x_EBCD: jax.Array, weights: tuple, *, rules) -> jax.Array:
    """`ffn(x_eBCD, *weights_e, rules)` over the local experts e, tokens moved by all-to-all."""
    n = rules.mesh.shape[AXIS]
    E, B = x_EBCD.shape[:2]
    if E % n or B % n:
        raise ValueError(f"expert parallelism over {n} devices needs experts ({E}) and batch rows "
                         f"({B}) divisible by mesh.expert ({n})")

    def local(x_EbCD, *w):
        inner = rules.manual({AXIS})
        x_eBCD = jax.lax.all_to_all(x_EbCD, AXIS, split_axis=0, concat_axis=1, tiled=True)
        y_eBCD = ffn(x_eBCD, *w, inner)
        return jax.lax.all_to_all(y_eBCD, AXIS, split_axis=1, concat_axis=0, tiled=True)

    return jax.shard_map(local, mesh=rules.mesh, axis_names={AXIS},
                         in_specs=(P(None, AXIS), *(P(AXIS) for _ in weights)),
                         out_specs=P(None, AXIS), check_vma=False)(x_EBCD, *weights)
