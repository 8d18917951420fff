"""Settings of a recipe compared at equal CPU time by held-out bits per byte.

    python -m lmsys.bench.recipe recipes/configs/tiny.yaml --steps 200 \\
        --setting default: --setting deeper:model.d_model=192,model.n_layers=6 ...

Each setting is a list of config overrides on the recipe. Its CPU seconds per step (this
process's user + system time, all threads, so other jobs on the machine count less than they
would in wall time) are measured first, after a one-step run that builds the setting's tokenizer
and data cache, as the difference between a `--calibrate` step run and
one three times as long, divided by the steps between them (the compile and set-up cancel out); then it trains for as many steps as fit
in the first setting's `--steps` steps of CPU time, with its held-out eval at the end
(the recipe's `eval.*`), and the table lists each setting's steps, CPU seconds, final training
loss and held-out loss and bits per byte. Bits per byte divide by the UTF-8 bytes of the
held-out text, so settings with different tokenizers (vocabulary sizes) compare.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time
from pathlib import Path

import jax


def _train(recipe: str, overrides: list[str], run_dir: str, steps: int, eval_on: bool) -> float:
    """CPU seconds of one `lmsys train` run of `steps` steps."""
    from lmsys.cli import main

    extra = [] if eval_on else ["eval.every=0", "eval.holdout=0", "eval.sample="]
    args = [*overrides, f"steps={steps}", f"run_dir={run_dir}", "checkpoint.every=1000000",
            "checkpoint.async_save=false", *extra]
    begin = time.process_time()
    if main(["train", recipe, *args, "--no-progress"]) != 0:
        raise SystemExit(f"lmsys train {recipe} {' '.join(args)} failed")
    return time.process_time() - begin


def _last(run_dir: str, key: str) -> float | None:
    lines = [json.loads(x) for x in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
    values = [r[key] for r in lines if key in r]
    return values[-1] if values else None


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m lmsys.bench.recipe", description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("--setting", action="append", required=True,
                    help="NAME:key=value,key=value (the first setting sets the CPU budget)")
    ap.add_argument("--steps", type=int, default=200, help="the first setting's steps: the CPU budget")
    ap.add_argument("--calibrate", type=int, default=8, help="steps of the shorter calibration run")
    args = ap.parse_args(argv)
    settings = []
    for spec in args.setting:
        name, _, keys = spec.partition(":")
        settings.append((name, [k for k in keys.split(",") if k]))

    rows, budget = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, overrides) in enumerate(settings):
            _train(args.recipe, overrides, f"{tmp}/{i}-w", 1, False)  # builds its tokenizer, data cache
            short = _train(args.recipe, overrides, f"{tmp}/{i}-a", args.calibrate, False)
            long = _train(args.recipe, overrides, f"{tmp}/{i}-b", 3 * args.calibrate, False)
            per_step = (long - short) / (2 * args.calibrate)
            if per_step <= 0:
                raise SystemExit(f"{name}: the {3 * args.calibrate}-step run took no more CPU time than the "
                                 f"{args.calibrate}-step one; raise --calibrate")
            if budget is None:
                budget = per_step * args.steps
            steps = max(1, round(budget / per_step))
            # the eval schedule: the recipe's every-N, and always the last step
            cpu = _train(args.recipe, overrides, f"{tmp}/{i}", steps, True)
            row = {"setting": name, "overrides": " ".join(overrides), "cpu_s_per_step": per_step,
                   "steps": steps, "cpu_s": cpu, "loss": _last(f"{tmp}/{i}", "loss"),
                   "eval_loss": _last(f"{tmp}/{i}", "eval_loss"),
                   "eval_bits_per_byte": _last(f"{tmp}/{i}", "eval_bits_per_byte")}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{datetime.date.today()}, {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, "
          f"budget {budget:.0f} CPU s ({args.steps} steps of {settings[0][0]})")
    print("| setting | overrides | steps | CPU s/step | final loss | held-out loss | held-out bits/byte |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['setting']} | `{r['overrides'] or '-'}` | {r['steps']} | {r['cpu_s_per_step']:.2f} | "
              f"{r['loss']:.4f} | {r['eval_loss']:.4f} | {r['eval_bits_per_byte']:.4f} |")
    return rows


if __name__ == "__main__":
    main()
