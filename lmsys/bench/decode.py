"""Decode at batch against its memory roofline: the engine's decode tokens/s with every slot busy
at a long context, over (weight bytes + KV bytes read per step) / measured copy bandwidth.

    python -m lmsys.bench.decode --preset 1b --batch 64 --context 2048

`--batch` requests of `--context` random prompt tokens are prefilled, then the engine steps with
all of them decoding (greedy, EOS ignored): `--warmup` untimed steps (compiles), then
`--blocks` timed blocks of `--steps` engine steps; the median block is reported, host work
(scheduling, sampling's device_get) included, as a user of the engine sees it. Generated ids are
not detokenized (the engine is given a tokenizer that renders no text).

The roofline: a decode step must read every weight once (bf16 here; an untied embedding table
only for the batch's rows) and the keys and values of every cached token of every request:
2 x layers x kv_heads x head_dim x context x batch x 2 bytes, at the mean context of the timed
steps. Those bytes over the copy bandwidth measured on the same device (`lmsys.bench.peaks`)
are the fastest step any implementation could take; batch / that time is the roofline tokens/s.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from lmsys.bench.peaks import check_positive, copy_bandwidth, write_json
from lmsys.config import from_dict
from lmsys.models import llama
from lmsys.serve.engine import Engine, EngineConfig
from lmsys.serve.scheduler import GenerationOptions


class _IdsOnly:
    """The engine detokenizes for stop strings and streaming; this benchmark reads ids only."""

    def decode(self, ids, skip_special_tokens=True) -> str:
        return ""


def roofline_bytes(model, batch: int, context: float, itemsize: int = 2) -> dict:
    """Bytes a decode step must read: the weights once, and each request's cached K and V."""
    weights = llama.count_params(model) - (0 if model.tie_embeddings else (model.vocab_size - batch) * model.d_model)
    kv = 2 * model.n_layers * model.n_kv_heads * model.head_dim * context * batch
    return {"weight_bytes": weights * itemsize, "kv_bytes": kv * itemsize}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m lmsys.bench.decode", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="1b")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="model override, e.g. model.n_layers=2")
    ap.add_argument("--batch", type=int, default=64, help="requests decoding together")
    ap.add_argument("--context", type=int, default=2048, help="prompt tokens per request")
    ap.add_argument("--steps", type=int, default=32, help="engine steps per timed block")
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=4, help="untimed decode steps first")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--copy-mib", type=int, default=2048)
    ap.add_argument("--json", default="", metavar="PATH")
    args = ap.parse_args(argv)
    check_positive(ap, args, ("batch", "context", "steps", "blocks", "page_size", "prefill_chunk", "copy_mib"))
    if args.warmup < 1:
        ap.error(f"--warmup must be >= 1 (the first decode step compiles), got {args.warmup}")

    model = from_dict({"model": {"preset": args.preset}}, args.set).model
    new_tokens = args.warmup + args.blocks * args.steps + 4  # slack: a first decode may join the last prefill step
    max_seq = -(-(args.context + new_tokens) // args.page_size) * args.page_size
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), llama.init(jax.random.key(0), model))
    engine = Engine(params, model, _IdsOnly(), EngineConfig(
        max_slots=args.batch, page_size=args.page_size, max_seq_len=max_seq,
        num_pages=args.batch * (max_seq // args.page_size), prefill_chunk=args.prefill_chunk,
        dtype="bfloat16"))
    rng = np.random.default_rng(0)
    opts = GenerationOptions(max_tokens=new_tokens, ignore_eos=True)
    reqs = [engine.add_request(list(map(int, rng.integers(2, model.vocab_size, args.context))), opts)
            for _ in range(args.batch)]
    t0 = time.perf_counter()
    while not all(r.generated for r in reqs):  # prefill (and the first token) of every request
        engine.step()
    prefill_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        engine.step()
    times, generated = [], sum(len(r.generated) for r in reqs)
    for _ in range(args.blocks):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        times.append(time.perf_counter() - t0)
        now = sum(len(r.generated) for r in reqs)
        if now - generated != args.batch * args.steps:
            raise SystemExit(f"a timed block decoded {now - generated} tokens, not {args.batch} x {args.steps}: "
                             f"not every slot was decoding")
        generated = now
    step_s = statistics.median(times) / args.steps
    mean_context = args.context + 1 + args.warmup + args.blocks * args.steps / 2
    hbm = copy_bandwidth(args.copy_mib)
    need = roofline_bytes(model, args.batch, mean_context)
    roof_s = (need["weight_bytes"] + need["kv_bytes"]) / hbm
    result = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "jax": jax.__version__,
              "preset": args.preset, "set": args.set, "batch": args.batch, "context": args.context,
              "mean_context": mean_context, "step_s": step_s, "tokens_per_s": args.batch / step_s,
              "blocks_s": times, "prefill_s": prefill_s, "copy_gbs": hbm / 1e9, **need,
              "roofline_step_s": roof_s, "roofline_tokens_per_s": args.batch / roof_s,
              "fraction_of_roofline": roof_s / step_s}
    print("lmsys decode roofline")
    print(f"date (UTC)    {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M:%S}")
    print(f"device        {result['device']} (backend {result['backend']}, jax {jax.__version__})")
    print(f"model         {' '.join([args.preset, *args.set])}: {llama.count_params(model):,} params, bf16 weights and KV")
    print(f"load          {args.batch} requests x {args.context} prompt tokens, all decoding; "
          f"median of {args.blocks} blocks x {args.steps} engine steps (prefill took {prefill_s:.1f} s)")
    print(f"bytes/step    weights {need['weight_bytes'] / 1e9:.2f} GB + KV {need['kv_bytes'] / 1e9:.2f} GB "
          f"(mean context {mean_context:.0f}); copy bandwidth {hbm / 1e9:.0f} GB/s (read + write)")
    print(f"decode        {1e3 * step_s:.2f} ms/step, {args.batch / step_s:,.0f} tokens/s")
    print(f"roofline      {1e3 * roof_s:.2f} ms/step, {args.batch / roof_s:,.0f} tokens/s")
    print(f"fraction of the roofline: {100 * roof_s / step_s:.1f}% (goal >= 70%)")
    return write_json(args.json, result)


if __name__ == "__main__":
    main()
