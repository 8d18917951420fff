"""`lmsys plan`: what a training config needs per device and how fast it may run, before any
accelerator time is spent.

    lmsys plan recipes/configs/llama3-8b.yaml --devices 8 --hardware h100
    lmsys plan recipes/configs/llama3-8b.yaml --devices 8 --hardware h100 --search
    lmsys plan recipes/configs/llama3-8b.yaml mesh.fsdp=-1 --topology v5p:4x4x4   # + TPU compile

The analytical model (lmsys.plan.analysis) gives per-device memory by part, collective bytes
per step by cause, and matmul FLOPs; a roofline turns them into a step-time estimate and MFU on
the chosen hardware's datasheet figures. `--topology` also compiles the real train step for a
TPU topology ahead of time on this machine (the `tpu` extra's libtpu; no TPU needed) and prints
the compiler's per-device memory and collectives (each loop body times its trip count) beside
the analytical ones. `--search` ranks meshes and remat policies that fit.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field

from lmsys.config import MESH_AXES, Config, ConfigError
from lmsys.config_checks import check_mesh
from lmsys.models import llama
from lmsys.plan.analysis import (
    ARGUMENT_PARTS,
    collective_bytes_min,
    train_memory_per_device,
)


@dataclass(frozen=True)
class Hardware:
    """One accelerator's datasheet figures (dense bf16 matmul peak; per-chip interconnect
    bandwidth one way, which a ring collective uses)."""

    name: str
    memory: float  # bytes of HBM per device
    peak_flops: float  # dense bf16 FLOP/s per device
    hbm_bandwidth: float  # bytes/s
    link_bandwidth: float  # bytes/s one device sends to its group (NVLink / ICI)


HARDWARE = {
    "h100": Hardware("NVIDIA H100 SXM", 80e9, 989e12, 3.35e12, 450e9),
    "h200": Hardware("NVIDIA H200 SXM", 141e9, 989e12, 4.8e12, 450e9),
    "a100": Hardware("NVIDIA A100 SXM 80GB", 80e9, 312e12, 2.0e12, 300e9),
    "v5e": Hardware("TPU v5e", 16e9, 197e12, 819e9, 200e9),
    "v5p": Hardware("TPU v5p", 95e9, 459e12, 2.765e12, 600e9),
    "v6e": Hardware("TPU v6e", 32e9, 918e12, 1.64e12, 448e9),
}
# Share of a device's memory a plan may use: XLA's runtime, fragmentation and buffers for
# collectives take the rest.
USABLE = 0.9


class PlanError(ValueError):
    """A plan that cannot be made: an unknown hardware or topology, a mesh that does not fit."""


@dataclass
class Plan:
    cfg: Config
    sizes: dict[str, int]
    hardware: Hardware
    memory: dict[str, float]  # bytes per device by part
    collectives: dict[str, float]  # bytes one device sends per step, by cause
    flops: float  # matmul FLOPs per device per step (the remat recompute included)
    model_flops: float  # 6N-style FLOPs per device per step (no recompute), for MFU
    compiled: dict | None = None  # from `aot_compile`, when a TPU topology was compiled
    notes: list[str] = field(default_factory=list)

    @property
    def devices(self) -> int:
        return math.prod(self.sizes.values())

    @property
    def arguments(self) -> float:
        return sum(v for k, v in self.memory.items() if k in ARGUMENT_PARTS)

    @property
    def total_memory(self) -> float:
        return sum(self.memory.values())

    @property
    def fits(self) -> bool:
        """By the compiler's figure when the step was compiled, else by the analytical one."""
        total = self.compiled["total"] if self.compiled else self.total_memory
        return total <= USABLE * self.hardware.memory

    @property
    def compute_time(self) -> float:
        return self.flops / self.hardware.peak_flops

    @property
    def comm_time(self) -> float:
        return sum(self.collectives.values()) / self.hardware.link_bandwidth

    @property
    def step_time(self) -> float:
        """Roofline: matmuls at peak, collectives at link bandwidth, overlapped (the slower of
        the two bounds the step)."""
        return max(self.compute_time, self.comm_time)

    @property
    def mfu(self) -> float:
        return self.model_flops / (self.step_time * self.hardware.peak_flops)

    @property
    def tokens_per_second(self) -> float:
        return self.cfg.batch_size * self.cfg.seq_len / self.step_time


def _sizes(cfg: Config, devices: int) -> dict[str, int]:
    from lmsys.parallel.mesh import mesh_shape

    if devices < 1:
        raise PlanError(f"--devices must be >= 1, got {devices}")
    try:
        sizes = mesh_shape(cfg.mesh, devices)
    except ValueError as e:
        raise PlanError(str(e)) from e
    if math.prod(sizes.values()) != devices:
        raise PlanError(f"the mesh {sizes} uses {math.prod(sizes.values())} devices, not the "
                        f"{devices} planned for; set one mesh axis to -1 to fill the rest")
    return sizes


def _check(cfg: Config, sizes: dict[str, int]) -> None:
    """The rules the Trainer enforces on its mesh (lmsys.config_checks.check_mesh), without building it."""
    from lmsys.parallel.mesh import DEFAULT_RULES

    try:
        check_mesh(cfg, sizes, DEFAULT_RULES["batch"])
    except ConfigError as e:
        raise PlanError(str(e)) from e


def analyze(cfg: Config, devices: int, hardware: str) -> Plan:
    """The analytical plan of `cfg` on `devices` devices of `hardware` (a HARDWARE key)."""
    if hardware not in HARDWARE:
        raise PlanError(f"unknown hardware {hardware!r}; choose from {', '.join(HARDWARE)}")
    sizes = _sizes(cfg, devices)
    _check(cfg, sizes)
    from lmsys.kernels.attention import resolve_impl

    hw = HARDWARE[hardware]
    backend = "tpu" if hw.name.startswith("TPU") else "gpu"
    flash = resolve_impl(cfg.model.attention_impl, backend) != "xla"
    memory = train_memory_per_device(cfg, sizes, flash=flash)
    try:
        collectives = collective_bytes_min(cfg, sizes)
    except ValueError as e:
        raise PlanError(str(e)) from e
    tokens = cfg.batch_size * cfg.seq_len / devices
    model_flops = llama.flops_per_token(cfg.model, cfg.seq_len) * tokens
    # remat recomputes the forward (a third of the 6N) once more; selective about half of it
    recompute = {"none": 0.0, "selective": 0.5, "full": 1.0}[cfg.remat]
    flops = model_flops * (1 + recompute / 3)
    notes = []
    if sizes["stage"] > 1:
        from lmsys.parallel.pipeline import bubble_fraction

        bubble = bubble_fraction(sizes["stage"], cfg.pipeline.microbatches or sizes["stage"],
                                 cfg.pipeline.repeats)
        flops /= 1 - bubble
        notes.append(f"pipeline bubble {bubble:.0%} counted as idle compute")
    return Plan(cfg, sizes, hw, memory, collectives, flops, model_flops, notes=notes)


# ----------------------------------------------------------------------------- TPU AOT compile


def tpu_devices(topology: str) -> list:
    """The devices of a TPU topology (e.g. `v5p:4x4x4`, chips per dimension) for
    ahead-of-time compilation with the real TPU compiler, no TPU needed (libtpu must be
    importable: `pip install 'lmsys[tpu]'`). GCP's slice names count TensorCores (v5p-128 is
    4x4x4 = 64 chips)."""
    import os

    from jax.experimental import topologies

    # an ahead-of-time compile owns no TPU: let several processes (tests, a search) load libtpu
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
    except Exception as e:  # no libtpu, or a topology name it does not know
        raise PlanError(f"cannot get TPU topology {topology!r} ({type(e).__name__}: {e}); it needs "
                        "libtpu (pip install 'lmsys[tpu]') and a name like v5p:4x4x4") from e


def aot_compile(cfg: Config, devices) -> tuple:
    """Compiles `cfg`'s train step for a mesh of `devices` (the first ones it needs; TPU
    topology devices compile ahead of time) without allocating arrays: (compiled, sizes)."""
    from lmsys.parallel import Rules
    from lmsys.parallel.mesh import build_mesh
    from lmsys.train.step import Trainer

    devices = list(devices)
    n = len(devices) if -1 in (getattr(cfg.mesh, a) for a in MESH_AXES) else math.prod(
        getattr(cfg.mesh, a) for a in MESH_AXES)
    if n > len(devices):
        raise PlanError(f"the mesh needs {n} devices, {len(devices)} given")
    mesh = build_mesh(cfg.mesh, devices[:n])
    trainer = Trainer(cfg, Rules(mesh))
    sizes = dict(mesh.shape)
    return trainer.step.lower(trainer.abstract_state, trainer.abstract_batch()).compile(), sizes


def compiled_figures(compiled, n_devices: int) -> dict:
    """Per-device memory (XLA's memory_analysis), collective bytes by kind and matmul FLOPs
    (each loop body times its trip count) of a compiled step."""
    from lmsys.plan.hlo import collective_bytes, matmul_flops

    ma = compiled.memory_analysis()
    text = compiled.as_text()
    coll = collective_bytes(text, n_devices)
    flops = matmul_flops(text)
    return {"arguments": ma.argument_size_in_bytes, "temporaries": ma.temp_size_in_bytes,
            "outputs": ma.output_size_in_bytes, "aliased": ma.alias_size_in_bytes,
            "total": ma.argument_size_in_bytes + ma.temp_size_in_bytes
            + ma.output_size_in_bytes - ma.alias_size_in_bytes,
            "collective_result": dict(coll.result), "collective_wire": dict(coll.wire),
            "collective_count": dict(coll.count), "unknown_trip_counts": coll.unknown_trip_counts,
            "matmul_flops": flops.flops, "opaque_kernels": dict(flops.opaque_custom_calls)}


def plan_topology(cfg: Config, topology: str, hardware: str | None = None) -> Plan:
    """`analyze` for every chip of a TPU topology, plus the compiled step's figures."""
    devices = tpu_devices(topology)
    hardware = hardware or topology.split(":")[0]
    plan = analyze(cfg, len(devices), hardware)
    compiled, _ = aot_compile(cfg, devices)
    plan.compiled = compiled_figures(compiled, len(devices))
    return plan


# ----------------------------------------------------------------------------- search


def _factorizations(n: int, k: int):
    """Ordered k-tuples of positive ints whose product is n."""
    if k == 1:
        yield (n,)
        return
    for d in range(1, n + 1):
        if n % d == 0:
            for rest in _factorizations(n // d, k - 1):
                yield (d, *rest)


def search(cfg: Config, devices: int, hardware: str, *, max_tensor: int = 8) -> list[Plan]:
    """Every data x fsdp x tensor mesh of `devices` (x expert for a mixture of experts; tensor <=
    max_tensor: tensor parallelism wants the fast links inside one node or slice) and remat
    policy that the analytical model says fits, fastest first (roofline step time; then less
    memory)."""
    plans = []
    axes = ("data", "fsdp", "tensor") + (("expert",) if cfg.model.n_experts else ())
    for sizes, remat in itertools.product(_factorizations(devices, len(axes)), ("none", "selective", "full")):
        if sizes[2] > max_tensor:
            continue
        mesh = dataclasses.replace(cfg.mesh, **{**dict.fromkeys(MESH_AXES, 1), **dict(zip(axes, sizes))})
        cand = dataclasses.replace(cfg, mesh=mesh, remat=remat)
        try:
            plan = analyze(cand, devices, hardware)
        except (PlanError, ConfigError):
            continue
        if plan.fits:
            plans.append(plan)
    return sorted(plans, key=lambda p: (round(p.step_time, 4), p.total_memory))


def search_topology(cfg: Config, topology: str, hardware: str | None = None, *,
                    confirm: int = 3) -> list[Plan]:
    """`search` for every chip of a TPU topology, its answer confirmed by the TPU compiler: the
    best plans are compiled ahead of time in order until one fits by its compiled memory (a
    plan the compiler says does not fit is dropped); PlanError when none of the best `confirm`
    does. The first plan of a non-empty result carries `compiled`."""
    devices = tpu_devices(topology)
    plans = search(cfg, len(devices), hardware or topology.split(":")[0])
    for plan in plans[:confirm]:
        compiled, _ = aot_compile(plan.cfg, devices)
        plan.compiled = compiled_figures(compiled, len(devices))
        if plan.fits:
            return [p for p in plans if p.fits]
    if plans:
        tried = ", ".join(f"{mesh_text(p.sizes)} remat {p.cfg.remat}: {_gb(p.compiled['total'])} GB"
                          for p in plans[:confirm])
        raise PlanError(f"the TPU compiler needs more than {USABLE:.0%} of "
                        f"{plans[0].hardware.memory / 1e9:.0f} GB per device for each of the best "
                        f"{min(confirm, len(plans))} plans ({tried}); use more chips, a smaller batch or seq_len")
    return plans


def why(plan: Plan, best: Plan | None = None) -> str:
    """One line on what bounds this plan and how it compares with the best."""
    bound = "compute-bound" if plan.compute_time >= plan.comm_time else "communication-bound"
    parts = [f"{bound} (matmuls {plan.compute_time * 1e3:.0f} ms, collectives {plan.comm_time * 1e3:.0f} ms)",
             f"{plan.total_memory / 1e9:.1f} of {USABLE * plan.hardware.memory / 1e9:.0f} GB usable"]
    if plan.cfg.remat != "none":
        parts.append(f"remat {plan.cfg.remat} recomputes {'all' if plan.cfg.remat == 'full' else 'half'} "
                     "of the forward")
    if best is not None and best is not plan:
        parts.append(f"{plan.step_time / best.step_time:.2f}x the best step time")
    return "; ".join(parts)


# ----------------------------------------------------------------------------- printing


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f}"


def mesh_text(sizes: dict[str, int]) -> str:
    return " x ".join(f"{a} {n}" for a, n in sizes.items() if n > 1) or "1 device"


def render(plan: Plan) -> str:
    """The plan as a readable table (GB = 1e9 bytes)."""
    c = plan.cfg
    lines = [f"plan: {c.model.n_layers}-layer d_model {c.model.d_model} "
             f"({llama.count_params(c.model) / 1e9:.2f}B params), batch {c.batch_size} x seq {c.seq_len}, "
             f"{c.dtype}, remat {c.remat}, loss_chunk {c.loss_chunk}",
             f"      {plan.devices} x {plan.hardware.name} ({plan.hardware.memory / 1e9:.0f} GB), mesh "
             f"{mesh_text(plan.sizes)}", ""]
    comp = plan.compiled
    head = f"{'memory per device (GB)':<28}{'analytical':>12}"
    lines.append(head + (f"{'compiled':>12}" if comp else ""))
    for k, v in plan.memory.items():
        lines.append(f"  {k:<26}{_gb(v):>12}")
    temps = plan.total_memory - plan.arguments
    lines.append(f"  {'= arguments':<26}{_gb(plan.arguments):>12}" + (f"{_gb(comp['arguments']):>12}" if comp else ""))
    lines.append(f"  {'= temporaries':<26}{_gb(temps):>12}" + (f"{_gb(comp['temporaries']):>12}" if comp else ""))
    lines.append(f"  {'= total':<26}{_gb(plan.total_memory):>12}" + (f"{_gb(comp['total']):>12}" if comp else ""))
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines.append(f"  {verdict} in {USABLE:.0%} of {plan.hardware.memory / 1e9:.0f} GB")
    lines += ["", f"{'collective GB per device per step':<36}{'analytical min (wire)':>22}"]
    for k, v in plan.collectives.items():
        lines.append(f"  {k:<34}{_gb(v):>22}")
    lines.append(f"  {'= total':<34}{_gb(sum(plan.collectives.values())):>22}")
    if comp:
        lines += ["", f"{'compiled collectives (GB/device/step)':<40}{'result':>10}{'wire':>10}{'count':>8}"]
        for k in comp["collective_result"]:
            if comp["collective_count"][k]:
                lines.append(f"  {k:<38}{_gb(comp['collective_result'][k]):>10}"
                             f"{_gb(comp['collective_wire'][k]):>10}{comp['collective_count'][k]:>8}")
        result, wire = sum(comp["collective_result"].values()), sum(comp["collective_wire"].values())
        lines.append(f"  {'= total':<38}{_gb(result):>10}{_gb(wire):>10}")
        minimum = sum(plan.collectives.values())
        if minimum:
            lines.append(f"  compiled / analytical minimum: {result / minimum:.2f}x result bytes, "
                         f"{wire / minimum:.2f}x wire bytes")
    lines += ["", f"matmul TFLOP per device per step: {plan.flops / 1e12:.1f} analytical"
              + (f", {comp['matmul_flops'] / 1e12:.1f} compiled (loop-weighted HLO count"
                 + (f"; {sum(comp['opaque_kernels'].values())} kernel calls of unstated FLOPs: "
                    f"{', '.join(comp['opaque_kernels'])}" if comp["opaque_kernels"] else "") + ")"
                 if comp else "")]
    lines.append(f"roofline step: {plan.step_time * 1e3:.0f} ms (matmuls {plan.compute_time * 1e3:.0f} ms at "
                 f"{plan.hardware.peak_flops / 1e12:.0f} TFLOP/s, collectives {plan.comm_time * 1e3:.0f} ms at "
                 f"{plan.hardware.link_bandwidth / 1e9:.0f} GB/s), MFU {plan.mfu:.0%}, "
                 f"{plan.tokens_per_second:,.0f} tokens/s")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def render_search(plans: list[Plan], top: int) -> str:
    if not plans:
        return "no mesh and remat policy fits; use more devices, a smaller batch or seq_len, or bfloat16"
    best = plans[0]
    lines = [f"{len(plans)} plans fit; the best {min(top, len(plans))}, fastest first:",
             f"{'#':>3}  {'mesh':<28}{'remat':<11}{'GB/device':>10}{'compiled':>10}{'step ms':>9}{'MFU':>6}"]
    for i, p in enumerate(plans[:top], 1):
        compiled = _gb(p.compiled["total"]) if p.compiled else "-"
        lines.append(f"{i:>3}  {mesh_text(p.sizes):<28}{p.cfg.remat:<11}{_gb(p.total_memory):>10}"
                     f"{compiled:>10}{p.step_time * 1e3:>9.0f}{p.mfu:>6.0%}")
        lines.append(f"     why: {why(p, best)}")
    if best.compiled:
        lines.append(f"\nconfirmed by the TPU compiler: plan 1 needs {_gb(best.compiled['total'])} GB per "
                     f"device compiled, {USABLE:.0%} of {best.hardware.memory / 1e9:.0f} GB usable")
    keys = " ".join(f"mesh.{a}={n}" for a, n in best.sizes.items() if n > 1)
    lines.append(f"\nrun the best: lmsys train CONFIG {keys} remat={best.cfg.remat}")
    return "\n".join(lines)
