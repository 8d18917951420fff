"""Serving where traffic repeats itself, side by side in one run (`python -m lmsys.bench.serve
--workload shared-prefix|copy`):

- shared-prefix: `--requests` requests (all at once) share a `--prefix-len`-token system prompt,
  each with its own `--prompt-len`-token question; the engine with prefix caching against the
  same engine without it (each starts with an empty cache): TTFT and output tokens/s.
- copy: answers that repeat spans of their context, at batch 1 (requests one after another) and
  batch 8; the engine with `ngram` speculative decoding, and with a draft model (the preset with
  `--draft-layers` layers and its own random weights; 0: not run), against plain decoding (prefix
  caching off on all): output tokens/s, acceptance rate and tokens per request-step. Each prompt is a
  span of `--prompt-len` random tokens written twice. With random weights (this benchmark's
  model) the greedy answers are loops of a few tokens: the drafts' acceptance, printed, is what
  the speed-up depends on, and real text accepts less.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from lmsys.serve.engine import Engine, EngineConfig


def _engine(params, model, tokenizer, args, max_seq_len, draft=None, **config) -> Engine:
    max_seq_len = math.ceil(max_seq_len / args.page_size) * args.page_size
    engine = Engine(params, model, tokenizer, EngineConfig(
        max_slots=args.max_slots, page_size=args.page_size, max_seq_len=max_seq_len,
        num_pages=args.max_slots * (max_seq_len // args.page_size), prefill_chunk=args.prefill_chunk,
        prefill_tokens=args.prefill_tokens, dtype=args.dtype, **config), draft=draft)
    engine.warmup(progress=False)
    return engine


def shared_prefix(params, model, tokenizer, args) -> dict:
    from lmsys.bench.serve import _table, run_engine

    rng = np.random.default_rng(1)
    system = list(map(int, rng.integers(2, model.vocab_size, args.prefix_len)))
    prompts = [system + list(map(int, rng.integers(2, model.vocab_size, args.prompt_len)))
               for _ in range(args.requests)]
    runs = {}
    for cache in (True, False):
        engine = _engine(params, model, tokenizer, args, args.prefix_len + args.prompt_len + args.max_tokens,
                         prefix_cache=cache)
        runs[cache] = run_engine(engine, prompts, args.max_tokens)
        runs[cache]["prefilled"] = engine.stats["prefilled_tokens"]
    print(f"(a) {args.requests} requests at once sharing a {args.prefix_len}-token system prompt, "
          f"+ {args.prompt_len} tokens each -> {args.max_tokens} output tokens (greedy)")
    _table((("prefix cache", runs[True]), ("no prefix cache", runs[False])))
    ttft = np.median(runs[False]["ttft"]) / np.median(runs[True]["ttft"])
    speed = (runs[True]["tokens"] / runs[True]["seconds"]) / (runs[False]["tokens"] / runs[False]["seconds"])
    same = sum(a == b for a, b in zip(runs[True]["outputs"], runs[False]["outputs"]))
    print(f"prompt tokens prefilled: {runs[True]['prefilled']} with the cache, {runs[False]['prefilled']} "
          f"without; TTFT p50 {ttft:.2f}x lower (goal >= 3), throughput {speed:.2f}x; greedy outputs "
          f"identical: {same}/{args.requests}")
    return {"prefix_cache": runs[True], "no_prefix_cache": runs[False], "ttft_ratio": ttft,
            "throughput_ratio": speed}


def copy_heavy(params, model, tokenizer, args) -> dict:
    from lmsys.bench.serve import _table, run_engine

    rng = np.random.default_rng(2)
    out = {}
    from lmsys.models import llama
    from lmsys.serve.draft import DraftModel

    small = dataclasses.replace(model, n_layers=args.draft_layers)
    draft = DraftModel(llama.init(jax.random.key(1), small), small, tokenizer) if args.draft_layers else None
    sides = ("ngram", "draft", "none") if draft else ("ngram", "none")
    engines = {spec: _engine(params, model, tokenizer, args, 2 * args.prompt_len + args.max_tokens,
                             draft=draft if spec == "draft" else None, prefix_cache=False, speculative=spec,
                             num_speculative_tokens=args.num_speculative_tokens)
               for spec in sides}
    names = {"ngram": f"ngram k={args.num_speculative_tokens}", "none": "no speculation",
             "draft": f"draft ({args.draft_layers} layer{'s' * (args.draft_layers > 1)}) k={args.num_speculative_tokens}"}
    for batch in (1, 8):
        spans = [list(map(int, rng.integers(2, model.vocab_size, args.prompt_len))) for _ in range(8)]
        prompts = [s + s for s in spans]
        rows = []
        for spec, engine in engines.items():
            stats0 = dict(engine.stats)
            groups = [[p] for p in prompts[:4]] if batch == 1 else [prompts]
            parts = [run_engine(engine, g, args.max_tokens) for g in groups]
            run = {k: sum((p[k] for p in parts), [] if isinstance(parts[0][k], list) else 0)
                   for k in ("tokens", "seconds", "ttft", "itl", "outputs")}
            run["max_batch"] = max(p["max_batch"] for p in parts)
            d = {k: engine.stats[k] - stats0.get(k, 0) for k in
                 ("spec_draft_tokens", "spec_accepted_tokens", "generated_tokens", "decode_rows")}
            run["acceptance"] = d["spec_accepted_tokens"] / max(1, d["spec_draft_tokens"])
            run["tokens_per_step"] = d["generated_tokens"] / max(1, d["decode_rows"])
            rows.append((names[spec], run))
            out[(spec, batch)] = run
        print(f"(b) copy-heavy at batch {batch}: prompts of a {args.prompt_len}-token span written twice "
              f"-> {args.max_tokens} output tokens (greedy)")
        _table(rows)
        plain = out[("none", batch)]
        for name in sides[:-1]:
            spec = out[(name, batch)]
            same = sum(a == b for a, b in zip(spec["outputs"], plain["outputs"]))
            print(f"{name}: acceptance {spec['acceptance']:.2f}, {spec['tokens_per_step']:.2f} tokens per "
                  f"request-step; {name}/plain throughput "
                  f"{(spec['tokens'] / spec['seconds']) / (plain['tokens'] / plain['seconds']):.2f}x "
                  f"(goal >= 1.5 at batch 1); greedy outputs identical: {same}/{len(spec['outputs'])}")
    return out
