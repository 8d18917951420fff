"""Measures the pipeline bubble (lmsys.parallel.pipeline) next to the theory.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m lmsys.bench.pipeline --stages 4

For GPipe (repeats 1) and circular (repeats 2) with m = p, 2p, 4p microbatches of a fixed size,
times the jitted loss-and-gradient of the real train path (Trainer.grads: embedding, pipelined
layers, head) on a mesh of `--stages` stages. The time one microbatch's work adds, t_mb, is the
slope of a least-squares line through T(m); the measured bubble at m is the share of T(m) that
m microbatches' work does not explain, 1 - m * t_mb / T(m), printed next to (p-1)/(m*v+p-1).
Under SPMD an idle stage still computes (on a placeholder, result dropped), so the bubble costs
real time. Fixed per-call costs (launch, the loss) count as bubble here.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from lmsys.bench.train import synthetic_batch
from lmsys.config import from_dict
from lmsys.parallel import Rules, build_mesh
from lmsys.parallel.pipeline import bubble_fraction
from lmsys.train.step import Trainer


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m lmsys.bench.pipeline", description=__doc__.split("\n")[0])
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--rows", type=int, default=2, help="sequences per microbatch")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="timed calls per point (the fastest counts)")
    return p.parse_args(argv)


def time_grads(args, microbatches: int, repeats: int) -> float:
    """Seconds per call of the jitted Trainer.grads, fastest of `args.repeats`."""
    batch_size = microbatches * args.rows
    cfg = from_dict({"model": {"preset": "tiny", "vocab_size": 512, "d_model": 128, "n_layers": args.layers,
                               "n_heads": 4, "n_kv_heads": 4, "d_ff": 512},
                     "mesh": {"stage": args.stages, "fsdp": 1},
                     "pipeline": {"microbatches": microbatches, "repeats": repeats},
                     "batch_size": batch_size, "seq_len": args.seq_len})
    trainer = Trainer(cfg, Rules(build_mesh(cfg.mesh, jax.devices()[:args.stages])))
    params = trainer.init(0)["params"]
    batch = {k: jax.device_put(v, trainer.batch_sharding)
             for k, v in synthetic_batch(batch_size, args.seq_len, cfg.model.vocab_size).items()}
    grads = jax.jit(trainer.grads)
    jax.block_until_ready(grads(params, batch))
    best = float("inf")
    for _ in range(args.repeats):
        start = time.perf_counter()
        jax.block_until_ready(grads(params, batch))
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    p = args.stages
    if jax.device_count() < p:
        raise SystemExit(f"--stages {p} needs {p} devices, {jax.device_count()} found; on a CPU set "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={p}")
    rows = []
    print(f"{'schedule':>9} {'p':>2} {'m':>3} {'v':>2} {'ticks':>5} {'T ms':>8} {'measured':>8} {'theory':>7}")
    for v in (1, 2):
        ms = (p, 2 * p, 4 * p)
        times = {m: time_grads(args, m, v) for m in ms}
        t_mb = np.polyfit(ms, [times[m] for m in ms], 1)[0]
        for m in ms:
            row = {"schedule": "gpipe" if v == 1 else "circular", "p": p, "m": m, "v": v,
                   "ticks": m * v + p - 1, "ms": 1e3 * times[m], "measured": 1 - m * t_mb / times[m],
                   "theory": bubble_fraction(p, m, v)}
            rows.append(row)
            print(f"{row['schedule']:>9} {p:>2} {m:>3} {v:>2} {row['ticks']:>5} {row['ms']:>8.1f} "
                  f"{row['measured']:>8.3f} {row['theory']:>7.3f}")
    print(f"devices: {jax.devices()[0].device_kind} x {p}; layers {args.layers}, {args.rows} rows x "
          f"{args.seq_len} tokens per microbatch; jax {jax.__version__}")
    return rows


if __name__ == "__main__":
    main()
