"""Collective bytes per device of the compiled train step, per parallelism strategy, next to the
analytical minimum (lmsys.plan.analysis.collective_bytes_min).

    python -m lmsys.bench.comm                      # all strategies, `small` preset, 8 CPU devices
    python -m lmsys.bench.comm --only data8 fsdp8   # a subset

On a CPU this module emulates 8 devices itself (it sets
`XLA_FLAGS=--xla_force_host_platform_device_count=8` when jax is not imported yet). For each
strategy it builds the Trainer, compiles the train step ahead of time
(`trainer.step.lower(abstract_state, abstract_batch).compile()`, no arrays are allocated) and
parses the compiled, SPMD-partitioned HLO text (`compiled.as_text()`) for all-reduce, all-gather,
reduce-scatter, all-to-all and collective-permute, incl. the async `-start`/`-done` pairs
(counted once, at `-done`), with lmsys.plan.hlo.collective_bytes. Shapes in that HLO are
per device. `--flops` adds each step's matmul FLOPs per device (lmsys.plan.hlo.matmul_flops).

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

import jax

from lmsys.config import from_dict
from lmsys.models.llama import flops_per_token
from lmsys.parallel.mesh import MESH_AXES
from lmsys.plan.analysis import collective_bytes_min
from lmsys.plan.hlo import KINDS, CollectiveBytes, collective_bytes, matmul_flops
from lmsys.plan.planner import PlanError, aot_compile
from lmsys.plan.planner import tpu_devices as plan_tpu_devices

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
    "stage2-expert2-moe": {"mesh": {"stage": 2, "expert": 2, "fsdp": 1}, "model": {"preset": "tiny-moe"},
                           "pipeline": {"microbatches": 4}},  # 4 devices
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
    p.add_argument("--flops", action="store_true",
                   help="also print each step's matmul GFLOP per device (lmsys.plan.hlo.matmul_flops, "
                        "loop trips included) next to the model's (flops_per_token x tokens / devices)")
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
    hlo_text, sizes = compile_step(cfg, devices)
    return collective_bytes(hlo_text, math.prod(sizes[a] for a in MESH_AXES)), sizes


def compile_step(cfg, devices=None) -> tuple[str, dict[str, int]]:
    """`measure`'s compile (lmsys.plan.planner.aot_compile): the compiled, SPMD-partitioned HLO text of
    `cfg`'s train step and the resolved mesh sizes."""
    compiled, sizes = aot_compile(cfg, jax.devices() if devices is None else devices)
    return compiled.as_text(), sizes


def tpu_devices(topology: str) -> list:
    """lmsys.plan.planner.tpu_devices, as a command-line error."""
    try:
        return plan_tpu_devices(topology)
    except PlanError as e:
        raise SystemExit(str(e)) from e


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
        hlo_text, sizes = compile_step(cfg, devices)
        n = math.prod(sizes[a] for a in MESH_AXES)
        got = collective_bytes(hlo_text, n)
        minimum = collective_bytes_min(cfg, sizes)
        total_min = sum(minimum.values())
        ratio = got.total_wire / total_min if total_min else float("nan")
        row = {"strategy": name, "mesh": sizes, "result": got.result, "wire": got.wire, "count": got.count,
               "total_result": got.total_result, "total_wire": got.total_wire, "min": minimum,
               "total_min": total_min, "ratio": ratio, "unknown_trip_counts": got.unknown_trip_counts}
        if args.flops:
            row["matmul_flops"] = matmul_flops(hlo_text)
            row["model_flops"] = flops_per_token(cfg.model, cfg.seq_len) * cfg.batch_size * cfg.seq_len / n
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
    if args.flops:
        print("\nmatmul GFLOP per device per step (compiled HLO, loop trips included) vs the model's "
              "(flops_per_token x tokens / devices):")
        for row in rows:
            f = row["matmul_flops"]
            print(f"  {row['strategy']:<22}{f.flops / 1e9:10.2f}{row['model_flops'] / 1e9:10.2f}"
                  f"{f.flops / row['model_flops']:7.3f}"
                  + (f"  (+ custom calls of unknown FLOPs: {f.opaque_custom_calls})" if f.opaque_custom_calls else "")
                  + (f"  ({f.unknown_trip_counts} loops of unknown trip count)" if f.unknown_trip_counts else ""))
    print(f"\n(n) = collectives executed per step. {datetime.datetime.now(datetime.UTC):%Y-%m-%d} "
          f"{devices[0].device_kind} x {len(devices)} ({args.platform}"
          f"{' ' + args.tpu_topology + ', ahead-of-time compile' if args.platform == 'tpu' else ''}), jax {jax.__version__}; "
          f"preset {args.preset} (expert: tiny-moe), batch {args.batch_size} x seq {args.seq_len}, {args.dtype}")
    return rows


if __name__ == "__main__":
    main()
