"""Serving throughput: lmsys's engine (continuous batching over a paged KV cache) against a naive
loop that serves one request at a time with a plain JAX decode loop, same model, same prompts.

    python -m lmsys.bench.serve --preset tiny --requests 16 --prompt-len 64 --max-tokens 64

All requests arrive at once (a fixed load of `--requests` concurrent requests). Reported per
side: output tokens/s, time to first token (TTFT) and inter-token latency (ITL) percentiles.
Parameters are random (throughput does not depend on the weights); every request generates
exactly `--max-tokens` tokens (EOS ignored).
"""

from __future__ import annotations

import argparse
import datetime
import time

import jax
import jax.numpy as jnp
import numpy as np

from lmsys.config import from_dict
from lmsys.models import llama
from lmsys.serve.engine import Engine, EngineConfig, GenerationOptions


def _percentiles(xs) -> str:
    if not len(xs):
        return "-"
    p = np.percentile(np.asarray(xs) * 1e3, [50, 90, 99])
    return f"{p[0]:8.1f} {p[1]:8.1f} {p[2]:8.1f}"


def run_engine(params, model, tokenizer, prompts, max_tokens, args):
    engine = Engine(params, model, tokenizer, EngineConfig(
        max_slots=args.max_slots, page_size=args.page_size, max_seq_len=args.max_seq_len,
        prefill_chunk=args.prefill_chunk, dtype=args.dtype))
    engine.warmup(progress=False)
    times: dict[int, list[float]] = {}
    opts = GenerationOptions(max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    reqs = []
    for p in prompts:
        stamps = []
        reqs.append(engine.add_request(p, opts, lambda e, s=stamps: s.append(time.perf_counter())))
        times[reqs[-1].id] = stamps
    while engine.has_work():
        engine.step()
    elapsed = time.perf_counter() - start
    ttft = [times[r.id][0] - start for r in reqs]
    itl = [b - a for r in reqs for a, b in zip(times[r.id], times[r.id][1:])]
    tokens = sum(len(r.generated) for r in reqs)
    return {"tokens": tokens, "seconds": elapsed, "ttft": ttft, "itl": itl,
            "max_batch": engine.stats["max_decode_batch"], "outputs": [r.generated for r in reqs]}


def run_naive(params, model, prompts, max_tokens, args):
    """One request at a time: prefill the prompt, then a greedy decode loop, contiguous cache."""
    dtype = jnp.dtype(args.dtype)

    @jax.jit
    def prefill(params, tokens_1T):
        cache = llama.init_cache(model, 1, args.max_seq_len, dtype)
        positions = jnp.arange(tokens_1T.shape[1])[None]
        logits, aux = llama.forward(params, tokens_1T, positions, cfg=model, dtype=dtype, cache=cache)
        return jnp.argmax(logits[0, -1]).astype(jnp.int32), aux["cache"]

    @jax.jit
    def decode(params, cache, token, position):
        logits, aux = llama.forward(params, token[None, None], position[None, None], cfg=model,
                                    dtype=dtype, cache=cache)
        return jnp.argmax(logits[0, -1]).astype(jnp.int32), aux["cache"]

    # compile both outside the timed region
    warm_tok, warm_cache = prefill(params, jnp.asarray([prompts[0]], jnp.int32))
    jax.block_until_ready(decode(params, warm_cache, warm_tok, jnp.int32(len(prompts[0]))))
    start = time.perf_counter()
    ttft, itl, outputs = [], [], []
    for p in prompts:
        token, cache = prefill(params, jnp.asarray([p], jnp.int32))
        out = [int(token)]
        last = time.perf_counter()
        ttft.append(last - start)
        for i in range(max_tokens - 1):
            token, cache = decode(params, cache, token, jnp.int32(len(p) + i))
            out.append(int(token))
            now = time.perf_counter()
            itl.append(now - last)
            last = now
        outputs.append(out)
    elapsed = time.perf_counter() - start
    return {"tokens": sum(map(len, outputs)), "seconds": elapsed, "ttft": ttft, "itl": itl,
            "max_batch": 1, "outputs": outputs}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. model.n_layers=2")
    ap.add_argument("--requests", type=int, default=16, help="concurrent requests (all arrive at once)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-slots", type=int, default=16)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--prefill-chunk", type=int, default=64)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args(argv)

    from lmsys.data import load_tokenizer

    cfg = from_dict({"model": {"preset": args.preset}}, args.set)
    model = cfg.model
    tokenizer = load_tokenizer("builtin", model.vocab_size)
    params = llama.init(jax.random.key(0), model)
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(2, model.vocab_size, args.prompt_len))) for _ in range(args.requests)]

    naive = run_naive(params, model, prompts, args.max_tokens, args)
    engine = run_engine(params, model, tokenizer, prompts, args.max_tokens, args)
    same = sum(a == b for a, b in zip(engine["outputs"], naive["outputs"]))
    ratio = (engine["tokens"] / engine["seconds"]) / (naive["tokens"] / naive["seconds"])

    print("lmsys serving benchmark")
    print(f"date (UTC)    {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M:%S}")
    print(f"device        {jax.devices()[0].device_kind} (backend {jax.default_backend()}, jax {jax.__version__})")
    print(f"model         {args.preset}: {llama.count_params(model):,} params, {args.dtype}")
    print(f"load          {args.requests} concurrent requests x {args.prompt_len} prompt tokens -> "
          f"{args.max_tokens} output tokens (greedy)")
    print()
    print(f"{'':14}{'out tok/s':>10} {'max batch':>10}   {'TTFT ms p50/p90/p99':>26}   {'ITL ms p50/p90/p99':>26}")
    for name, r in (("engine", engine), ("naive loop", naive)):
        print(f"{name:14}{r['tokens'] / r['seconds']:10.1f} {r['max_batch']:10d}   "
              f"{_percentiles(r['ttft']):>26}   {_percentiles(r['itl']):>26}")
    print()
    print(f"greedy outputs identical to the naive loop: {same}/{args.requests}")
    print(f"engine/naive throughput ratio: {ratio:.2f} (goal >= 4 at 16 concurrent requests)")
    return {"ratio": ratio, "same": same, "engine": engine, "naive": naive}


if __name__ == "__main__":
    main()
