"""Analytical per-device memory of the training state for any mesh, without devices.

The shared formulas: tests check them against XLA's memory analysis of the compiled train step,
and the planner reuses them. A mesh is a dict of axis sizes (`mesh_shape` resolves a config's
-1; axes left out are 1). Each parameter is split exactly as the Trainer lays it out: the rule
table (lmsys.parallel.mesh) names the mesh axes of each logical axis, e.g. `layers` over
`stage` (pipeline), `embed` over `fsdp` (ZeRO-3), `heads`/`mlp`/`vocab` over `tensor`, the
`experts` of MoE weights over `expert` (expert parallelism); a
dimension that its mesh axes do not divide stays whole. Sizes are bytes per device.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import AbstractMesh

from lmsys.config import MESH_AXES, ModelConfig
from lmsys.models import llama
from lmsys.parallel.mesh import DEFAULT_RULES, Rules


def zero1_table(table: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """The rule table of the Adam moments under ZeRO-1: split over `data` as well."""
    return {**table, "embed": ("fsdp", "data")}


def _rules(sizes: dict[str, int], table: dict | None) -> Rules:
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; the axes are {', '.join(MESH_AXES)}")
    if any(v < 1 for v in sizes.values()):
        raise ValueError(f"mesh sizes must be positive device counts, got {sizes}; resolve -1 "
                         "with lmsys.parallel.mesh_shape first")
    mesh = AbstractMesh(tuple(sizes.get(a, 1) for a in MESH_AXES), MESH_AXES)
    return Rules(mesh, dict(DEFAULT_RULES if table is None else table))


def param_bytes_per_device(model: ModelConfig, sizes: dict[str, int], *, table: dict | None = None,
                           itemsize: int = 4) -> dict[str, float]:
    """Bytes of each top-level parameter group (`embed`, `layers`, `final_norm`, `unembed`) that
    one device holds (float32 by default); sum the values for the total."""
    rules = _rules(sizes, table)
    out = {}
    for group, specs in llama.param_specs(model).items():
        leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, llama.ParamSpec))
        out[group] = sum(_bytes_per_device(rules, s, itemsize) for s in leaves)
    return out


def expert_param_bytes_per_device(model: ModelConfig, sizes: dict[str, int], *, table: dict | None = None,
                                  itemsize: int = 4) -> float:
    """Bytes of the routed experts' weights (the params with an `experts` axis) that one device
    holds: 1/expert of them with expert parallelism (and split further by fsdp/tensor); 0 for a
    dense model. Included in `param_bytes_per_device`'s `layers`."""
    rules = _rules(sizes, table)
    specs = llama.moe_param_specs(model).values() if model.n_experts else ()
    return sum(_bytes_per_device(rules, s, itemsize) for s in specs if "experts" in s.axes)


def _bytes_per_device(rules: Rules, s: llama.ParamSpec, itemsize: int) -> float:
    spec = rules.spec(s.axes, s.shape)
    shards = math.prod(rules.mesh.shape[a] for entry in spec if entry is not None
                       for a in ((entry,) if isinstance(entry, str) else entry))
    return math.prod(s.shape) * itemsize / shards


def optimizer_state_bytes_per_device(model: ModelConfig, sizes: dict[str, int], *, zero1: bool = False,
                                     table: dict | None = None) -> float:
    """Bytes of AdamW's two float32 moments on one device: laid out like the parameters, and
    with `zero1` split over `data` too (the step counter and other scalars are left out)."""
    table = dict(DEFAULT_RULES if table is None else table)
    moments = param_bytes_per_device(model, sizes, table=zero1_table(table) if zero1 else table)
    return 2 * sum(moments.values())
