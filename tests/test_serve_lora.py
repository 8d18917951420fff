"""Many LoRA adapters served on one base (lmsys.serve.lora): requests of 3 adapters and of the
base run mixed in the same prefill and decode calls, each request's greedy tokens those of its
adapter's merged model alone; putting an adapter into a free slot after warm-up compiles
nothing."""

import jax
import numpy as np
import pytest

from lmsys.config import LoraConfig
from lmsys.models import llama, lora
from lmsys.serve.engine import Engine, EngineConfig
from lmsys.serve.lora import AdapterBank
from lmsys.serve.scheduler import GenerationOptions, RequestError
from test_engine import _after_warmup, _check_greedy, _prompts, setup  # noqa: F401  (the tiny model)

ADAPTERS = {"a": (4, "all", 8.0), "b": (2, "q,v", 4.0), "c": (8, "o,down,k", 16.0)}


def _adapter(cfg, seed, rank, targets, alpha):
    lo = LoraConfig(rank=rank, alpha=alpha, targets=targets)
    ad = lora.init(jax.random.key(seed), lora.param_specs(llama.param_specs(cfg)["layers"], lo), lo)
    keys = iter(jax.random.split(jax.random.key(seed + 100), len(ad)))
    return {w: v if w in lora.EXTRA else {**v, "b": 0.5 * jax.random.normal(next(keys), v["b"].shape)}
            for w, v in ad.items()}


@pytest.fixture(scope="module")
def served(setup):
    cfg, params, tok, _ = setup
    adapters = {name: _adapter(cfg, i, *spec) for i, (name, spec) in enumerate(ADAPTERS.items())}
    bank = AdapterBank(cfg, {"a": adapters["a"], "b": adapters["b"]}, max_loras=3, rank=8)
    engine = Engine(params, cfg, tok, EngineConfig(max_slots=16, page_size=8, max_seq_len=96, prefill_chunk=16,
                                                   batch_invariant=True),  # one shape per call: 2 compiles
                    adapters=bank)
    return engine, adapters


def test_mixed_adapters_in_one_batch_equal_each_merged_model(setup, served):
    cfg, params, tok, forward = setup
    engine, adapters = served
    names = ["", "a", "b", "c"]
    shared = _prompts(1, 6, lo=40, hi=41)[0]  # 5 full pages: the prefix cache could share them
    prompts = _prompts(12, 5) + [shared] * 4  # the last prompt once per adapter and the base
    with _after_warmup(engine):
        engine.set_adapter("c", adapters["c"])  # into the free slot: no recompilation
        reqs = [engine.add_request(p, GenerationOptions(max_tokens=8, adapter=names[i % 4]))
                for i, p in enumerate(prompts)]
        while engine.has_work():
            engine.step()
    assert engine.stats["max_decode_batch"] >= 12  # requests of all four kinds in the same decode calls
    merged = {"": params, **{n: lora.merge(lora.with_adapters(params, a)) for n, a in adapters.items()}}
    early = sum(not _check_greedy((cfg, merged[r.options.adapter], tok, forward), r, 8) for r in reqs)
    assert early <= 1
    same_prompt = [tuple(r.generated) for r in reqs[-4:]]
    assert len(set(same_prompt)) == 4, same_prompt  # each adapter changes the output
    # cached KV pages never cross adapters; within one adapter (and its version) they are reused
    assert engine.stats["prefix_cache_hit_tokens"] == 0
    [again] = engine.generate([shared], GenerationOptions(max_tokens=8, adapter="a"))
    assert engine.stats["prefix_cache_hit_tokens"] > 0 and again.generated == reqs[-3].generated

    with pytest.raises(RequestError, match="adapter 'd' is not loaded; loaded: \\['a', 'b', 'c'\\]"):
        engine.add_request([1, 2, 3], GenerationOptions(adapter="d"))
    with pytest.raises(ValueError, match="all 3 adapter slots are taken"):
        engine.set_adapter("d", adapters["a"])


def test_http_model_picks_the_adapter_and_models_lists_them(served):
    import httpx

    from lmsys.serve.server import BackgroundServer, create_app

    engine, _ = served
    prompt = _prompts(1, 7)[0]
    [direct] = engine.generate([prompt], GenerationOptions(max_tokens=6, adapter="b"))
    server = BackgroundServer(create_app(engine, "tiny", engine.tokenizer))
    try:
        models = httpx.get(f"{server.url}/v1/models").json()["data"]
        assert [(m["id"], m.get("parent")) for m in models] == [("tiny", None), ("a", "tiny"), ("b", "tiny"),
                                                                 ("c", "tiny")]
        body = {"model": "b", "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
        out = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
        assert out["model"] == "b" and out["choices"][0]["text"] == direct.text
        # the base's embeddings on a server holding an adapter bank (the bank's slot 0: no adapter)
        emb = httpx.post(f"{server.url}/v1/embeddings", json={"model": "tiny", "input": [prompt]}, timeout=60)
        assert emb.status_code == 200 and len(emb.json()["data"][0]["embedding"]) == engine.model.d_model
        missing = httpx.post(f"{server.url}/v1/completions", json={**body, "model": "z"}, timeout=60)
        assert missing.status_code == 404 and "'tiny', 'a', 'b', 'c'" in missing.json()["error"]["message"]
    finally:
        server.stop()


def test_lora_flag_errors(setup):
    from lmsys.config import ConfigError
    from lmsys.serve.lora import adapter_bank

    cfg = setup[0]
    with pytest.raises(ConfigError, match="--lora 'code': expected NAME=PATH"):
        adapter_bank(["code"], 0, cfg)
    with pytest.raises(Exception, match="not a LoRA run directory .* nor a PEFT adapter"):
        adapter_bank(["code=/nonexistent"], 0, cfg)
