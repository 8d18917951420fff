"""`lmsys rl` step by step: rollout tokens/s, update time per step and the share of the weight
hand-over (trainer -> engine, on device) in a step.

    python -m lmsys.bench.rl --preset tiny --steps 8 --prompts 8 --group-size 8 --max-new-tokens 64

A GRPO run of `--steps` steps on the arithmetic prompts from the random init of `--preset` (the
built-in 17-token character tokenizer; a random model rarely ends early, so completions run to
`--max-new-tokens` tokens, no end-of-text is forced either way), trainer on `--mesh` (fsdp over
all devices by default), engine on `--engine-tensor` devices; `--lora RANK` trains adapters and
hands over the merged weights. The first step (compiles) is left out; the medians of the rest
are reported from the run's own metrics (lmsys.rl.loop): rollout_s (sampling every completion
with the engine), update_s (the trainer's log-probs of the samples + `--updates` optimizer steps),
handover_s (reshard onto the engine's placement + Engine.set_params).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import tempfile

import jax


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m lmsys.bench.rl", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--prompts", type=int, default=8, help="rl.prompts_per_step")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--updates", type=int, default=1, help="rl.updates_per_rollout")
    p.add_argument("--mesh", default="fsdp=-1", help="the trainer's mesh, e.g. fsdp=4,tensor=2")
    p.add_argument("--engine-tensor", type=int, default=1)
    p.add_argument("--lora", type=int, default=0, help="lora.rank (0: full fine-tuning)")
    p.add_argument("--dtype", default="float32")
    return p.parse_args(argv)


def run(args) -> dict:
    from lmsys.config import from_dict
    from lmsys.rl.loop import rl

    mesh = {k: int(v) for k, v in (kv.split("=") for kv in args.mesh.split(",") if kv)}
    mesh = {"data": 1, "fsdp": 1, "tensor": 1, **mesh}
    with tempfile.TemporaryDirectory() as run_dir:
        tree = {"model": {"preset": args.preset, "vocab_size": 32}, "mesh": mesh, "steps": args.steps,
                "seq_len": 8 + args.max_new_tokens, "run_dir": run_dir, "dtype": args.dtype,
                "data": {"format": "prompts", "source": "arithmetic"},
                "checkpoint": {"every": 0, "async_save": False},
                "lora": {"rank": args.lora, "alpha": 2.0 * args.lora if args.lora else 16.0, "targets": "all"},
                "rl": {"group_size": args.group_size, "prompts_per_step": args.prompts,
                       "max_new_tokens": args.max_new_tokens, "updates_per_rollout": args.updates,
                       "engine_tensor": args.engine_tensor}}
        history = rl(from_dict(tree), progress=False)
    rest = history[1:] or history
    med = {k: statistics.median(h[k] for h in rest)
           for k in ("rollout_s", "update_s", "handover_s", "rollout_tokens_per_second", "completion_length")}
    med["handover_share"] = med["handover_s"] / (med["rollout_s"] + med["update_s"] + med["handover_s"])
    med["samples"] = args.prompts * args.group_size
    return med


def main(argv=None) -> None:
    args = parse_args(argv)
    m = run(args)
    print(f"# lmsys rl, {datetime.date.today()}, {jax.devices()[0].device_kind} x {jax.device_count()}, "
          f"preset {args.preset}, {m['samples']} samples/step ({args.prompts} prompts x {args.group_size}), "
          f"mesh {args.mesh}, engine tensor={args.engine_tensor}, lora rank {args.lora}, {args.dtype}, "
          f"median of steps 2-{args.steps}")
    print("| rollout tokens/s | completion tokens | rollout s | update s | hand-over ms | hand-over share |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(f"| {m['rollout_tokens_per_second']:,.0f} | {m['completion_length']:.1f} | {m['rollout_s']:.3f} | "
          f"{m['update_s']:.3f} | {m['handover_s'] * 1e3:.2f} | {m['handover_share']:.2%} |")


if __name__ == "__main__":
    main()
