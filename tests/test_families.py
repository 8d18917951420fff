"""More model families from Hugging Face: Mistral with a sliding window, Gemma 2 and Gemma 3
(text), Mixtral, Qwen2-MoE and Qwen3-MoE. Tiny random transformers models, every tensor
randomized, the prompts longer than the window: the serving engine's prompt log-probs equal
transformers' (1e-4, fp32) and its greedy continuations are transformers' (near-tie rule);
HF -> lmsys -> HF is a bitwise round trip; a few training steps from the import on
fsdp x tensor (x expert for MoE) equal one device (losses and gradient norms, 1e-5) and their export loads in transformers
with lmsys's logits; an MoE import on expert=4 reads each expert's bytes once, on its device."""

import dataclasses
import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from common import tiny_config
from test_hf import (_assert_close, _check_greedy, _engine_tokenizer, _import_counting_reads,
                     _load_transformers, _safetensors, _torch_logits)
from lmsys.config import from_dict
from lmsys.interop import load_hf, save_hf
from lmsys.interop import hf as hf_interop
from lmsys.models import llama
from lmsys.parallel import Rules, build_mesh
from lmsys.serve.engine import Engine, EngineConfig
from lmsys.serve.scheduler import GenerationOptions
from lmsys.train import Trainer

V, T, WINDOW = 96, 24, 8
COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              initializer_range=0.3, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0,
              pad_token_id=1)
GEMMA = dict(head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=24)
FAMILIES = {  # name: (config class, model class, fields beside COMMON, ModelConfig fields it sets)
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(head_dim=16, sliding_window=WINDOW),
                dict(sliding_window=WINDOW, global_every=0)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",  # alternating local/global, both soft caps
               dict(GEMMA, attn_logit_softcapping=5.0, final_logit_softcapping=20.0),
               dict(global_every=2, attn_soft_cap=5.0, final_soft_cap=20.0, norm_plus_one=True,
                    mlp_act="gelu_tanh", query_pre_attn_scalar=24.0, tie_embeddings=True)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",  # 5 local : 1 global, two RoPE bases, the global one scaled
               dict(GEMMA, num_hidden_layers=6, rope_parameters={
                   "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                   "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}}),
               dict(global_every=6, rope_local_theta=100.0, rope_theta=10000.0, qk_norm=True,
                    rope_linear_factor=4.0,
                    post_norms=True, embed_scale=True)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",  # softmax over the top-2 of 4
                dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32),
                dict(n_experts=4, experts_per_token=2, router_norm_topk=True, moe_d_ff=32)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",  # gated shared expert, no renorm
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=48, norm_topk_prob=False),
                  dict(n_shared_experts=1, shared_expert_gate=True, shared_d_ff=48,
                       router_norm_topk=False, qkv_bias=True)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",  # norm_topk_prob, q/k norm
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       norm_topk_prob=True, head_dim=16),
                  dict(router_norm_topk=True, qk_norm=True, n_shared_experts=0)),
}


def _hf_model(kind, directory):
    """A random transformers model of `kind` saved in `directory`; every tensor random (Gemma's
    norms around 0: they apply 1 + w)."""
    torch.manual_seed(0)
    config_cls, model_cls, fields, _ = FAMILIES[kind]
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**{**COMMON, **fields}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(-0.5, 0.5) if kind.startswith("gemma") else p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
            else:
                p.normal_(0, 0.3)
    model.eval().save_pretrained(directory)
    return model


def _prompts(seed, n=2):
    return np.random.default_rng(seed).integers(2, V, (n, T)).astype(np.int32)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """kind -> (its HF directory, the transformers model, lmsys params, ModelConfig), made once."""
    cache = {}

    def get(kind):
        if kind not in cache:
            src = tmp_path_factory.mktemp(kind)
            model = _hf_model(kind, src)
            cache[kind] = (src, model, *load_hf(src))
        return cache[kind]
    return get


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_import_serves_like_transformers(kind, imported, tmp_path):
    src, model, params, cfg = imported(kind)
    stored = _safetensors(src)
    for name, x in stored.items():  # every tensor random: a dropped or swapped one shows
        assert np.asarray(x, np.float32).std() > 0.05, name
    for key, value in FAMILIES[kind][3].items():
        assert getattr(cfg, key) == value, key

    # prompt log-probs through the engine (prefill chunks of 16 > the window: the second chunk
    # reads the first one's pages) equal transformers' on prompts 3 windows long
    engine = Engine(params, cfg, _engine_tokenizer(), EngineConfig(  # one shape per call kind
        max_slots=2, page_size=8, max_seq_len=64, prefill_chunk=16, num_pages=16,
        batch_invariant=True))
    prompts = _prompts(3)
    reqs = engine.generate([list(map(int, p)) for p in prompts],
                           GenerationOptions(max_tokens=0, prompt_logprobs=0))
    ref = torch.log_softmax(torch.tensor(_torch_logits(model, prompts)), -1).numpy()
    for row, req in enumerate(reqs):
        got = np.asarray(req.prompt_token_logprobs[1:])
        want = ref[row, np.arange(T - 1), prompts[row, 1:]]
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # 32 greedy tokens: decode attends to the window only (and its pages)
    assert _check_greedy(model, params, cfg, _prompts(5), engine) >= 32

    # HF -> lmsys -> HF: the same tensors, bit for bit, loadable by transformers
    out = save_hf(params, cfg, tmp_path / "out", base_config=json.loads((src / "config.json").read_text()))
    again = _safetensors(out)
    assert sorted(again) == sorted(stored)
    for name, x in stored.items():
        assert again[name].dtype == x.dtype and again[name].tobytes() == x.tobytes(), name
    _load_transformers(out)


def _trainer(cfg_model, mesh):
    cfg = tiny_config(mesh, seq_len=32, model=dataclasses.asdict(cfg_model))
    devices = jax.devices()[:1] if not mesh else None
    return cfg, Trainer(cfg, Rules(build_mesh(cfg.mesh, devices)))


def _train(params, cfg_model, mesh, steps=3):
    cfg, trainer = _trainer(cfg_model, mesh)
    state = trainer.init(cfg.seed)
    shardings = jax.tree.map(lambda x: x.sharding, state["params"])
    state = {**state, "params": jax.device_put(jax.device_get(params), shardings)}  # steps donate
    rng = np.random.default_rng(0)
    toks = rng.integers(0, V, (cfg.batch_size, cfg.seq_len + 1)).astype(np.int32)
    batch = {"tokens": toks[:, :-1], "targets": toks[:, 1:],
             "positions": np.broadcast_to(np.arange(cfg.seq_len, dtype=np.int32), (cfg.batch_size, cfg.seq_len)),
             "segment_ids": np.ones((cfg.batch_size, cfg.seq_len), np.int32),
             "loss_mask": np.ones((cfg.batch_size, cfg.seq_len), np.float32)}
    batch = jax.device_put(batch, trainer.batch_sharding)
    losses, norms = [], []
    for _ in range(steps):
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
    return losses, norms, jax.device_get(state["params"])


# windows, Gemma 3's block with mixed layers, MoE with a gated shared expert; the others' twins
# run with -m slow (the tests may add ~3 minutes to a cold CI run)
ALWAYS_TRAINED = ("mistral", "gemma3", "qwen2_moe")


@pytest.mark.parametrize("kind", [k if k in ALWAYS_TRAINED else pytest.param(k, marks=pytest.mark.slow)
                                  for k in FAMILIES])
def test_training_on_a_mesh_equals_one_device_and_exports(kind, imported, tmp_path):
    src, _, params, cfg = imported(kind)
    mesh = dict(data=1, fsdp=2, tensor=2, expert=2 if cfg.n_experts else 1)
    if not cfg.n_experts:
        mesh["data"] = 2
    ref_losses, ref_norms, _ = _train(params, cfg, {})
    losses, norms, trained = _train(params, cfg, mesh)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    # the import's gradient (later ones go through Adam, which scales tiny differences up)
    np.testing.assert_allclose(norms[0], ref_norms[0], rtol=1e-5)
    assert losses[-1] < losses[0]
    out = save_hf(trained, cfg, tmp_path / "trained", base_config=json.loads((src / "config.json").read_text()))
    exported = _load_transformers(out)
    tokens = _prompts(7)
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), tokens.shape)
    logits, _ = jax.jit(lambda p, t, s: llama.forward(p, t, s, cfg=cfg))(trained, tokens, positions)
    _assert_close(np.asarray(logits), _torch_logits(exported, tokens))


def test_moe_import_reads_each_expert_once_on_its_device(tmp_path, monkeypatch):
    """Mixtral on expert=4 x fsdp=2: every read of an expert tensor is one device block's slice
    of one expert, each expert's bytes are read once in all (not once per device or per
    replica), and the leaves land on their rule-table shardings with the plain import's values."""
    _hf_model("mixtral", tmp_path / "hf")
    cfg = load_hf(tmp_path / "hf")[1]
    rules = Rules(build_mesh(from_dict({"mesh": {"expert": 4, "fsdp": 2},
                                        "model": dataclasses.asdict(cfg)}).mesh))
    _, params, plain, reads = _import_counting_reads(tmp_path / "hf", cfg, rules, monkeypatch)
    specs = llama.param_specs(cfg)
    for leaf in ("w_gate", "w_up", "w_down"):
        array, shape = params["layers"][leaf], specs["layers"][leaf].shape
        assert array.sharding.spec[:2] == (None, "expert"), array.sharding.spec
        np.testing.assert_array_equal(np.asarray(array), np.asarray(plain["layers"][leaf]))
        pattern = hf_interop._hf_names(cfg)[("layers", leaf)][0]
        names = {pattern.format(i=i, e=e) for i in range(shape[0]) for e in range(shape[1])}
        seen = [(n, s, b) for n, s, b in reads if n in names]
        block = array.sharding.shard_shape(shape)
        assert block[1] == 1  # one expert per device block
        assert {s for _, s, _ in seen} == {hf_interop._hf_shape(block[2:], "transpose")}
        assert sum(b for *_, b in seen) == np.prod(shape) * 4  # every byte once (float32)
        assert {n for n, *_ in seen} == names
