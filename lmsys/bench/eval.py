"""Log-likelihood throughput: `lmsys eval`'s lm-eval adapter (the serving engine, many requests
per prefill call) against lm-eval's own `hf` model (transformers, torch) on the same requests,
same weights, same hardware.

    python -m lmsys.bench.eval --preset tiny --requests 256 --hf-batch-size 16

Multiple-choice-shaped requests: `--requests / 4` contexts of ~`--context-chars` characters of
this Python's standard library sources, each with 4 continuations of ~`--continuation-chars`.
Parameters are random (the throughput does not depend on the weights); the model is exported
with lmsys's exporter (float32) for `hf`. Prints requests/s per side (the median of `--repeats`
timed passes, the sides alternating, after a warm-up pass each) and the largest per-request
difference.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time

import jax
import numpy as np

from lmsys.config import from_dict
from lmsys.models import llama


def make_requests(n: int, context_chars: int, continuation_chars: int, seed: int = 0) -> list[tuple[str, str]]:
    from lmsys.data import builtin_corpus_files

    rng = np.random.default_rng(seed)
    files = builtin_corpus_files()
    out = []
    while len(out) < n:
        text = open(files[rng.integers(len(files))], "rb").read().decode("utf-8", errors="replace")
        need = context_chars + 4 * continuation_chars
        if len(text) < need + 1:
            continue
        start = int(rng.integers(len(text) - need))
        context = text[start:start + context_chars]
        for k in range(4):
            begin = start + context_chars + k * continuation_chars
            out.append((context, text[begin:begin + continuation_chars]))
    return out[:n]


def _instances(pairs):
    from lm_eval.api.instance import Instance

    return [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]


def _alternating(sides, requests, repeats: int) -> list[tuple[list, float]]:
    """Each side's output and median seconds over `repeats` timed passes, the sides taking turns
    (this machine's load changes between passes), after one warm-up pass each (compiles,
    allocator, thread pools)."""
    outs = [fn(requests) for fn in sides]
    times = [[] for _ in sides]
    for _ in range(repeats):
        for i, fn in enumerate(sides):
            begin = time.perf_counter()
            fn(requests)
            times[i].append(time.perf_counter() - begin)
    return [(out, float(np.median(t))) for out, t in zip(outs, times)]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--set", nargs="*", default=[], help="model.* overrides, e.g. model.n_layers=2")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--context-chars", type=int, default=400)
    ap.add_argument("--continuation-chars", type=int, default=40)
    ap.add_argument("--max-slots", type=int, default=64, help="lmsys: requests scored together at most")
    ap.add_argument("--prefill-tokens", type=int, default=4096, help="lmsys: padded tokens per prefill call")
    ap.add_argument("--hf-batch-size", type=int, default=16, help="hf: lm-eval's batch_size")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per side, alternating; median")
    args = ap.parse_args(argv)

    from lm_eval.models.huggingface import HFLM

    from lmsys.data import eos_id, load_tokenizer
    from lmsys.eval.harness import LmsysLM
    from lmsys.interop import save_hf
    from lmsys.serve.engine import Engine, EngineConfig

    cfg = from_dict({"model": {"preset": args.preset}}, args.set)
    model = cfg.model
    tokenizer = load_tokenizer("builtin", model.vocab_size)
    params = llama.init(jax.random.key(0), model)
    pairs = make_requests(args.requests, args.context_chars, args.continuation_chars)
    requests = _instances(pairs)
    eos = eos_id(tokenizer)

    engine = Engine(params, model, tokenizer, EngineConfig(
        max_slots=args.max_slots, max_seq_len=512, prefill_chunk=512, prefill_tokens=args.prefill_tokens,
        fine_prefill_widths=True),
        eos_token_id=eos)
    with tempfile.TemporaryDirectory() as hf_dir:
        save_hf(params, model, hf_dir, dtype="float32")
        with open(os.path.join(hf_dir, "tokenizer.json"), "w") as f:
            f.write(tokenizer.to_str())
        with open(os.path.join(hf_dir, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast",
                       "eos_token": tokenizer.id_to_token(eos)}, f)
        hf = HFLM(pretrained=hf_dir, dtype="float32", device="cpu", batch_size=args.hf_batch_size)
        (ours, t_ours), (theirs, t_hf) = _alternating(
            [LmsysLM(engine, eos).loglikelihood, hf.loglikelihood], requests, args.repeats)

    diff = max(abs(a[0] - b[0]) for a, b in zip(ours, theirs))
    n_tokens = sum(len(tokenizer.encode(c + x).ids) for c, x in pairs)
    result = {"date": datetime.date.today().isoformat(), "device": jax.devices()[0].device_kind,
              "cpus": os.cpu_count(), "preset": args.preset, "requests": len(pairs),
              "tokens_per_request": n_tokens / len(pairs), "lmsys_requests_per_s": len(pairs) / t_ours,
              "hf_requests_per_s": len(pairs) / t_hf, "hf_batch_size": args.hf_batch_size, "repeats": args.repeats,
              "max_abs_diff": diff}
    print("lmsys eval log-likelihood benchmark")
    print(f"  {len(pairs)} requests of ~{n_tokens / len(pairs):.0f} tokens, model {args.preset}, "
          f"{jax.devices()[0].device_kind}, {os.cpu_count()} CPUs")
    print(f"  lmsys (engine, {args.max_slots} slots): {len(pairs) / t_ours:8.1f} requests/s")
    print(f"  lm-eval hf (batch {args.hf_batch_size}):     {len(pairs) / t_hf:8.1f} requests/s")
    print(f"  speed-up {t_hf / t_ours:.2f}x; largest per-request difference {diff:.2e}")
    return result


if __name__ == "__main__":
    main()
