"""LoRA against full fine-tuning (train step time and memory), and serving many adapters against
the base alone (generated tokens/s).

    python -m lmsys.bench.lora train --preset small --batch-size 8 --seq-len 256 --rank 8
    python -m lmsys.bench.lora serve --preset small --adapters 4 --requests 32 --max-tokens 32

train: the same model and synthetic batch, one device; timed blocks of `--steps` steps alternate
between full fine-tuning and LoRA (`--targets`) `--repeats` times, each side's median block
reported per step, with the compiled step's argument bytes (params + optimizer state + batch)
and temporaries (XLA's memory analysis).

serve: the engine (batch-invariant: one compiled shape per call) runs `--requests` greedy
requests of `--max-tokens` tokens, all submitted at once; once with no adapters (the base), once
with `--adapters` LoRA adapters (rank `--rank`, all targets) whose requests are spread evenly
over the adapters and the base. Each side is run `--repeats` times after a warm-up; the median
tokens/s is reported.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import jax
import numpy as np

from lmsys.config import LoraConfig, from_dict
from lmsys.models import llama, lora
from lmsys.parallel import Rules, build_mesh
from lmsys.train.step import Trainer


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m lmsys.bench.lora", description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("train", "serve"))
    p.add_argument("--preset", default="small")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="q,v", help="train: lora.targets")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="train: timed steps per block")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--adapters", type=int, default=4, help="serve: LoRA adapters beside the base")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    return p.parse_args(argv)


def _trainer(args, lora_keys: dict):
    cfg = from_dict({"model": {"preset": args.preset}, "batch_size": args.batch_size, "seq_len": args.seq_len,
                     "lora": lora_keys})
    return Trainer(cfg, Rules(build_mesh(cfg.mesh, jax.devices()[:1])))


def bench_train(args) -> list[str]:
    from lmsys.bench.train import synthetic_batch

    sides = {"full": _trainer(args, {}), "lora": _trainer(args, {"rank": args.rank, "targets": args.targets})}
    cfg = sides["full"].cfg
    batch = synthetic_batch(args.batch_size, args.seq_len, cfg.model.vocab_size)
    run = {}
    for name, t in sides.items():
        step = t.step.lower(t.abstract_state, t.abstract_batch()).compile()
        mem = step.memory_analysis()
        state = t.init(cfg.seed)
        state, m = step(state, batch)  # warm-up
        jax.block_until_ready(m)
        run[name] = {"step": step, "state": state, "args": mem.argument_size_in_bytes,
                     "temp": mem.temp_size_in_bytes, "blocks": []}
    for r in range(args.repeats):
        for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            s = run[name]
            begin = time.perf_counter()
            for _ in range(args.steps):
                s["state"], m = s["step"](s["state"], batch)
            jax.block_until_ready(m)
            s["blocks"].append((time.perf_counter() - begin) / args.steps)
    device = jax.devices()[0].device_kind
    rows = [f"{datetime.date.today()}, {device}, preset {args.preset}, batch {args.batch_size} x {args.seq_len}, "
            f"float32, LoRA rank {args.rank} on {args.targets}",
            "| | step time (median of blocks) | step arguments (params + optimizer state + batch) | temporaries |",
            "|---|---|---|---|"]
    for name, s in run.items():
        rows.append(f"| {name} | {statistics.median(s['blocks']) * 1e3:.1f} ms | {s['args'] / 2**20:.1f} MiB | "
                    f"{s['temp'] / 2**20:.1f} MiB |")
    return rows


def bench_serve(args) -> list[str]:
    from lmsys.data import load_tokenizer
    from lmsys.serve.engine import Engine, EngineConfig
    from lmsys.serve.lora import AdapterBank
    from lmsys.serve.scheduler import GenerationOptions

    cfg = from_dict({"model": {"preset": args.preset}}).model
    params = llama.init(jax.random.key(0), cfg)
    lo = LoraConfig(rank=args.rank, alpha=2.0 * args.rank, targets="all")
    specs = lora.param_specs(llama.param_specs(cfg)["layers"], lo)
    names = [f"a{i}" for i in range(args.adapters)]
    bank = AdapterBank(cfg, {n: lora.init(jax.random.key(i + 1), specs, lo) for i, n in enumerate(names)})
    tokenizer = load_tokenizer("builtin", cfg.vocab_size)
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(2, cfg.vocab_size, 16))) for _ in range(args.requests)]
    config = EngineConfig(max_slots=args.requests, page_size=16, max_seq_len=16 + args.max_tokens + 16,
                          prefill_chunk=16, batch_invariant=True)
    rows = [f"{datetime.date.today()}, {jax.devices()[0].device_kind}, preset {args.preset}, {args.requests} "
            f"greedy requests x {args.max_tokens} tokens at once (16-token prompts), float32",
            "| | generated tokens/s (median) |", "|---|---|"]
    for label, b, kinds in (("the base alone", None, [""]),
                            (f"{args.adapters} adapters (rank {args.rank}, all targets) + the base", bank,
                             ["", *names])):
        engine = Engine(params, cfg, tokenizer, config, adapters=b)
        engine.warmup(progress=False)
        rates = []
        for _ in range(args.repeats + 1):  # the first run warms the host side up
            begin = time.perf_counter()
            reqs = [engine.add_request(p, GenerationOptions(max_tokens=args.max_tokens, ignore_eos=True,
                                                            adapter=kinds[i % len(kinds)]))
                    for i, p in enumerate(prompts)]
            while engine.has_work():
                engine.step()
            rates.append(sum(len(r.generated) for r in reqs) / (time.perf_counter() - begin))
        rows.append(f"| {label} | {statistics.median(rates[1:]):.0f} |")
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    print("\n".join(bench_train(args) if args.what == "train" else bench_serve(args)))


if __name__ == "__main__":
    main()
