"""Issue 24 on one GPU, in one call: training MFU beside PyTorch, the planner against the
measurements, decode at batch against its roofline. Every figure goes under $OUT.

    OUT=/tmp/mfu python recipes/gpu/mfu.py            # on the GPU machine, < 8 minutes
    OUT=/tmp/mfu python recipes/gpu/mfu.py --smoke    # the same runs with tiny shapes, on a CPU

Runs, most important first, each in its own process with its own time limit (a failure or a
timeout is recorded and the next run goes on); a run that would end past `--budget` seconds
is not started (recorded as not run):

1. `lmsys.bench.peaks`: the bf16 matmul peak and the copy bandwidth of the chip.
2. `lmsys.bench.train` 1b, seq 4096, batch 8, bf16, remat full, loss_chunk 1024, beside the
   PyTorch peer (torch.compile, SDPA, fused AdamW); with a profiler trace of one lmsys block.
3. `lmsys.bench.decode` 1b, 64 requests at 2K context, against (weights + KV bytes) / copy GB/s.
4. `lmsys.bench.train` 8b cut to 6 layers, batch 4 x 4096, remat full, loss_chunk 1024, beside
   the PyTorch peer (both resident in one process; lmsys alone fits 26 layers by `lmsys plan`,
   lmsys.bench.train's docstring says why 6 with the peer).
5. `lmsys.bench.train` 1b as in 2 with remat selective, lmsys alone (the other remat choice).

Then `lmsys plan` (the analytical planner, on the host CPU) for each training config on the
chip's datasheet (h100 or h200) and a report. $OUT receives at most five files (the device tool
returns eight, flat): mfu.json (every figure, rewritten after each run), mfu.md (the table for
BENCHMARKS.md, printed last), runs.log (each run's full output) and the 1b profiler trace
(trace_1b_full.trace.json.gz for Perfetto, .xplane.pb for TensorBoard) where under 15 MiB.
`--only train_8b_cut,...` reruns some runs. MFU is computed against both the datasheet peak and the
matmul peak of run 1 (lmsys.bench.peaks says which FLOPs count). No network is needed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

GPU_TRAIN = ["--seq-len", "4096", "--dtype", "bfloat16", "--steps", "4", "--warmup", "1", "--repeats", "3"]
SMOKE_TRAIN = ["--preset", "tiny", "--set", "model.n_layers=1", "--set", "model.vocab_size=512",
               "--seq-len", "64", "--batch-size", "2", "--steps", "1", "--warmup", "0", "--repeats", "2"]


def runs(smoke: bool, out: Path) -> list[dict]:
    """name, argv (after `python -m`), time limit (s), and for train runs the config keys."""
    if smoke:
        tiny = {"preset": "tiny", "n_layers": 1, "vocab_size": 512}
        return [
            {"name": "peaks", "argv": ["lmsys.bench.peaks", "--n", "256", "--copy-mib", "8", "--iters", "2",
                                       "--reps", "2"], "limit": 120},
            {"name": "train_1b_full", "limit": 240, "model": tiny, "batch": 2, "seq": 64, "remat": "full",
             "loss_chunk": 32, "argv": ["lmsys.bench.train", *SMOKE_TRAIN, "--remat", "full", "--set",
                                        "loss_chunk=32", "--peer", "torch", "--peer-cpu", "--measure-peak",
                                        "--peak-n", "256", "--profile", str(out / "trace_1b_full")]},
            {"name": "decode_1b", "limit": 180,
             "argv": ["lmsys.bench.decode", "--preset", "tiny", "--set", "model.n_layers=1", "--batch", "4",
                      "--context", "48", "--steps", "2", "--blocks", "2", "--warmup", "1", "--copy-mib", "8",
                      "--prefill-chunk", "32"]},
            {"name": "train_8b_cut", "limit": 240, "model": tiny, "batch": 2, "seq": 64, "remat": "full",
             "loss_chunk": 0, "argv": ["lmsys.bench.train", *SMOKE_TRAIN, "--remat", "full", "--peer", "torch",
                                       "--peer-cpu"]},
            {"name": "train_1b_selective", "limit": 180, "model": tiny, "batch": 2, "seq": 64,
             "remat": "selective", "loss_chunk": 32,
             "argv": ["lmsys.bench.train", *SMOKE_TRAIN, "--remat", "selective", "--set", "loss_chunk=32",
                      "--peer", "none"]},
        ]
    return [
        {"name": "peaks", "argv": ["lmsys.bench.peaks"], "limit": 60},
        {"name": "train_1b_full", "limit": 260, "model": {"preset": "1b"}, "batch": 8, "seq": 4096,
         "remat": "full", "loss_chunk": 1024,
         "argv": ["lmsys.bench.train", "--preset", "1b", "--batch-size", "8", *GPU_TRAIN, "--remat", "full",
                  "--set", "loss_chunk=1024", "--peer", "torch", "--measure-peak",
                  "--profile", str(out / "trace_1b_full")]},
        {"name": "decode_1b", "limit": 90,
         "argv": ["lmsys.bench.decode", "--preset", "1b", "--batch", "64", "--context", "2048",
                  "--prefill-chunk", "2048"]},
        {"name": "train_8b_cut", "limit": 200, "model": {"preset": "8b", "n_layers": 6}, "batch": 4,
         "seq": 4096, "remat": "full", "loss_chunk": 1024,
         "argv": ["lmsys.bench.train", "--preset", "8b", "--set", "model.n_layers=6", "--batch-size", "4",
                  *GPU_TRAIN, "--remat", "full", "--set", "loss_chunk=1024", "--peer", "torch"]},
        {"name": "train_1b_selective", "limit": 100, "model": {"preset": "1b"}, "batch": 8, "seq": 4096,
         "remat": "selective", "loss_chunk": 1024,
         "argv": ["lmsys.bench.train", "--preset", "1b", "--batch-size", "8", *GPU_TRAIN, "--remat",
                  "selective", "--set", "loss_chunk=1024", "--peer", "none"]},
    ]


def run_all(smoke: bool, out: Path, work: Path, budget: float, only: set[str]) -> dict:
    """Runs each benchmark into `work`; appends its log to $OUT/runs.log and rewrites
    $OUT/mfu.json after each one, so a lease that ends midway still returns what finished."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
    start, results = time.monotonic(), {}
    for r in runs(smoke, work):
        name, left = r["name"], budget - (time.monotonic() - start)
        if only and name not in only:
            continue
        if left < r["limit"] / 2:
            results[name] = {"run": r, "status": f"not run: {left:.0f} s of the {budget:.0f} s budget left"}
            print(f"== {name}: not run ({left:.0f} s left)", flush=True)
            continue
        limit = min(r["limit"], left)
        cmd = [sys.executable, "-m", *r["argv"], "--json", str(work / f"{name}.json")]
        print(f"== {name}: {' '.join(cmd[2:])} (limit {limit:.0f} s)", flush=True)
        t0 = time.monotonic()
        with open(work / f"{name}.log", "w") as log:
            try:
                rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    timeout=limit).returncode
                status = "ok" if rc == 0 else f"failed (exit {rc})"
            except subprocess.TimeoutExpired:
                status = f"timed out after {limit:.0f} s"
        seconds = time.monotonic() - t0
        text = (work / f"{name}.log").read_text()
        print("\n".join("   " + line for line in text.splitlines()[-14:]), flush=True)
        with open(out / "runs.log", "a") as log:
            log.write(f"== {name}: {' '.join(cmd[2:])}\n{text}\n-> {status} in {seconds:.0f} s\n\n")
        data = json.loads((work / f"{name}.json").read_text()) if (work / f"{name}.json").exists() else None
        results[name] = {"run": r, "status": status, "seconds": seconds, "result": data}
        (out / "mfu.json").write_text(json.dumps(results, indent=1, default=str))
        print(f"   -> {status} in {seconds:.0f} s", flush=True)
    return results


MAX_FILE = 15 << 20  # the device tool returns files of at most 16 MiB


def keep_traces(work: Path, out: Path, results: dict) -> None:
    """The profiler traces (Perfetto's .trace.json.gz, TensorBoard's .xplane.pb) copied to
    $OUT flat (the tool returns files at most two folders down) where small enough."""
    for trace_dir in sorted(work.glob("trace_*")):
        for f in trace_dir.rglob("*"):
            for suffix in (".trace.json.gz", ".xplane.pb"):
                if f.name.endswith(suffix):
                    size = f.stat().st_size
                    kept = size <= MAX_FILE
                    if kept:
                        shutil.copyfile(f, out / f"{trace_dir.name}{suffix}")
                    results.setdefault("traces", {})[f"{trace_dir.name}{suffix}"] = (
                        f"{size / 2**20:.1f} MiB" + ("" if kept else " (too large to return: not copied)"))


def hardware_key(device_kind: str) -> str:
    """The planner's HARDWARE key for a device kind; h100 where the kind is not a known GPU."""
    kind = device_kind.lower()
    return next((k for k in ("h200", "h100", "a100") if k in kind), "h100")


def plan(results: dict) -> None:
    """`lmsys plan`'s step time and memory for each training run's config, beside it."""
    os.environ["JAX_PLATFORMS"] = "cpu"  # after the runs; planning needs no device
    sys.path.insert(0, str(ROOT))
    from lmsys.config import from_dict
    from lmsys.plan import planner

    device = (results.get("peaks", {}).get("result") or {}).get("device", "")
    hw = hardware_key(device)
    for entry in results.values():
        r = entry.get("run", {})
        if "model" not in r:
            continue
        cfg = from_dict({"model": r["model"], "batch_size": r["batch"], "seq_len": r["seq"],
                         "dtype": "bfloat16", "remat": r["remat"], "loss_chunk": r["loss_chunk"],
                         "mesh": {"fsdp": 1}})
        p = planner.analyze(cfg, 1, hw)
        entry["plan"] = {"hardware": p.hardware.name, "step_s": p.step_time, "memory_bytes": p.total_memory,
                         "fits": p.fits, "tokens_per_s": r["batch"] * r["seq"] / p.step_time}


def _f(x, fmt: str, scale: float = 1.0) -> str:
    return "n/a" if x is None else format(x * scale, fmt)


def report(results: dict, argv: list[str]) -> str:
    peaks = results.get("peaks", {}).get("result") or {}
    measured = peaks.get("matmul_tflops")
    lines = [f"GPU benchmark (recipes/gpu/mfu.py {' '.join(argv)}), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             f"device: {peaks.get('device', 'n/a')}; jax {peaks.get('jax', 'n/a')}; {versions()}",
             f"bf16 matmul peak {_f(measured, '.1f')} TFLOP/s measured (datasheet "
             f"{_f(peaks.get('datasheet_tflops'), '.0f')}); copy bandwidth {_f(peaks.get('copy_gbs'), '.0f')} GB/s", "",
             "| run | remat / loss_chunk | lmsys tok/s | MFU datasheet | MFU measured peak | MFU causal (datasheet) "
             "| lmsys peak mem | torch tok/s | lmsys/torch | torch peak mem | plan step / measured | plan mem |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in results.items():
        r = e.get("run", {})
        if "model" not in r:
            continue
        d = e.get("result")
        if not d:
            lines.append(f"| {name} | {r['remat']} / {r['loss_chunk']} | {e['status']} | | | | | | | | | |")
            continue
        solo = "lmsys_tokens_per_s" not in d  # the run ended before the side-by-side blocks
        tps = d["lmsys_solo_tokens_per_s" if solo else "lmsys_tokens_per_s"]
        step = d["lmsys_solo_step_s" if solo else "lmsys_step_s"]
        mem = d.get("lmsys_solo_peak_bytes" if solo else "lmsys_peak_bytes")
        sheet = peaks.get("datasheet_tflops") or d.get("lmsys_datasheet_peak_tflops")
        measured_here = measured or d.get("lmsys_measured_peak_tflops")

        def mfu(fpt, peak):
            return tps * fpt / (peak * 1e12) if peak else None

        p = e.get("plan", {})
        torch_tps = d.get("torch_tokens_per_s")
        torch_col = (_f(torch_tps, ",.0f") if torch_tps else d.get("peer_skipped")
                     or (e["status"] if d["peer"] == "torch" else "not run"))
        lines.append(
            f"| {name} ({d['preset']} {' '.join(d['set'])}, {d['batch_size']}x{d['seq_len']})"
            f"{' [lmsys alone, ' + e['status'] + ']' if solo else ''} "
            f"| {r['remat']} / {r['loss_chunk']} | {tps:,.0f} | {_f(mfu(d['flops_per_token'], sheet), '.1%')} "
            f"| {_f(mfu(d['flops_per_token'], measured_here), '.1%')} "
            f"| {_f(mfu(d['flops_per_token_causal'], sheet), '.1%')} | {_f(mem, '.1f', 1e-9)} GB "
            f"| {torch_col} | {_f(d.get('tokens_per_s_ratio'), '.2f')} "
            f"| {_f(d.get('torch_peak_bytes'), '.1f', 1e-9)} GB "
            f"| {_f(p.get('step_s'), '.1f', 1e3)} ms / {1e3 * step:.1f} ms "
            f"({_f(p['step_s'] / step if p else None, '.2f')}x) | {_f(p.get('memory_bytes'), '.1f', 1e-9)} GB |")
    dec = results.get("decode_1b", {})
    if dec.get("result"):
        d = dec["result"]
        lines += ["", f"decode ({d['preset']} {' '.join(d['set'])}, batch {d['batch']}, context {d['context']}): "
                      f"{d['tokens_per_s']:,.0f} tokens/s ({1e3 * d['step_s']:.2f} ms/step) vs roofline "
                      f"{d['roofline_tokens_per_s']:,.0f} tokens/s (weights {d['weight_bytes'] / 1e9:.2f} GB + KV "
                      f"{d['kv_bytes'] / 1e9:.2f} GB per step at {d['copy_gbs']:.0f} GB/s): "
                      f"{d['fraction_of_roofline']:.1%} of the roofline"]
    elif dec:
        lines += ["", f"decode: {dec['status']}"]
    lines += ["", "runs: " + ", ".join(f"{n} {e['status']}" + (f" ({e['seconds']:.0f} s)" if "seconds" in e else "")
                                    for n, e in results.items() if "status" in e)]
    if results.get("traces"):
        lines.append("traces: " + ", ".join(f"{k} {v}" for k, v in results["traces"].items()))
    return "\n".join(lines)


def versions() -> str:
    out = []
    for mod in ("jaxlib", "torch", "transformers"):
        try:
            out.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            out.append(f"{mod} not installed")
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        out.append(f"nvidia-smi: {smi.stdout.strip()}")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "; ".join(out)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, torch peer on the CPU: a dry run")
    ap.add_argument("--budget", type=float, default=460.0, help="seconds for all runs")
    ap.add_argument("--only", default="", help="comma-separated run names (a rerun of some), e.g. train_8b_cut")
    ap.add_argument("--out", default=os.environ.get("OUT", ""), help="output directory (default: $OUT)")
    args = ap.parse_args(argv)
    if not args.out:
        ap.error("give --out DIR or set $OUT")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    only = {n for n in args.only.split(",") if n}
    names = {r["name"] for r in runs(args.smoke, out)}
    if only - names:
        ap.error(f"--only: no run named {', '.join(sorted(only - names))}; runs: {', '.join(sorted(names))}")
    work = Path(tempfile.mkdtemp(prefix="lmsys-mfu-"))
    print(f"runs write to {work}; $OUT ({out}) gets mfu.json, mfu.md, runs.log and the traces", flush=True)
    results = run_all(args.smoke, out, work, args.budget, only)
    keep_traces(work, out, results)
    plan(results)
    text = report(results, argv)
    (out / "mfu.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "mfu.md").write_text(text + "\n")
    print("\n" + text, flush=True)
    return 0 if all(e["status"] == "ok" for e in results.values() if "status" in e) else 1


if __name__ == "__main__":
    sys.exit(main())
