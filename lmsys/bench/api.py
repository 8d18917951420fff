"""The API extensions' costs: constrained vs free decode tokens/s at one batch (the grammar
mask's overhead), and /v1/embeddings' path (`Embedder`) vs transformers on the same model.

    python -m lmsys.bench.api --preset tiny --batch 16 --max-tokens 64 --repeats 3
    python -m lmsys.bench.api --preset tiny --embeddings 64 --repeats 3

Parameters are random. Decode: `--batch` requests at once, every one free (EOS ignored) or every
one constrained by a regex of lowercase words (lmsys.serve.constrained; its mask filled per step on
the host, applied in the decode call), alternating timed runs, median per side; tokens/s counts
generated tokens over the wall time of the run (prefill included, the same on both sides); and
the median time per decode step of filling the constrained rows' masks.
Embeddings: `--embeddings` inputs of 8..256 tokens, lmsys's pooled prefill vs transformers'
`model.model(...)` (float32, one left-aligned padded batch per call of at most `--batch` inputs,
attention-masked), inputs/s.
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
import time

import jax
import numpy as np

from lmsys.config import from_dict
from lmsys.models import llama
from lmsys.serve.constrained import request_grammar
from lmsys.serve.embeddings import Embedder
from lmsys.serve.engine import Engine, EngineConfig
from lmsys.serve.scheduler import GenerationOptions


def _tokenizer(vocab: int):
    """A byte-level BPE of `vocab` tokens trained on a little synthetic text (the grammar library
    needs a real byte vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    words = ["alpha", "beta", "gamma", "delta", "value", "return", "json", "name", "city", "12", "{", "}", '"']
    rng = np.random.default_rng(0)
    text = [" ".join(rng.choice(words, 12)) for _ in range(2000)]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def _median_runs(sides: dict, repeats: int) -> dict:
    times = {k: [] for k in sides}
    for _ in range(repeats):
        for name, fn in sides.items():  # alternating: the load drifts on a shared machine
            times[name].append(fn())
    return {k: float(np.median(v)) for k, v in times.items()}


def bench_decode(engine: Engine, batch: int, max_tokens: int, repeats: int) -> dict:
    grammar = request_grammar("regex", "[a-z ]{600}")  # never complete within max_tokens: full rows
    prompt = engine.encode("json name city value")

    def run(constrained: bool):
        def once():
            opts = GenerationOptions(max_tokens=max_tokens, temperature=1.0, seed=0, ignore_eos=not constrained,
                                     grammar=grammar if constrained else None)
            start = time.perf_counter()
            reqs = [engine.add_request(prompt, opts) for _ in range(batch)]
            while engine.has_work():
                engine.step()
            return sum(len(r.generated) for r in reqs) / (time.perf_counter() - start)
        return once

    run(True)()  # warm: the grammar machinery and every shape
    fill, bitmask = [], engine.grammars.bitmask

    def timed(*args):  # the host's share: llguidance filling the step's masks
        start = time.perf_counter()
        out = bitmask(*args)
        fill.append(time.perf_counter() - start)
        return out

    engine.grammars.bitmask = timed
    out = _median_runs({"free tok/s": run(False), "constrained tok/s": run(True)}, repeats)
    return {**out, "mask fill ms/step (constrained)": 1e3 * float(np.median([f for f in fill if f > 2e-5]))}


def bench_embeddings(engine: Engine, params, model, n: int, batch: int, repeats: int) -> dict:
    import torch
    import transformers

    from lmsys.interop import save_hf

    rng = np.random.default_rng(0)
    inputs = [rng.integers(1, model.vocab_size, int(rng.integers(8, 257))).tolist() for _ in range(n)]
    with tempfile.TemporaryDirectory() as d:
        save_hf(params, model, d, dtype="float32")
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    embedder = Embedder(engine)

    def lmsys_side():
        start = time.perf_counter()
        embedder(inputs, pooling="mean")
        return n / (time.perf_counter() - start)

    def hf_side():
        start = time.perf_counter()
        with torch.no_grad():
            for i in range(0, n, batch):
                chunk = inputs[i:i + batch]
                T = max(map(len, chunk))
                ids = torch.tensor([x + [0] * (T - len(x)) for x in chunk])
                mask = torch.tensor([[1] * len(x) + [0] * (T - len(x)) for x in chunk])
                h = hf.model(ids, attention_mask=mask).last_hidden_state
                _ = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return n / (time.perf_counter() - start)

    lmsys_side()  # warm: compiles each padded shape
    out = _median_runs({"lmsys inputs/s": lmsys_side, "transformers inputs/s": hf_side}, repeats)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--embeddings", type=int, default=0, help="bench embeddings over this many inputs instead")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    model = from_dict({"model": {"preset": args.preset, "vocab_size": 512}}).model
    params = llama.init(jax.random.key(0), model)
    engine = Engine(params, model, _tokenizer(512), EngineConfig(max_slots=args.batch, page_size=16,
                                                                 max_seq_len=128, prefill_chunk=64), eos_token_id=0)
    if args.embeddings:  # (the embedding call is not one of the engine's warmed-up shapes)
        result = bench_embeddings(engine, params, model, args.embeddings, args.batch, args.repeats)
    else:
        engine.warmup(progress=False)
        result = bench_decode(engine, args.batch, args.max_tokens, args.repeats)
    print(f"{datetime.date.today()} {jax.devices()[0].device_kind} ({os.cpu_count()} CPUs) preset={args.preset} "
          + " ".join(f"{k}={v:.1f}" for k, v in result.items()))


if __name__ == "__main__":
    main()
