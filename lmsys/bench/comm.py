"""Collective bytes per device of the compiled train step, per parallelism strategy, next to the
analytical minimum (lmsys.parallel.analysis.collective_bytes_min).

    python -m lmsys.bench.comm                      # all strategies, `small` preset, 8 CPU devices
    python -m lmsys.bench.comm --only data8 fsdp8   # a subset

On a CPU this module emulates 8 devices itself (it sets
`XLA_FLAGS=--xla_force_host_platform_device_count=8` when jax is not imported yet). For each
strategy it builds the Trainer, compiles the train step ahead of time
(`trainer.step.lower(abstract_state, abstract_batch).compile()`, no arrays are allocated) and
parses the compiled, SPMD-partitioned HLO text (`compiled.as_text()`) for all-reduce, all-gather,
reduce-scatter, all-to-all and collective-permute, incl. the async `-start`/`-done` pairs
(counted once, at `-done`). Shapes in that HLO are per device.

Two byte counts per collective:
- result bytes: the bytes of the op's result shape(s), per device;
- wire bytes: what one device sends with the textbook ring/bandwidth-optimal algorithm for a
  group of n devices: all-reduce 2(n-1)/n x result, all-gather (n-1)/n x result, reduce-scatter
  (n-1) x result (= (n-1)/n x its input), all-to-all (n-1)/n x result, collective-permute 1 x
  result (devices that only receive or only send in a permute are counted as sending).
A collective inside a `while` loop body counts once per iteration: the trip count is XLA's
`known_trip_count` annotation on the while op (the CPU compiler writes it), else read from a
loop condition `counter < constant(N)` (the TPU compiler's HLO: jax's scans count from 0 by 1);
a loop with neither counts once and is flagged as `unknown_trip_counts`. Collectives inside
`conditional` branches count as if every branch ran. The analytical minimum uses the wire convention, so `ratio` = measured wire / minimum wire.
"""

from __future__ import annotations

import os
import sys

if "jax" not in sys.modules and "xla_force_host_platform_device_count" not in os.environ.get(
        "XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # (imports after XLA_FLAGS: it must be set before jax is imported)
import datetime
import math
import re
from dataclasses import dataclass, field

import jax
import numpy as np
from jax.experimental import topologies
from jax.sharding import AxisType, Mesh

from lmsys.config import from_dict
from lmsys.parallel import Rules
from lmsys.parallel.analysis import collective_bytes_min
from lmsys.parallel.mesh import MESH_AXES, mesh_shape
from lmsys.train.step import Trainer

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2,
            "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}

_SHAPE = re.compile(r"\b(" + "|".join(ITEMSIZE) + r")\[([0-9,]*)\]")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([\w\-]+)\((.*)$")
_CALLED = re.compile(r"\b(?:body|condition|to_apply|calls|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def shape_bytes(text: str) -> int:
    """Bytes of every array shape in an HLO type string (`f32[8,64]`, a tuple of them, ...)."""
    return sum(ITEMSIZE[t] * math.prod(int(d) for d in dims.split(",") if d) for t, dims in _SHAPE.findall(text))


def group_size(attrs: str, n_devices: int) -> int:
    """Devices per replica group of a collective, from its HLO attributes: an explicit list
    `{{0,1},{2,3}}`, the iota form `[groups,size]<=[...]`, or the mesh form
    `mesh['a'=4,'b'=2], device_ids=(...) {'a'}` (the product of the named axes; device_ids
    optional)."""
    m = re.search(r"source_target_pairs=", attrs)
    if m:
        return 2
    m = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", attrs)
    if m:
        sizes = {k.strip("'\" "): int(v) for k, v in (kv.split("=") for kv in m.group(1).split(","))}
        return math.prod(sizes[a.strip("'\" ")] for a in m.group(2).split(",") if a.strip())
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=\{\{([^}]*)\}", attrs)
    if m:
        return len(m.group(1).split(","))
    if re.search(r"replica_groups=\{\}", attrs) or "replica_groups" not in attrs:
        return n_devices  # empty groups: all devices
    raise ValueError(f"cannot read the replica groups of a collective from: {attrs[:200]}")


WIRE = {"all-reduce": lambda n: 2 * (n - 1) / n, "all-gather": lambda n: (n - 1) / n,
        "reduce-scatter": lambda n: n - 1, "all-to-all": lambda n: (n - 1) / n,
        "collective-permute": lambda n: 1.0}


@dataclass
class CollectiveBytes:
    """Per-device collective bytes of one compiled program, by kind."""

    result: dict[str, float] = field(default_factory=lambda: dict.fromkeys(KINDS, 0.0))
    wire: dict[str, float] = field(default_factory=lambda: dict.fromkeys(KINDS, 0.0))
    count: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    unknown_trip_counts: int = 0

    @property
    def total_result(self) -> float:
        return sum(self.result.values())

    @property
    def total_wire(self) -> float:
        return sum(self.wire.values())


def _trip_count_from_condition(lines: list[str]) -> int | None:
    """N for a loop condition whose root is `compare(counter, constant(N)), direction=LT` (how
    jax's scan and fori_loop lower: the counter starts at 0 and steps by 1); else None."""
    consts = {}
    for line in lines:
        m = _INSTR.match(line)
        if m and m.group(3) == "constant" and re.match(r"[su]\d+\[\]", m.group(2)):
            consts[m.group(1)] = int(m.group(4).split(")")[0])
    root = next((ln for ln in lines if ln.lstrip().startswith("ROOT")), "")
    m = re.search(r"compare\(%?[\w.\-]+, %?([\w.\-]+)\), direction=LT", root)
    return consts.get(m.group(1)) if m else None


def collective_bytes(hlo_text: str, n_devices: int) -> CollectiveBytes:
    """Parses compiled (SPMD-partitioned) HLO text: each collective's per-device result bytes
    and wire bytes (see the module docstring), times the trip counts of the while loops around
    it, summed by kind."""
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        if not line.startswith((" ", "\t")) and line.rstrip().endswith("{"):
            m = _COMP.match(line)
            if m:
                current = m.group(1)
                comps[current] = []
                if line.startswith("ENTRY"):
                    entry = current
                continue
        if current is not None and line.strip() and line.strip() != "}":
            comps[current].append(line)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")

    # how many times each computation runs per call of the entry
    mult: dict[str, float] = {}
    out = CollectiveBytes()

    def visit(name: str, times: float):
        mult[name] = mult.get(name, 0) + times
        for line in comps.get(name, ()):
            m = _INSTR.match(line)
            if not m:
                continue
            op, rest = m.group(3), m.group(4)
            called = _CALLED.findall(rest)
            b = _BRANCHES.search(rest)
            if b:
                called += [c.strip().lstrip("%") for c in b.group(1).split(",") if c.strip()]
            trips = 1
            if op == "while":
                t = _TRIP.search(rest)
                cond = re.search(r"\bcondition=%?([\w.\-]+)", rest)
                trips = int(t.group(1)) if t else _trip_count_from_condition(comps.get(cond.group(1) if cond else "", []))
                if trips is None:
                    out.unknown_trip_counts += 1
                    trips = 1
            for c in called:
                if c in comps and not c.startswith("fused_computation"):
                    # a while's body (and condition) run `trips` times
                    visit(c, times * (trips if op == "while" else 1))

    visit(entry, 1.0)
    for name, times in mult.items():
        for line in comps[name]:
            m = _INSTR.match(line)
            if not m:
                continue
            result_type, op, rest = m.group(2), m.group(3), m.group(4)
            if op.endswith("-start"):
                continue  # counted at its -done
            kind = op.removesuffix("-done")
            if kind not in KINDS:
                continue
            if op.endswith("-done"):  # the -done has no attributes: take them from its -start
                start = rest.split(")")[0].strip().lstrip("%")
                rest = next((ln for ln in comps[name] if re.match(rf"^\s*(?:ROOT\s+)?%?{re.escape(start)}\s*=", ln)), rest)
            nbytes = shape_bytes(result_type) * times
            n = group_size(rest, n_devices)
            if n <= 1:
                continue
            out.count[kind] += int(times)
            out.result[kind] += nbytes
            out.wire[kind] += nbytes * WIRE[kind](n)
    return out


# name -> config tree (over --preset, --batch-size, --seq-len, --dtype)
STRATEGIES = {
    "data8": {"mesh": {"data": 8, "fsdp": 1}},
    "fsdp8": {"mesh": {"fsdp": 8}},
    "tensor8": {"mesh": {"tensor": 8, "fsdp": 1}},
    "zero1-data8": {"mesh": {"data": 8, "fsdp": 1}, "optimizer": {"zero1": True}},
    "sequence8-ring": {"mesh": {"sequence": 8, "fsdp": 1, "sequence_method": "ring"}},
    "sequence8-allgather": {"mesh": {"sequence": 8, "fsdp": 1, "sequence_method": "allgather"}},
    "stage2-gpipe": {"mesh": {"stage": 2, "fsdp": 1}, "pipeline": {"microbatches": 4}},  # 2 devices
    "expert4-moe": {"mesh": {"expert": 4, "fsdp": 1}, "model": {"preset": "tiny-moe"}},  # 4 devices
    "data2-fsdp2-tensor2": {"mesh": {"data": 2, "fsdp": 2, "tensor": 2}},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m lmsys.bench.comm", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small", help="model preset of the dense strategies")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--only", nargs="*", default=None, choices=list(STRATEGIES), metavar="NAME",
                   help=f"strategies to run (default all: {', '.join(STRATEGIES)})")
    p.add_argument("--platform", choices=("cpu", "tpu"), default="cpu",
                   help="cpu: the local devices; tpu: compile ahead of time for --tpu-topology")
    p.add_argument("--tpu-topology", default="v5p:2x2x2", help="with --platform tpu (8 chips)")
    p.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every strategy, e.g. --set model.n_layers=2")
    return p.parse_args(argv)


def strategy_config(name: str, preset: str, batch_size: int, seq_len: int, dtype: str = "float32",
                    overrides: list[str] = ()):
    """The Config of one named strategy (STRATEGIES) on a model preset."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
    tree = STRATEGIES[name]
    tree = {k: dict(v) for k, v in tree.items()}
    tree.setdefault("model", {}).setdefault("preset", preset)
    tree.update(batch_size=batch_size, seq_len=seq_len, dtype=dtype)
    return from_dict(tree, list(overrides))


def measure(cfg, devices=None) -> tuple[CollectiveBytes, dict[str, int]]:
    """Compiles `cfg`'s train step on a mesh of the first devices it needs (of `devices`,
    default `jax.devices()`; TPU topology devices compile ahead of time without a TPU); returns
    its collective bytes and the resolved mesh sizes."""
    devices = list(jax.devices() if devices is None else devices)
    if -1 in (getattr(cfg.mesh, a) for a in MESH_AXES):
        n = len(devices)
    else:
        n = math.prod(getattr(cfg.mesh, a) for a in MESH_AXES)
    if n > len(devices):
        raise SystemExit(f"this strategy needs {n} devices, {len(devices)} found; on a CPU set "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before jax is imported")
    sizes = mesh_shape(cfg.mesh, n)
    # not build_mesh: these may be TPU topology devices, not jax.devices()
    mesh = Mesh(np.asarray(devices[:n]).reshape(tuple(sizes[a] for a in MESH_AXES)), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(MESH_AXES))
    trainer = Trainer(cfg, Rules(mesh))
    compiled = trainer.step.lower(trainer.abstract_state, trainer.abstract_batch()).compile()
    return collective_bytes(compiled.as_text(), n), sizes


def tpu_devices(topology: str) -> list:
    """The devices of a TPU topology (e.g. `v5p:2x2x2`) for ahead-of-time compilation with the
    real TPU compiler, no TPU needed (libtpu must be importable: `pip install jax[tpu]`)."""
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
    except Exception as e:  # no libtpu, or a topology name it does not know
        raise SystemExit(f"cannot get TPU topology {topology!r} ({type(e).__name__}: {e}); "
                         "--platform tpu needs libtpu (pip install 'jax[tpu]') and a topology "
                         "name like v5p:2x2x2") from e


def _mb(x: float) -> str:
    return f"{x / 2**20:.2f}" if x else "-"


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    names = args.only or list(STRATEGIES)
    devices = tpu_devices(args.tpu_topology) if args.platform == "tpu" else jax.devices()
    rows = []
    header = (f"{'strategy':<22}" + "".join(f"{k:>19}" for k in KINDS)
              + f"{'total':>10}{'wire':>10}{'min wire':>10}{'ratio':>7}")
    print("collective MiB per device per step, by kind (result shapes; x loop trip counts); "
          "wire = sent with ring algorithms")
    print(header, flush=True)
    for name in names:
        cfg = strategy_config(name, args.preset, args.batch_size, args.seq_len, args.dtype, args.set)
        got, sizes = measure(cfg, devices)
        minimum = collective_bytes_min(cfg, sizes)
        total_min = sum(minimum.values())
        ratio = got.total_wire / total_min if total_min else float("nan")
        row = {"strategy": name, "mesh": sizes, "result": got.result, "wire": got.wire, "count": got.count,
               "total_result": got.total_result, "total_wire": got.total_wire, "min": minimum,
               "total_min": total_min, "ratio": ratio, "unknown_trip_counts": got.unknown_trip_counts}
        rows.append(row)
        cells = "".join(f"{_mb(got.result[k]) + (f' ({got.count[k]})' if got.count[k] else ''):>19}" for k in KINDS)
        print(f"{name:<22}{cells}{_mb(got.total_result):>10}{_mb(got.total_wire):>10}{_mb(total_min):>10}"
              f"{ratio:>7.2f}" + (f"  ({got.unknown_trip_counts} loops of unknown trip count)"
                                  if got.unknown_trip_counts else ""), flush=True)
    if args.markdown:
        print("\n| strategy | " + " | ".join(KINDS) + " | total | wire | min wire | ratio |")
        print("|---" * (len(KINDS) + 5) + "|")
        for row in rows:
            cells = [_mb(row["result"][k]) + (f" ({row['count'][k]})" if row["count"][k] else "") for k in KINDS]
            print(f"| {row['strategy']} | " + " | ".join(cells) + f" | {_mb(row['total_result'])} | "
                  f"{_mb(row['total_wire'])} | {_mb(row['total_min'])} | {row['ratio']:.2f} |")
    print("\nanalytical minimum terms (MiB, wire):")
    for row in rows:
        print(f"  {row['strategy']:<22}" + "; ".join(f"{k} {_mb(v)}" for k, v in row["min"].items()))
    print(f"\n(n) = collectives executed per step. {datetime.datetime.now(datetime.UTC):%Y-%m-%d} "
          f"{devices[0].device_kind} x {len(devices)} ({args.platform}"
          f"{' ' + args.tpu_topology + ', ahead-of-time compile' if args.platform == 'tpu' else ''}), jax {jax.__version__}; "
          f"preset {args.preset} (expert: tiny-moe), batch {args.batch_size} x seq {args.seq_len}, {args.dtype}")
    return rows


if __name__ == "__main__":
    main()
