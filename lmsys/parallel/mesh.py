"""The device mesh and the one table that maps logical array axes to mesh axes.

Model code names logical axes (`batch`, `embed`, `heads`, ...) and never mesh axes. The rule
table below says how each logical axis is split over the mesh; changing FSDP to FSDP+TP is a
change of `mesh.*` sizes, never of model code.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Collection, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from lmsys.config import MESH_AXES as CONFIG_MESH_AXES
from lmsys.config import ConfigError, MeshConfig, PipelineConfig

# Mesh axes, outermost first (the config owns the list).
MESH_AXES = CONFIG_MESH_AXES

# Logical axis -> the mesh axes that split it (in order), or () for replicated.
# `embed` is the model dimension of parameters: FSDP (ZeRO-3) splits parameters along it.
# Activations leave their model dimension unnamed (None): their batch already uses `fsdp`.
# `layers` is the stacked layer axis: pipeline stages split it (lmsys.parallel.pipeline).
# `experts` is the stacked expert axis of MoE weights: expert parallelism splits it over `expert`;
# the batch splits over `expert` too (as in DeepSpeed-MoE / MaxText), outermost so that the
# all-to-alls of lmsys.parallel.moe see whole row blocks; the dense parts run data-parallel there.
# `router` is the expert dimension of the router weights and logits: kept whole on every device.
# `kv_pages` is the page axis of the serving engine's KV pool: each shard of its mesh axes owns
# its own pages and serves its own batch slots (data-parallel serving, lmsys.serve.engine).
DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("expert", "data", "fsdp"),
    "seq": ("sequence",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "kv_pages": ("data",),
    "head_dim": (),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "layers": ("stage",),
    "experts": ("expert",),
    "router": (),
    "norm": (),
}


def zero1_table(table: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """The rule table of the Adam moments under ZeRO-1: split over `data` as well."""
    return {**table, "embed": ("fsdp", "data")}


LogicalAxes = tuple[str | None, ...]


def mesh_shape(cfg: MeshConfig, n_devices: int) -> dict[str, int]:
    """Sizes of the mesh axes over all granules (ICI x DCN, see `hybrid_shape`), with a -1 axis
    filled; errors name the keys and the device count."""
    ici, dcn = hybrid_shape(cfg, n_devices)
    return {a: ici[a] * dcn[a] for a in MESH_AXES}


def hybrid_shape(cfg: MeshConfig, n_devices: int) -> tuple[dict[str, int], dict[str, int]]:
    """(ici, dcn): per axis, the devices inside one granule and the granules it spans. The dcn
    sizes (the `mesh.dcn_*` keys) multiply to the number of granules, which must divide the
    devices; the -1 axis, if any, fills one granule's devices."""
    dcn = {a: getattr(cfg, f"dcn_{a}", 1) for a in MESH_AXES}
    granules = math.prod(dcn.values())
    if n_devices % granules:
        raise ConfigError(
            f"mesh.dcn_* {_describe(dcn)} span {granules} slices / nodes, which do not divide the "
            f"{n_devices} devices; make the product of mesh.dcn_* the number of slices / nodes")
    per = n_devices // granules
    each = f" in each of the {granules} slices / nodes (mesh.dcn_*)" if granules > 1 else ""
    sizes = {a: getattr(cfg, a) for a in MESH_AXES}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    fill = [a for a, v in sizes.items() if v == -1]
    if fill:
        if per % fixed:
            raise ConfigError(
                f"mesh {_describe(sizes)} cannot fill mesh.{fill[0]}: {per} devices{each} are not "
                f"divisible by the other axes' product {fixed}")
        sizes[fill[0]] = per // fixed
    if math.prod(sizes.values()) != per:
        raise ConfigError(
            f"mesh {_describe(sizes)} needs {math.prod(sizes.values())} devices but {per} are "
            f"available{each}; make the product of mesh.* equal {per} or set one axis to -1")
    return sizes, dcn


def _describe(sizes: dict[str, int]) -> str:
    return "(" + ", ".join(f"{a}={v}" for a, v in sizes.items()) + ")"


def build_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: all) with Auto axes: the compiler propagates shardings
    between the constraints the rule table places on parameters, batches and activations.

    With `mesh.dcn_*` keys above 1 the mesh is hybrid: along each axis the DCN factor is the
    outer one (coordinate = dcn index x ici size + ici index), each granule holds one block of
    ici-shaped devices, and the rule table sees the product. Granules are, in this order:
    TPU slices when the devices carry more than one `slice_index` (multi-slice TPU); processes
    when they belong to more than one process (multi-node GPU, one process per node or host);
    otherwise (one process, e.g. emulated CPU devices) consecutive runs of the device list,
    granule g = devices[g*N/S : (g+1)*N/S] for N devices and S = the product of mesh.dcn_*."""
    devices = list(jax.devices() if devices is None else devices)
    ici, dcn = hybrid_shape(cfg, len(devices))
    types = (AxisType.Auto,) * len(MESH_AXES)
    if math.prod(dcn.values()) == 1:
        shape = tuple(ici[a] for a in MESH_AXES)
        try:  # TPU: an order in which each axis' groups are rings in the torus (as jax.make_mesh)
            array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        except (ValueError, NotImplementedError, AssertionError):  # e.g. part of a TPU slice
            array = np.asarray(devices).reshape(shape)
        return Mesh(array, MESH_AXES, axis_types=types)
    return Mesh(hybrid_devices(ici, dcn, devices), MESH_AXES, axis_types=types)


def hybrid_devices(ici: dict[str, int], dcn: dict[str, int], devices: Sequence) -> np.ndarray:
    """The device array of a hybrid mesh (axes in MESH_AXES order, each ici x dcn long); the
    granule rule is `build_mesh`'s. Slices and processes go to jax's
    `mesh_utils.create_hybrid_device_mesh` (topology-aware inside a TPU slice)."""
    ici_shape, dcn_shape = [ici[a] for a in MESH_AXES], [dcn[a] for a in MESH_AXES]
    n_granules, per = math.prod(dcn_shape), len(devices) // math.prod(dcn_shape)
    attr = next((a for a in ("slice_index", "process_index")
                 if len({getattr(d, a, 0) for d in devices}) > 1), None)
    if attr is None:
        blocks = np.empty(dcn_shape, dtype=object)
        for g, index in enumerate(np.ndindex(*dcn_shape)):
            blocks[index] = np.asarray(devices[g * per:(g + 1) * per], dtype=object).reshape(ici_shape)
        return np.block(blocks.tolist())
    counts = collections.Counter(getattr(d, attr) for d in devices)
    kind = "slices" if attr == "slice_index" else "processes"
    if len(counts) != n_granules or set(counts.values()) != {per}:
        raise ConfigError(
            f"mesh.dcn_* {_describe(dcn)} needs {n_granules} {kind} of {per} devices each, but the "
            f"{len(devices)} devices come in {len(counts)} {kind} of "
            f"{', '.join(str(c) for c in sorted(set(counts.values())))} devices; make the product "
            f"of mesh.dcn_* the number of {kind}")
    return mesh_utils.create_hybrid_device_mesh(
        ici_shape, dcn_shape, devices, process_is_granule=attr == "process_index",
        allow_split_physical_axes=True)


@dataclass(frozen=True)
class Rules:
    """A mesh together with the logical-axis rule table: turns logical axes into shardings."""

    mesh: Mesh
    table: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_RULES))
    sequence_method: str = "ring"  # how attention runs when `sequence` splits the sequence
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)  # when `stage` splits layers
    # the tokens along `seq` are in lmsys.parallel.context's load-balanced (zig-zag) order
    # (the Trainer reorders each batch when mesh.sequence_load_balance is on)
    sequence_load_balance: bool = False
    platform: str | None = None  # see `backend`; set by `manual` (an abstract mesh has no devices)

    def spec(self, axes: LogicalAxes, shape: Sequence[int] | None = None) -> P:
        """The PartitionSpec for an array with these logical axes. Mesh axes of size 1 are
        left out; a dimension that its mesh axes do not divide evenly (e.g. 2 KV heads on a
        tensor axis of 8) is replicated; a mesh axis is used at most once per array."""
        used: set[str] = set()
        out = []
        for i, name in enumerate(axes):
            mesh_axes = []
            for a in self.table.get(name, ()) if name is not None else ():
                if self.mesh.shape[a] > 1 and a not in used:
                    mesh_axes.append(a)
            if shape is not None:
                while mesh_axes and shape[i] % math.prod(self.mesh.shape[a] for a in mesh_axes):
                    mesh_axes.pop()
            used.update(mesh_axes)
            out.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else tuple(mesh_axes))
        while out and out[-1] is None:
            out.pop()
        return P(*out)

    def sharding(self, axes: LogicalAxes, shape: Sequence[int] | None = None) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(axes, shape))

    def constrain(self, x: jax.Array, axes: LogicalAxes) -> jax.Array:
        """Pins an activation's layout inside jit (a no-op for a 1-device mesh)."""
        if self.mesh.size == 1:
            return x
        return jax.lax.with_sharding_constraint(x, self.sharding(axes, x.shape))

    def manual(self, axes: Collection[str]) -> Rules:
        """These rules for code running inside a `jax.shard_map` that is manual over the mesh
        axes `axes` (call it inside the body): the table no longer names them (each shard holds
        its local block) and shardings refer to the current, partly manual mesh."""
        return dataclasses.replace(self.without(axes), mesh=jax.sharding.get_abstract_mesh(),
                                   platform=self.backend)

    def without(self, axes: Collection[str]) -> Rules:
        """These rules with the mesh axes `axes` taken out of every logical axis: an array
        constrained with them is whole along those mesh axes (e.g. `without(("fsdp",))` is a
        parameter all-gathered over fsdp, still split over tensor)."""
        table = {k: tuple(a for a in v if a not in axes) for k, v in self.table.items()}
        return dataclasses.replace(self, table=table)

    def tree_shardings(self, axes_tree, shapes_tree):
        """Shardings for a pytree of arrays (or ShapeDtypeStructs) given a matching tree of axes."""
        return jax.tree.map(lambda axes, s: self.sharding(axes, s.shape), axes_tree, shapes_tree,
                            is_leaf=lambda t: isinstance(t, tuple))

    @property
    def backend(self) -> str:
        """The platform the program is compiled for: that of the mesh's devices ("tpu" for the
        TPU topology devices of an ahead-of-time compile on a CPU machine), else JAX's default."""
        if self.platform:
            return self.platform
        devices = getattr(self.mesh, "devices", None)
        return devices.flat[0].platform if devices is not None else jax.default_backend()

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def batch_size_divisor(self) -> int:
        """The global batch must split evenly over the mesh axes that `batch` maps to."""
        return math.prod(self.mesh.shape[a] for a in self.table["batch"])
