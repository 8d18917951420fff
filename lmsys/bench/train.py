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

On a GPU (issue 24: training MFU beside PyTorch):

    python -m lmsys.bench.train --preset 1b --seq-len 4096 --batch-size 8 --dtype bfloat16 \
        --remat full --set loss_chunk=1024 --peer torch --measure-peak --json out.json
    python -m lmsys.bench.train --preset 8b --set model.n_layers=6 --seq-len 4096 --batch-size 4 \
        --dtype bfloat16 --remat full --set loss_chunk=1024 --peer torch --measure-peak

`--peer torch` times the same model in PyTorch + transformers instead of the hand-written JAX
step (lmsys.bench.torch_peer says how it is set up), both sides on one chip in one process, on
a batch of one document per row (SDPA takes no packed segment ids); JAX's allocator then grows
on demand instead of taking 75% of the GPU first; lmsys is first timed alone for one block
(`lmsys_solo_*`, written to `--json` at once, so a peer that never finishes leaves lmsys's
figures). `--peer none` times lmsys alone (on the same
one-document rows, so its figures compare with a `--peer torch` run's). MFU is
reported against the datasheet peak and, with `--measure-peak`, against a bf16 matmul timed on
the same chip (lmsys.bench.peaks says which FLOPs count); peak memory per side where the
backend reports it. The 8B shape fits one H200 (141 GB) at batch 4 x 4096, bf16 compute,
float32 params + Adam, remat full, loss_chunk 1024 up to 26 layers by `lmsys plan` (123 GB of
the 90% it allows); with the torch peer resident in the same process both sides must fit, so
6 layers (the plan: 50.5 GB for lmsys; torch by the same count ~38 GB of float32 params, grads
and Adam moments plus ~25 GB for the unchunked [4 x 4096 x 128k] logits and their gradient).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import jax
import numpy as np

from lmsys.bench import handwritten
from lmsys.bench.peaks import causal_flops_per_token, check_positive, matmul_peak, mfu_figures, peak_memory, write_json
from lmsys.config import from_dict
from lmsys.models import llama
from lmsys.parallel import Rules, build_mesh
from lmsys.train.step import DTYPES, Trainer

LOSS_RTOL = {"float32": 1e-5, "bfloat16": 1e-2}
TORCH_LOSS_RTOL = {"float32": 1e-4, "bfloat16": 2e-2}  # another library's op order / kernels
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
    p.add_argument("--peer", choices=("handwritten", "torch", "none"), default="handwritten",
                   help="the step timed beside lmsys's: the hand-written JAX step, PyTorch + "
                        "transformers on the same chip, or none")
    p.add_argument("--peer-cpu", action="store_true",
                   help="--peer torch without CUDA: run it on the CPU (float32, eager; for tests)")
    p.add_argument("--torch-compile", choices=("auto", "on", "off"), default="auto",
                   help="--peer torch: torch.compile the forward + loss (auto: on CUDA only)")
    p.add_argument("--measure-peak", action="store_true",
                   help="time a bf16 matmul on the same device and report MFU against it too")
    p.add_argument("--peak-n", type=int, default=8192, help="--measure-peak: n of the n^3 matmul")
    p.add_argument("--profile", default="", metavar="DIR",
                   help="after timing, write a JAX profiler trace of one lmsys block to DIR")
    p.add_argument("--json", default="", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    check_positive(p, args, ("batch_size", "seq_len", "steps", "repeats", "peak_n"))
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.peer != "torch" and (args.peer_cpu or args.torch_compile != "auto"):
        p.error("--peer-cpu and --torch-compile go with --peer torch")
    if args.peer == "torch" and args.mesh:
        p.error("--peer torch compares one chip with one chip; leave out --mesh")
    return args


def synthetic_batch(batch_size: int, seq_len: int, vocab_size: int, seed: int = 0,
                    documents: int = 2) -> dict:
    """Random tokens; with documents=2 each row packs two documents split at a random point,
    with 1 each row is one document."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, (batch_size, seq_len + 1), dtype=np.int32)
    idx = np.arange(seq_len)[None, :]
    cut = rng.integers(1, seq_len, (batch_size, 1)) if documents == 2 else np.full((batch_size, 1), seq_len)
    second = idx >= cut
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
            "positions": np.where(second, idx - cut, idx).astype(np.int32),
            "segment_ids": (1 + second).astype(np.int32),
            "loss_mask": (idx != cut - 1).astype(np.float32)}  # no predicting across documents


def timed_block(step, state, n: int, sync=jax.block_until_ready):
    """Runs `n` steps; returns the last state and the mean seconds per step."""
    sync(state)
    t0 = time.perf_counter()
    for _ in range(n):
        state = step(state)
    sync(state)
    return state, (time.perf_counter() - t0) / n


def build_config(args):
    """The run's lmsys config (validated: a bad --set fails here, naming the key)."""
    mesh_overrides = ([f"mesh.{kv.strip()}" for kv in args.mesh.split(",")] if args.mesh
                      else ["mesh.data=1", "mesh.fsdp=1", "mesh.tensor=1"])
    total_steps = 1 + args.warmup + args.repeats * args.steps + 2 * args.steps  # + solo and profile blocks
    return from_dict({"model": {"preset": args.preset}, "batch_size": args.batch_size,
                      "seq_len": args.seq_len, "dtype": args.dtype, "remat": args.remat,
                      "steps": total_steps}, mesh_overrides + args.set)


def _no_preallocation() -> None:
    """JAX takes 75% of a GPU at its first computation unless told not to; beside torch in one
    process it must grow on demand instead (XLA reads this once, when its backend starts)."""
    if "XLA_PYTHON_CLIENT_PREALLOCATE" in os.environ:
        return
    from jax._src import xla_bridge

    if not getattr(xla_bridge, "backends_are_initialized", lambda: True)():
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    elif jax.default_backend() == "gpu":
        print("note: JAX started before --peer torch could stop it preallocating 75% of the GPU; "
              "set XLA_PYTHON_CLIENT_PREALLOCATE=false", flush=True)


class _Side:
    """One timed side: `step(state) -> state`, its state, how to wait for it, its first loss."""

    def __init__(self, name, step, state, sync, loss, compile_s, devices):
        self.name, self.step, self.state, self.sync = name, step, state, sync
        self.loss, self.compile_s, self.devices, self.times = loss, compile_s, devices, []


def _handwritten_side(cfg, trainer, lm_state, batch, device):
    m, o = cfg.model, cfg.optimizer
    hw_batch = jax.device_put(batch, device)
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
    train_step = handwritten.make_train_step(
        optimizer, rope_theta=m.rope_theta, norm_eps=m.norm_eps, rope_scaling=rope_scaling,
        dtype=DTYPES[cfg.dtype], remat=cfg.remat)

    def step(s):  # s = (params, opt_state, loss)
        return train_step(s[0], s[1], hw_batch)

    opt_state = jax.device_put(optimizer.init(hw_params), device)  # committed: no recompile
    t0 = time.perf_counter()
    state = jax.block_until_ready(step((hw_params, opt_state, None)))
    return _Side("handwritten", step, state, jax.block_until_ready, float(state[2]),
                 time.perf_counter() - t0, 1)


def _torch_side(cfg, host_params, batch, args):
    from lmsys.bench.torch_peer import TorchPeer

    compile = {"auto": None, "on": True, "off": False}[args.torch_compile]
    peer = TorchPeer(host_params, cfg, batch, compile)
    t0 = time.perf_counter()
    loss = peer.step()
    peer.sync()
    side = _Side("torch", lambda s: peer.step(), loss, lambda s: peer.sync(), float(loss),
                 time.perf_counter() - t0, 1)
    side.peer = peer
    return side


def _peer_failed(e: Exception) -> str:
    import traceback

    traceback.print_exc()
    try:
        import torch

        torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - freeing is best effort
        pass
    return f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def main(argv=None) -> dict:
    args = parse_args(argv)
    skipped = None
    if args.peer == "torch":
        from lmsys.bench.torch_peer import unavailable

        _no_preallocation()
        skipped = unavailable(args.peer_cpu)
        if skipped:
            print(f"torch peer skipped: {skipped}", flush=True)
    cfg = build_config(args)
    mesh = build_mesh(cfg.mesh, None if args.mesh else jax.devices()[:1])
    trainer = Trainer(cfg, Rules(mesh))
    device = jax.devices()[0]
    m = cfg.model
    measured_peak = matmul_peak(args.peak_n) if args.measure_peak else None

    # --- both steps, from the same parameters, on the same batch
    batch = synthetic_batch(cfg.batch_size, cfg.seq_len, m.vocab_size,
                            documents=2 if args.peer == "handwritten" else 1)
    lm_batch = jax.device_put(batch, trainer.batch_sharding)
    lm_state = trainer.init(cfg.seed)
    peer = None
    if args.peer == "handwritten":
        peer = _handwritten_side(cfg, trainer, lm_state, batch, device)
    host_params = jax.device_get(lm_state["params"]) if args.peer == "torch" and not skipped else None

    def lm_step(s):  # s = (state, metrics)
        return trainer.step(s[0], lm_batch)

    # --- first step: compile, and check that both compute the same thing
    t0 = time.perf_counter()
    lm_out = jax.block_until_ready(lm_step((lm_state, None)))
    lm = _Side("lmsys", lm_step, lm_out, jax.block_until_ready, float(lm_out[1]["loss"]),
               time.perf_counter() - t0, mesh.size)
    tokens = cfg.batch_size * cfg.seq_len
    result = {"preset": args.preset, "set": args.set, "batch_size": cfg.batch_size,
              "seq_len": cfg.seq_len, "dtype": cfg.dtype, "remat": cfg.remat,
              "loss_chunk": cfg.loss_chunk, "attention_impl": m.attention_impl,
              "device": device.device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
              "params": llama.count_params(m), "flops_per_token": llama.flops_per_token(m, cfg.seq_len),
              "flops_per_token_causal": causal_flops_per_token(m, cfg.seq_len), "peer": args.peer,
              "peer_skipped": skipped, "lmsys_loss": lm.loss, "lmsys_compile_s": lm.compile_s}
    if host_params is not None:
        # lmsys alone first, written at once: its figures survive a peer that never finishes
        # (torch.compile of a deep model, out of memory) even when the process is killed
        lm.state, _ = timed_block(lm.step, lm.state, max(args.warmup, 1))
        lm.state, dt = timed_block(lm.step, lm.state, args.steps)
        result.update(lmsys_solo_step_s=dt, lmsys_solo_tokens_per_s=tokens / dt, lmsys_solo_peak_bytes=peak_memory(device))
        write_json(args.json, result)
        try:  # a failing peer (e.g. out of memory, a torch.compile error) leaves lmsys's figures
            peer = _torch_side(cfg, host_params, batch, args)
        except Exception as e:  # noqa: BLE001 - reported, and the run goes on without the peer
            skipped = result["peer_skipped"] = _peer_failed(e)
        del host_params
    sides = [lm] + ([peer] if peer else [])
    if peer:
        result[f"{peer.name}_loss"] = peer.loss
        result["loss_rel_diff"] = abs(lm.loss - peer.loss) / abs(peer.loss)
    if args.peer == "handwritten":
        result["param_max_abs_diff"] = max(
            float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
            for a, b in zip(jax.tree.leaves(lm.state[0]["params"]), jax.tree.leaves(peer.state[0])))

    # Untimed warm-up blocks, then timed blocks alternating, and so does which side goes first.
    for r in range(-1 if args.warmup else 0, args.repeats):
        for side in list(sides[::1 if r % 2 == 0 else -1]):
            try:
                side.state, dt = timed_block(side.step, side.state, args.warmup if r < 0 else args.steps,
                                             side.sync)
            except Exception as e:  # noqa: BLE001 - only the torch peer's failure is survivable
                if side.name != "torch":
                    raise
                sides.remove(side)
                skipped = _peer_failed(e)
                continue
            if r >= 0:
                side.times.append(dt)
    peer = sides[1] if len(sides) > 1 else None
    result["peer_skipped"] = skipped
    if args.profile:
        try:
            with jax.profiler.trace(args.profile):
                lm.state, _ = timed_block(lm.step, lm.state, args.steps)
            result["profile_dir"] = args.profile
        except Exception as e:  # noqa: BLE001 - a profiler that cannot start loses no figures
            result["profile_error"] = f"{type(e).__name__}: {e}".splitlines()[0]
            print(f"profile not written: {result['profile_error']}", flush=True)
    _report(args, cfg, mesh, sides, result, measured_peak)
    write_json(args.json, result)
    if peer:
        tol = (LOSS_RTOL if peer.name == "handwritten" else TORCH_LOSS_RTOL)[cfg.dtype]
        if not result["loss_rel_diff"] <= tol:
            raise SystemExit(f"first-step losses differ: lmsys {lm.loss} vs {peer.name} {peer.loss}")
    return result


def _gb(x) -> str:
    return "n/a" if x is None else f"{x / 1e9:.1f} GB"


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _report(args, cfg, mesh, sides, result, measured_peak) -> None:
    """Prints the table and fills `result` with each side's figures."""
    m, device = cfg.model, jax.devices()[0]
    lm, peer = sides[0], (sides[1] if len(sides) > 1 else None)
    tokens = cfg.batch_size * cfg.seq_len
    fpt = llama.flops_per_token(m, cfg.seq_len)
    jax_peak = peak_memory(device)
    mesh_desc = " ".join(f"{a}={n}" for a, n in mesh.shape.items())
    devices = f"{mesh.size} device{'s' * (mesh.size > 1)}"
    lines = [
        "lmsys train-step benchmark",
        f"date (UTC)    {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M:%S}",
        f"device        {device.device_kind} (backend {jax.default_backend()}, jax {jax.__version__})",
        f"model         {' '.join([args.preset, *args.set])}: {llama.count_params(m):,} params, "
        f"{fpt / 1e6:.1f} MFLOP/token (6 x matmul params + 12 x L x heads x head_dim x seq)",
        (f"run           batch {cfg.batch_size} x seq {cfg.seq_len} = {tokens:,} tokens/step, "
         f"{cfg.dtype}, remat {cfg.remat}, loss_chunk {cfg.loss_chunk}, attention {m.attention_impl}, "
         f"{'two packed documents' if args.peer == 'handwritten' else 'one document'} per row"),
        f"lmsys mesh    {mesh_desc} ({devices})" + (f"; {peer.name} step: 1 device" if peer else ""),
    ]
    if peer is not None and peer.name == "torch":
        lines.append(f"torch peer    {peer.peer.description}")
    if measured_peak:
        lines.append(f"matmul peak   {measured_peak / 1e12:.1f} TFLOP/s measured (bf16 {args.peak_n}^3)")
    lines += [
        (f"timing        median of {args.repeats} blocks x {args.steps} steps per side, "
         f"alternating; after 1 + {args.warmup} untimed steps"),
        "first call    " + ", ".join(f"{s.name} {s.compile_s:.1f} s" for s in sides) + " (compile + 1 step)",
        "",
        f"{'':<12} {'step (ms)':>10} {'tokens/s':>12} {'MFU':>7} {'MFU/meas':>9} {'peak mem':>10}   blocks (ms/step)",
    ]
    for s in sides:
        t = statistics.median(s.times)
        fig = mfu_figures(tokens / t, m, cfg.seq_len, s.devices, device.device_kind, measured_peak,
                          args.peak_tflops * 1e12)
        mem = s.peer.peak_memory() if s.name == "torch" else jax_peak
        result.update({f"{s.name}_step_s": t, f"{s.name}_tokens_per_s": tokens / t,
                       f"{s.name}_blocks_s": s.times, f"{s.name}_compile_s": s.compile_s,
                       f"{s.name}_peak_bytes": mem, **{f"{s.name}_{k}": v for k, v in fig.items()}})
        lines.append(f"{s.name:<12} {1e3 * t:>10.2f} {tokens / t:>12,.0f} {_pct(fig['mfu_datasheet']):>7} "
                     f"{_pct(fig['mfu_measured']):>9} {_gb(mem):>10}   "
                     + " ".join(f"{1e3 * x:.2f}" for x in s.times))
    lines += ["", "MFU: model FLOPs over the datasheet bf16 peak; MFU/meas: over the measured matmul "
              "peak; causal attention (half the scores) gives "
              f"{_pct(result['lmsys_mfu_datasheet_causal'])} / {_pct(result['lmsys_mfu_measured_causal'])} "
              "for lmsys; peak mem: JAX's peak bytes in use"
              + (" (lmsys and the hand-written step share it)" if peer and peer.name == "handwritten" else "")
              + (", torch.cuda.max_memory_allocated for torch" if peer and peer.name == "torch" else "")]
    if "lmsys_solo_step_s" in result:
        lines.append(f"lmsys alone, one block before the peer was built: {1e3 * result['lmsys_solo_step_s']:.2f} "
                     f"ms/step, {result['lmsys_solo_tokens_per_s']:,.0f} tokens/s")
    if result["peer_skipped"]:
        lines.append(f"torch peer skipped: {result['peer_skipped']}")
    if peer:
        tol = (LOSS_RTOL if peer.name == "handwritten" else TORCH_LOSS_RTOL)[cfg.dtype]
        lines.append(f"first-step loss: lmsys {lm.loss:.7f}, {peer.name} {peer.loss:.7f}, relative "
                     f"difference {result['loss_rel_diff']:.1e} (tolerance {tol:.0e})")
        result["ratio"] = result["lmsys_step_s"] / result[f"{peer.name}_step_s"]
        result["tokens_per_s_ratio"] = 1 / result["ratio"]
    if peer and peer.name == "handwritten":
        lines.append(f"params after one step: max |lmsys - handwritten| = {result['param_max_abs_diff']:.1e}")
        if mesh.size > 1:
            lines.append(f"note: lmsys ran on {devices}, the hand-written step on 1")
        lines.append(f"lmsys/handwritten step time ratio: {result['ratio']:.3f} (goal <= {GOAL})")
    if peer and peer.name == "torch":
        lines.append(f"lmsys/torch tokens/s ratio: {result['tokens_per_s_ratio']:.3f} (goal >= 1.2)")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
