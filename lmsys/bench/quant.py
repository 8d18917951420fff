"""What weight-only quantization costs in accuracy: logit difference and perplexity of int8 and
fp8 weights against the float weights of a trained run, on held-out text of its corpus.

    python -m lmsys.bench.quant runs/tiny --batches 8

Held-out rows are the dataset samples right after the ones the run trained on (the run's saved
data position), so the model has not seen them.
"""

from __future__ import annotations

import argparse
import datetime

import jax
import jax.numpy as jnp
import numpy as np

from lmsys.models import llama
from lmsys.checkpoint import load_model
from lmsys.serve.quantize import QUANT_TYPES, quantize_params
from lmsys.train.loop import load_data
from lmsys.train.step import loss_sums


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args(argv)

    from lmsys.checkpoint import Checkpointer

    m = load_model(args.run_dir)
    cfg = m.config
    start = int(Checkpointer(f"{args.run_dir}/checkpoints", read_only=True).meta()["data_index"])
    dataset = load_data(cfg)

    @jax.jit
    def evaluate(params, batch):
        logits, _ = llama.forward(params, batch["tokens"], batch["positions"], batch["segment_ids"], cfg=cfg.model)
        return logits, loss_sums(logits, batch["targets"], batch["loss_mask"])

    variants = {"float32": m.params, **{q: jax.jit(quantize_params, static_argnums=1)(m.params, q)
                                        for q in QUANT_TYPES}}
    nll = {k: 0.0 for k in variants}
    count = 0.0
    diff_max = {k: 0.0 for k in variants}
    diff_rel = {k: [] for k in variants}
    for i in range(args.batches):
        batch = dataset.batch(start + i * args.batch_size, args.batch_size)
        ref_logits, _ = evaluate(m.params, batch)
        for name, params in variants.items():
            logits, (loss_sum, n) = evaluate(params, batch)
            nll[name] += float(loss_sum)
            diff_max[name] = max(diff_max[name], float(jnp.max(jnp.abs(logits - ref_logits))))
            diff_rel[name].append(float(jnp.linalg.norm(logits - ref_logits) / jnp.linalg.norm(ref_logits)))
        count += float(n)

    print("lmsys weight-only quantization benchmark")
    print(f"date (UTC)    {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M:%S}")
    print(f"device        {jax.devices()[0].device_kind} (backend {jax.default_backend()}, jax {jax.__version__})")
    print(f"model         {args.run_dir} (step {m.step}), {llama.count_params(cfg.model):,} params")
    print(f"held-out      {args.batches} x {args.batch_size} rows x {cfg.seq_len} tokens "
          f"({int(count):,} scored tokens) after sample {start}")
    print()
    print(f"{'weights':10}{'perplexity':>12}{'vs float32':>12}{'max |dlogit|':>14}{'rel. logit err':>16}")
    ppl = {k: float(np.exp(v / count)) for k, v in nll.items()}
    for name in variants:
        print(f"{name:10}{ppl[name]:12.4f}{ppl[name] / ppl['float32'] - 1:+12.3%}{diff_max[name]:14.4f}"
              f"{np.mean(diff_rel[name]):16.2e}")
    return {"perplexity": ppl, "max_logit_diff": diff_max}


if __name__ == "__main__":
    main()
