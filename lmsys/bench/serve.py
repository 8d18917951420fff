"""Serving throughput: lmsys's engine (continuous batching over a paged KV cache) against a naive
loop that serves one request at a time with a plain JAX decode loop, same model, same prompts.

    python -m lmsys.bench.serve --preset tiny --requests 16 --prompt-len 64 --max-tokens 64
    python -m lmsys.bench.serve --preset tiny --hf --interval 0.25   # + transformers, torch CPU
    python -m lmsys.bench.serve --workload shared-prefix --requests 32 --prefix-len 1000
    python -m lmsys.bench.serve --workload copy --prompt-len 64 --max-tokens 64

All requests arrive at once (a fixed load of `--requests` concurrent requests). Reported per
side: output tokens/s, time to first token (TTFT) and inter-token latency (ITL) percentiles.
Parameters are random (throughput does not depend on the weights); every request generates
exactly `--max-tokens` tokens (EOS ignored).

`--hf` adds a side-by-side with Hugging Face transformers `generate` (torch, float32, on the same
hardware as JAX: CPU, or CUDA next to a JAX GPU) on the same model, exported with lmsys's
exporter: (a) static batch, all requests in one left-padded `generate` call; (b) staggered
arrivals, one request every `--interval` seconds: the engine admits each as it arrives, while
transformers serves them one `generate` call per request, in arrival order, one at a time (its
`generate` has no admission of new requests into a running batch). TTFT and latency count from
each request's arrival. `--repeats N` runs each load N times per side, the sides taking turns
(on a shared machine the load changes between runs), and reports each side's median run.
`--threads 1` runs each side's ops on one thread (torch's thread count, XLA:CPU's Eigen thread
pool off), so that on a shared machine both compete for the cores on equal terms; without it,
torch takes as many threads as CPUs and XLA:CPU its own pool.
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from lmsys.config import from_dict
from lmsys.models import llama
from lmsys.serve.engine import Engine, EngineConfig
from lmsys.serve.scheduler import GenerationOptions


def _percentiles(xs) -> str:
    if not len(xs):
        return "-"
    p = np.percentile(np.asarray(xs) * 1e3, [50, 90, 99])
    return f"{p[0]:8.1f} {p[1]:8.1f} {p[2]:8.1f}"


def make_engine(params, model, tokenizer, args) -> Engine:
    # a pool of enough pages for every slot at full length, on every backend
    engine = Engine(params, model, tokenizer, EngineConfig(
        max_slots=args.max_slots, page_size=args.page_size, max_seq_len=args.max_seq_len,
        num_pages=args.max_slots * (args.max_seq_len // args.page_size),
        prefill_chunk=args.prefill_chunk, prefill_tokens=args.prefill_tokens, dtype=args.dtype))
    engine.warmup(progress=False)
    return engine


def run_engine(engine: Engine, prompts, max_tokens, interval=0.0):
    """Request i arrives `i * interval` seconds after the start (0: all at once) and is queued
    then; the engine steps while it has work. TTFT and latency count from each arrival."""
    engine.stats["max_decode_batch"] = 0
    opts = GenerationOptions(max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    arrivals = [start + i * interval for i in range(len(prompts))]
    reqs, stamps = [], [[] for _ in prompts]
    while len(reqs) < len(prompts) or engine.has_work():
        now = time.perf_counter()
        while len(reqs) < len(prompts) and arrivals[len(reqs)] <= now:
            s = stamps[len(reqs)]
            reqs.append(engine.add_request(prompts[len(reqs)], opts,
                                           lambda e, s=s: s.append(time.perf_counter())))
        if engine.has_work():
            engine.step()
        else:
            time.sleep(max(0.0, arrivals[len(reqs)] - now))
    elapsed = time.perf_counter() - start
    return _result(reqs_out=[r.generated for r in reqs], stamps=stamps, arrivals=arrivals,
                   seconds=elapsed, max_batch=engine.stats["max_decode_batch"])


def _result(reqs_out, stamps, arrivals, seconds, max_batch) -> dict:
    """Tokens, TTFT / inter-token / whole-request latencies (from arrival) of one run."""
    return {"tokens": sum(map(len, reqs_out)), "seconds": seconds,
            "ttft": [t[0] - a for t, a in zip(stamps, arrivals)],
            "itl": [b - a for t in stamps for a, b in zip(t, t[1:])],
            "latency": [t[-1] - a for t, a in zip(stamps, arrivals)],
            "max_batch": max_batch, "outputs": reqs_out}


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
    outputs, stamps = [], []
    for p in prompts:
        token, cache = prefill(params, jnp.asarray([p], jnp.int32))
        out, times = [int(token)], [time.perf_counter()]
        for i in range(max_tokens - 1):
            token, cache = decode(params, cache, token, jnp.int32(len(p) + i))
            out.append(int(token))
            times.append(time.perf_counter())
        outputs.append(out)
        stamps.append(times)
    return _result(outputs, stamps, [start] * len(prompts), time.perf_counter() - start, 1)


def torch_device() -> str:
    """The torch device that is the same hardware as JAX's default backend: "cuda" next to a
    JAX GPU, else "cpu"."""
    import torch

    if jax.default_backend() == "cpu":
        return "cpu"
    if jax.default_backend() == "gpu" and torch.cuda.is_available():
        return "cuda"
    raise SystemExit(f"--hf compares on the same hardware, but JAX runs on {jax.default_backend()} "
                     f"and torch has no such device here")


def load_hf_model(params, model, directory, threads=0):
    """The same parameters, exported with lmsys's exporter (float32) and loaded by transformers
    (torch, float32, on `torch_device()`; on a CPU `threads` torch threads, 0: as many as CPUs)."""
    import torch
    import transformers

    from lmsys.interop import save_hf

    torch.set_num_threads(threads or os.cpu_count() or 1)
    save_hf(params, model, directory, dtype="float32")
    device = torch_device()
    if device == "cuda":  # float32 matmuls in TF32 on both sides: JAX's default on NVIDIA GPUs
        torch.backends.cuda.matmul.allow_tf32 = True
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    hf = hf.to(device).eval()
    hf.generation_config.eos_token_id = None  # like the engine's ignore_eos: never stop early
    hf.generation_config.pad_token_id = 0
    return hf


class _Stamps:
    """A transformers streamer that timestamps each generated step (the first `put` is the
    prompt)."""

    def __init__(self):
        self.times, self._prompt_seen = [], False

    def put(self, value):
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self):
        pass


def _hf_generate(hf, prompts, max_tokens):
    """One greedy `generate` call over `prompts` (left-padded to one length); returns the new
    token ids per prompt and the timestamps of each generated step."""
    import torch

    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    stamps = _Stamps()
    ids, mask = ids.to(hf.device), mask.to(hf.device)
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_tokens,
                          min_new_tokens=max_tokens, streamer=stamps)
    return [list(map(int, row)) for row in out[:, width:].tolist()], stamps.times


def run_hf(hf, prompts, max_tokens, interval=0.0, batched=True, warm=True):
    """transformers serving `prompts`: batched = one generate call for all of them (they all
    arrive at once); else request i arrives at `i * interval` and each gets its own generate
    call, in arrival order, one at a time."""
    if warm:  # one untimed call of the same shapes first (the engine compiles its shapes before)
        _hf_generate(hf, prompts if batched else prompts[:1], max_tokens)
    start = time.perf_counter()
    if batched:
        outputs, times = _hf_generate(hf, prompts, max_tokens)
        return _result(outputs, [times] * len(prompts), [start] * len(prompts),
                       time.perf_counter() - start, len(prompts))
    arrivals = [start + i * interval for i in range(len(prompts))]
    outputs, stamps = [], []
    for p, arrival in zip(prompts, arrivals):
        time.sleep(max(0.0, arrival - time.perf_counter()))
        [out], times = _hf_generate(hf, [p], max_tokens)
        outputs.append(out)
        stamps.append(times)
    return _result(outputs, stamps, arrivals, time.perf_counter() - start, 1)


def _table(rows, latency=False) -> None:
    extra = f"   {'latency ms p50/p90/p99':>26}" if latency else ""
    print(f"{'':22}{'out tok/s':>10} {'max batch':>10}   {'TTFT ms p50/p90/p99':>26}   "
          f"{'ITL ms p50/p90/p99':>26}{extra}")
    for name, r in rows:
        extra = f"   {_percentiles(r['latency']):>26}" if latency else ""
        print(f"{name:22}{r['tokens'] / r['seconds']:10.1f} {r['max_batch']:10d}   "
              f"{_percentiles(r['ttft']):>26}   {_percentiles(r['itl']):>26}{extra}")


def _single_threaded_xla() -> None:
    """XLA:CPU's ops on one thread. XLA reads its flags once, when JAX makes its CPU backend,
    so this must run before the first computation of the process."""
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise SystemExit("--threads 1 must take effect before JAX starts its CPU backend: run "
                         "the benchmark in its own process (python -m lmsys.bench.serve ...)")
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_multi_thread_eigen=false".strip()


def _same(a, b) -> int:
    return sum(x == y for x, y in zip(a["outputs"], b["outputs"]))


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
    ap.add_argument("--prefill-tokens", type=int, default=0,
                    help="padded prompt tokens per prefill call (0: the engine's 4 x prefill-chunk)")
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--hf", action="store_true",
                    help="also compare with transformers generate (torch, on the same device) on "
                         "the same exported model")
    ap.add_argument("--interval", type=float, default=0.25,
                    help="with --hf: seconds between arrivals in the staggered run")
    ap.add_argument("--threads", type=int, default=0, choices=[0, 1],
                    help="1: each side's ops on one thread (torch and XLA:CPU); 0: torch as many "
                         "threads as CPUs, XLA:CPU its own pool")
    ap.add_argument("--repeats", type=int, default=1,
                    help="with --hf: runs per side and load, the sides alternating; the median run "
                         "is reported")
    ap.add_argument("--workload", default="default", choices=["default", "shared-prefix", "copy"],
                    help="shared-prefix: prefix caching on vs off; copy: ngram and draft-model "
                         "speculative decoding vs plain at batch 1 and 8 (lmsys.bench.serve_reuse)")
    ap.add_argument("--prefix-len", type=int, default=1000, help="shared-prefix: system prompt tokens")
    ap.add_argument("--num-speculative-tokens", type=int, default=4, help="copy: drafted tokens per step")
    ap.add_argument("--draft-layers", type=int, default=1,
                    help="copy: also a draft-model side, the preset with this many layers and its own "
                         "random weights; 0 = none")
    args = ap.parse_args(argv)
    if args.hf and args.dtype != "float32":
        ap.error("--hf compares in float32 (both sides); drop --dtype")
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads:
        _single_threaded_xla()

    from lmsys.data import load_tokenizer

    cfg = from_dict({"model": {"preset": args.preset}}, args.set)
    model = cfg.model
    tokenizer = load_tokenizer("builtin", model.vocab_size)
    params = llama.init(jax.random.key(0), model)
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(2, model.vocab_size, args.prompt_len))) for _ in range(args.requests)]

    if args.workload != "default":
        from lmsys.bench import serve_reuse

        _header(args, model)
        return (serve_reuse.shared_prefix if args.workload == "shared-prefix" else serve_reuse.copy_heavy)(
            params, model, tokenizer, args)
    naive = run_naive(params, model, prompts, args.max_tokens, args)
    engine_obj = make_engine(params, model, tokenizer, args)
    engine = run_engine(engine_obj, prompts, args.max_tokens)
    calls, chunks = engine_obj.stats["prefill_calls"], engine_obj.stats["prefill_chunks"]
    same = _same(engine, naive)
    ratio = (engine["tokens"] / engine["seconds"]) / (naive["tokens"] / naive["seconds"])

    _header(args, model)
    print(f"load          {args.requests} concurrent requests x {args.prompt_len} prompt tokens -> "
          f"{args.max_tokens} output tokens (greedy)")
    print()
    _table((("engine", engine), ("naive loop", naive)))
    print()
    print(f"engine prefill: {chunks} chunks in {calls} calls (at most {engine_obj.scheduler.prefill_tokens} "
          f"padded tokens per call)")
    print(f"greedy outputs identical to the naive loop: {same}/{args.requests}")
    print(f"engine/naive throughput ratio: {ratio:.2f} (goal >= 4 at 16 concurrent requests)")
    result = {"ratio": ratio, "same": same, "engine": engine, "naive": naive}
    if args.hf:
        result.update(_compare_hf(params, model, prompts, args, engine_obj, engine))
    return result


def _header(args, model) -> None:
    print("lmsys serving benchmark")
    print(f"date (UTC)    {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M:%S}")
    print(f"device        {jax.devices()[0].device_kind} (backend {jax.default_backend()}, jax {jax.__version__})")
    print(f"model         {args.preset}: {llama.count_params(model):,} params, {args.dtype}")


def _median_run(runs: list[dict]) -> dict:
    """The run with the median throughput (the upper middle one of an even count)."""
    return sorted(runs, key=lambda r: r["tokens"] / r["seconds"])[len(runs) // 2]


def _compare_hf(params, model, prompts, args, engine_obj, engine_static) -> dict:
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as directory:
        hf = load_hf_model(params, model, directory, args.threads)
    # the two sides take turns, `--repeats` times per load, so both see the same machine
    runs = {k: [] for k in ("engine_static", "hf_static", "engine_stag", "hf_stag")}
    for i in range(args.repeats):
        if i:  # the first engine static run is the one compared with the naive loop above
            engine_static = run_engine(engine_obj, prompts, args.max_tokens)
        runs["engine_static"].append(engine_static)
        runs["hf_static"].append(run_hf(hf, prompts, args.max_tokens, warm=i == 0))
    for i in range(args.repeats):
        runs["engine_stag"].append(run_engine(engine_obj, prompts, args.max_tokens,
                                              interval=args.interval))
        runs["hf_stag"].append(run_hf(hf, prompts, args.max_tokens, interval=args.interval,
                                      batched=False, warm=i == 0))
    engine_static, hf_static, engine_stag, hf_stag = map(_median_run, runs.values())
    n = len(prompts)
    print()
    where = (f"CPU, float32, {torch.get_num_threads()} threads), same model exported by lmsys; "
             f"XLA:CPU {'on one thread' if args.threads else 'with its thread pool'}"
             if hf.device.type == "cpu" else
             f"{torch.cuda.get_device_name()}, float32 with TF32 matmuls like JAX's default), "
             f"same model exported by lmsys")
    print(f"vs Hugging Face transformers {transformers.__version__} generate (torch {torch.__version__}, "
          + where)
    if args.repeats > 1:
        print(f"each side: the run with the median tok/s of {args.repeats}, the sides alternating; "
              f"all runs' tok/s:")
        for name, rs in runs.items():
            print(f"  {name:14s}" + " ".join(f"{r['tokens'] / r['seconds']:8.1f}" for r in rs))
    print(f"(a) static batch: {n} requests arrive at once; transformers: one generate call over "
          f"the {n} left-padded prompts")
    _table((("lmsys engine", engine_static), ("transformers generate", hf_static)), latency=True)
    print(f"(b) staggered: one request every {args.interval:g} s; transformers: one generate call "
          f"per request, in arrival order, one at a time")
    _table((("lmsys engine", engine_stag), ("transformers generate", hf_stag)), latency=True)
    ratios = {k: (e["tokens"] / e["seconds"]) / (h["tokens"] / h["seconds"])
              for k, e, h in (("static", engine_static, hf_static), ("staggered", engine_stag, hf_stag))}
    print(f"engine/transformers throughput ratio: static {ratios['static']:.2f}, staggered "
          f"{ratios['staggered']:.2f} (goal > 1)")
    print(f"greedy outputs identical to transformers: static {_same(engine_static, hf_static)}/{n}, "
          f"staggered {_same(engine_stag, hf_stag)}/{n} (random weights: near-ties can differ)")
    return {"hf_static": hf_static, "hf_staggered": hf_stag, "engine_staggered": engine_stag,
            "engine_static_median": engine_static, "hf_ratios": ratios}


if __name__ == "__main__":
    main()
