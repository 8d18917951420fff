"""Times lmsys's train step against a minimal hand-written JAX step of the same model.

    python -m lmsys.bench.train --preset small --batch-size 8 --seq-len 256

Both steps start from the same parameters and train on the same synthetic batch (random
tokens, two packed documents per row) in one process. Their first-step losses must agree, then
timed blocks of `--steps` steps alternate between the two `--repeats` times (so machine noise
hits both alike; the side that goes first alternates too); each side reports the per-step mean
of its median block. The goal is a framework cost of at most 5%: lmsys/handwritten step time
<= 1.05. `--set model.n_layers=2` (any lmsys config key) shrinks or changes the model.

By default lmsys runs on a 1-device mesh (the first device), because the hand-written step is
single-device. `--mesh data=1,fsdp=-1,tensor=1` runs lmsys on a mesh of all devices instead;
the ratio then compares a sharded step with a single-device one.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import jax
import numpy as np

from lmsys.bench import handwritten
from lmsys.config import from_dict
from lmsys.models import llama
from lmsys.parallel import Rules, build_mesh
from lmsys.train.metrics import mfu, peak_flops
from lmsys.train.step import DTYPES, Trainer

LOSS_RTOL = {"float32": 1e-5, "bfloat16": 1e-2}
GOAL = 1.05


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m lmsys.bench.train", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", help="model preset (lmsys/models/presets.py)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed steps per block")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
    p.add_argument("--repeats", type=int, default=3, help="timed blocks per side, alternating")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--remat", choices=("none", "full", "selective"), default="none")
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="peak TFLOP/s per device for MFU (default: known peak of the device kind)")
    p.add_argument("--mesh", default="", help="e.g. data=1,fsdp=-1,tensor=1 (default: 1 device)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override, e.g. --set model.n_layers=2 (repeatable)")
    return p.parse_args(argv)


def synthetic_batch(batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> dict:
    """Random tokens; each row packs two documents split at a random point."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, (batch_size, seq_len + 1), dtype=np.int32)
    idx = np.arange(seq_len)[None, :]
    cut = rng.integers(1, seq_len, (batch_size, 1))
    second = idx >= cut
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
            "positions": np.where(second, idx - cut, idx).astype(np.int32),
            "segment_ids": (1 + second).astype(np.int32),
            "loss_mask": (idx != cut - 1).astype(np.float32)}  # no predicting across documents


def timed_block(step, state, n: int):
    """Runs `n` steps; returns the last state and the mean seconds per step."""
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(n):
        state = step(state)
    jax.block_until_ready(state)
    return state, (time.perf_counter() - t0) / n


def main(argv=None) -> dict:
    args = parse_args(argv)
    mesh_overrides = ([f"mesh.{kv.strip()}" for kv in args.mesh.split(",")] if args.mesh
                      else ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"])
    total_steps = 1 + args.warmup + args.repeats * args.steps
    cfg = from_dict({"model": {"preset": args.preset}, "batch_size": args.batch_size,
                     "seq_len": args.seq_len, "dtype": args.dtype, "remat": args.remat,
                     "steps": total_steps}, mesh_overrides + args.set)
    mesh = build_mesh(cfg.mesh, None if args.mesh else jax.devices()[:1])
    trainer = Trainer(cfg, Rules(mesh))
    device = jax.devices()[0]
    m, o = cfg.model, cfg.optimizer

    # --- both steps, from the same parameters, on the same batch
    batch = synthetic_batch(cfg.batch_size, cfg.seq_len, m.vocab_size)
    lm_batch = jax.device_put(batch, trainer.batch_sharding)
    hw_batch = jax.device_put(batch, device)
    lm_state = trainer.init(cfg.seed)
    # A plain single-device copy: lmsys's step donates (and overwrites) its state.
    hw_params = jax.tree.map(lambda x: jax.device_put(np.array(x), device), lm_state["params"])
    optimizer = handwritten.make_optimizer(
        lr=o.lr, warmup_steps=o.warmup_steps, total_steps=cfg.steps, min_lr_ratio=o.min_lr_ratio,
        b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, clip_norm=o.clip_norm)
    rope_scaling = None
    if m.rope_scaling_factor:  # Llama-3 frequency scaling
        rope_scaling = {"factor": m.rope_scaling_factor, "low_freq_factor": m.rope_low_freq_factor,
                        "high_freq_factor": m.rope_high_freq_factor,
                        "original_max_position": m.rope_original_max_position}
    hw_train_step = handwritten.make_train_step(
        optimizer, rope_theta=m.rope_theta, norm_eps=m.norm_eps, rope_scaling=rope_scaling,
        dtype=DTYPES[cfg.dtype], remat=cfg.remat)

    def lm_step(s):  # s = (state, metrics)
        return trainer.step(s[0], lm_batch)

    def hw_step(s):  # s = (params, opt_state, loss)
        return hw_train_step(s[0], s[1], hw_batch)

    # --- first step: compile, and check that both compute the same thing
    t0 = time.perf_counter()
    lm = jax.block_until_ready(lm_step((lm_state, None)))
    lm_compile = time.perf_counter() - t0
    hw_opt_state = jax.device_put(optimizer.init(hw_params), device)  # committed: no recompile
    t0 = time.perf_counter()
    hw = jax.block_until_ready(hw_step((hw_params, hw_opt_state, None)))
    hw_compile = time.perf_counter() - t0
    lm_loss, hw_loss = float(lm[1]["loss"]), float(hw[2])
    loss_rel = abs(lm_loss - hw_loss) / abs(hw_loss)
    param_diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                     for a, b in zip(jax.tree.leaves(lm[0]["params"]), jax.tree.leaves(hw[0])))

    for _ in range(args.warmup):
        lm, hw = lm_step(lm), hw_step(hw)
    # Timed blocks alternate, and so does which side goes first in each pair.
    state = {"lmsys": lm, "handwritten": hw}
    steps = {"lmsys": lm_step, "handwritten": hw_step}
    times = {"lmsys": [], "handwritten": []}
    for r in range(args.repeats):
        for side in ("lmsys", "handwritten")[::1 if r % 2 == 0 else -1]:
            state[side], dt = timed_block(steps[side], state[side], args.steps)
            times[side].append(dt)

    # --- report
    tokens = cfg.batch_size * cfg.seq_len
    fpt = llama.flops_per_token(m, cfg.seq_len)
    peak = peak_flops(device.device_kind, args.peak_tflops * 1e12)
    rows = []
    for name, n_dev in (("lmsys", mesh.size), ("handwritten", 1)):
        t = statistics.median(times[name])
        u = mfu(tokens / t, fpt, n_dev, peak)
        rows.append((name, t, tokens / t, "n/a" if u is None else f"{100 * u:.1f}%",
                     " ".join(f"{1e3 * x:.2f}" for x in times[name])))
    ratio = rows[0][1] / rows[1][1]
    tol = LOSS_RTOL[cfg.dtype]
    mesh_desc = " ".join(f"{a}={n}" for a, n in mesh.shape.items())

    model = " ".join([args.preset, *args.set])
    devices = f"{mesh.size} device{'s' * (mesh.size > 1)}"
    lines = [
        "lmsys train-step benchmark",
        f"date (UTC)    {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M:%S}",
        f"device        {device.device_kind} (backend {jax.default_backend()}, jax {jax.__version__})",
        f"model         {model}: {llama.count_params(m):,} params, {fpt / 1e6:.1f} MFLOP/token",
        (f"run           batch {cfg.batch_size} x seq {cfg.seq_len} = {tokens:,} tokens/step, "
         f"{cfg.dtype}, remat {cfg.remat}"),
        f"lmsys mesh    {mesh_desc} ({devices}); hand-written step: 1 device",
        (f"timing        median of {args.repeats} blocks x {args.steps} steps per side, "
         f"alternating; after 1 + {args.warmup} untimed steps"),
        f"first call    lmsys {lm_compile:.1f} s, handwritten {hw_compile:.1f} s (compile + 1 step)",
        "",
        f"{'':<12} {'step (ms)':>10} {'tokens/s':>12} {'MFU':>7}   blocks (ms/step)",
    ]
    lines += [f"{n:<12} {1e3 * t:>10.2f} {tps:>12,.0f} {u:>7}   {b}" for n, t, tps, u, b in rows]
    lines += [
        "",
        (f"first-step loss: lmsys {lm_loss:.7f}, handwritten {hw_loss:.7f}, "
         f"relative difference {loss_rel:.1e} (tolerance {tol:.0e})"),
        f"params after one step: max |lmsys - handwritten| = {param_diff:.1e}",
    ]
    if mesh.size > 1:
        lines.append(f"note: lmsys ran on {devices}, the hand-written step on 1")
    lines.append(f"lmsys/handwritten step time ratio: {ratio:.3f} (goal <= {GOAL})")
    print("\n".join(lines), flush=True)
    if not loss_rel <= tol:
        raise SystemExit(f"first-step losses differ: lmsys {lm_loss} vs handwritten {hw_loss}")
    return {"lmsys_loss": lm_loss, "handwritten_loss": hw_loss, "loss_rel_diff": loss_rel,
            "param_max_abs_diff": param_diff, "lmsys_step_s": rows[0][1],
            "handwritten_step_s": rows[1][1], "ratio": ratio}


if __name__ == "__main__":
    main()
