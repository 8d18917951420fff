"""Hugging Face interop: tiny random transformers models imported into lmsys give the same
logits; lmsys models exported with save_hf load in transformers with the same logits; the
`lmsys convert` commands produce directories `lmsys generate` runs; unsupported configs fail
with a message naming the field."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lmsys.cli import main
from lmsys.config import from_dict
from lmsys.interop import ConversionError, config_from_hf, load_hf, save_hf
from lmsys.interop.hf import INDEX_FILE
from lmsys.models import llama
from lmsys.parallel import Rules, build_mesh

ROOT = Path(__file__).resolve().parents[1]
V, T = 96, 24
WORDS = ["def", "return", "import", "class", "self", "value", "None", "for", "in", "if"]
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8}
COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              initializer_range=0.3, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0)


def _write_tokenizer(directory):
    """A word-level tokenizer.json (+ tokenizer_config.json with a chat template) of < V tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "<|pad|>": 1, "[UNK]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
         "chat_template": CHAT_TEMPLATE}))


def _hf_model(kind, directory, torch_dtype=torch.float32, max_shard_size=None, tokenizer=False):
    torch.manual_seed(0)
    if kind == "llama":  # GQA, Llama-3 RoPE scaling, untied, head_dim != hidden/heads
        config = transformers.LlamaConfig(**COMMON, head_dim=8, rope_theta=500.0,
                                          rope_scaling=dict(LLAMA3_ROPE), tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(config)
    elif kind == "llama_tied":
        config = transformers.LlamaConfig(**COMMON, tie_word_embeddings=True)
        model = transformers.LlamaForCausalLM(config)
    elif kind == "qwen2":
        config = transformers.Qwen2Config(**COMMON, tie_word_embeddings=False, use_sliding_window=False)
        model = transformers.Qwen2ForCausalLM(config)
        with torch.no_grad():  # HF initializes biases to zero; make them count
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    elif kind == "mistral":
        config = transformers.MistralConfig(**COMMON, head_dim=16, sliding_window=None)
        model = transformers.MistralForCausalLM(config)
    else:
        raise AssertionError(kind)
    with torch.no_grad():  # non-trivial norm weights
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model = model.to(torch_dtype).eval()
    directory.mkdir(parents=True, exist_ok=True)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    if tokenizer:
        _write_tokenizer(directory)
    # the reference: read back in float32 (a model cast to bf16 and back has a rounded RoPE table)
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def _tokens(seed=0):
    tokens = np.random.default_rng(seed).integers(0, V, (2, T)).astype(np.int32)
    return tokens, np.broadcast_to(np.arange(T, dtype=np.int32), tokens.shape)


def _torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


def _lmsys_logits(params, cfg, tokens):
    tokens, positions = tokens
    logits, _ = jax.jit(lambda p, t, s: llama.forward(p, t, s, cfg=cfg))(params, tokens, positions)
    return np.asarray(logits)


@pytest.mark.parametrize("kind,dtype,shard", [
    ("llama", torch.float32, "30KB"),  # sharded with an index
    ("llama_tied", torch.float32, None),
    ("qwen2", torch.float32, None),
    ("mistral", torch.bfloat16, None),
])
def test_import_matches_transformers(tmp_path, kind, dtype, shard):
    model = _hf_model(kind, tmp_path / kind, dtype, shard)
    assert (tmp_path / kind / INDEX_FILE).is_file() == (shard is not None)
    params, cfg = load_hf(tmp_path / kind)
    assert cfg.tie_embeddings == (kind == "llama_tied") and cfg.qkv_bias == (kind == "qwen2")
    if kind == "llama":
        assert (cfg.rope_scaling_factor, cfg.rope_original_max_position, cfg.head_dim) == (8.0, 8, 8)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    tokens = _tokens()
    ref = _torch_logits(model, tokens[0])
    got = _lmsys_logits(params, cfg, tokens)
    assert np.abs(ref).max() > 0.5  # the comparison is not between near-zero numbers
    np.testing.assert_allclose(got, ref, atol=5e-4, rtol=1e-4)


@pytest.mark.parametrize("qkv_bias,tie,dtype", [(False, False, "float32"), (True, True, "float32"),
                                                (False, True, "bfloat16")])
def test_export_loads_in_transformers(tmp_path, qkv_bias, tie, dtype):
    cfg = from_dict({"model": dict(vocab_size=V, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                   head_dim=8, d_ff=96, rope_theta=500.0, norm_eps=1e-5,
                                   rope_scaling_factor=8.0, rope_original_max_position=8,
                                   qkv_bias=qkv_bias, tie_embeddings=tie, init_std=0.3)}).model
    params = llama.init(jax.random.key(1), cfg)
    if qkv_bias:
        params["layers"]["bq"] = 0.5 * jax.random.normal(jax.random.key(2), params["layers"]["bq"].shape)
    if dtype == "bfloat16":
        params = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)
    out = save_hf(params, cfg, tmp_path / "hf", dtype=dtype, max_shard_size=40_000)
    assert (out / INDEX_FILE).is_file()
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["architectures"] == ["Qwen2ForCausalLM" if qkv_bias else "LlamaForCausalLM"]
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = _tokens(1)
    np.testing.assert_allclose(_torch_logits(model, tokens[0]), _lmsys_logits(params, cfg, tokens),
                               atol=5e-4, rtol=1e-4)
    back, cfg2 = load_hf(out)
    assert cfg2 == cfg.__class__(**{**cfg.__dict__, "init_std": cfg2.init_std, "preset": ""})
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, back)


def test_import_onto_mesh(tmp_path):
    _hf_model("llama", tmp_path / "hf")
    cfg = config_from_hf(json.loads((tmp_path / "hf" / "config.json").read_text()))
    rules = Rules(build_mesh(from_dict({"mesh": {"fsdp": 4, "tensor": 2}}).mesh))
    shardings = rules.tree_shardings(llama.param_axes(cfg), llama.param_shapes(cfg))
    params, _ = load_hf(tmp_path / "hf", shardings)
    wq = params["layers"]["wq"]
    assert wq.sharding == shardings["layers"]["wq"]
    assert wq.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert wq.addressable_shards[0].data.shape == (2, 16, 2, 8)
    plain, _ = load_hf(tmp_path / "hf")
    np.testing.assert_array_equal(np.asarray(wq), np.asarray(plain["layers"]["wq"]))


def test_convert_and_generate(tmp_path, capsys):
    model = _hf_model("llama", tmp_path / "hf", tokenizer=True)
    out = tmp_path / "lm"
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(out)]) == 0
    assert {"config.yaml", "tokenizer.json", "tokenizer_config.json", "checkpoints"} <= {
        p.name for p in out.iterdir()}
    for model_dir in (out, tmp_path / "hf"):  # the converted dir, and the HF dir read directly
        capsys.readouterr()
        assert main(["generate", str(model_dir), "--prompt", "def return", "--max-tokens", "4",
                     "--max-seq-len", "32", "--num-pages", "8"]) == 0
        assert capsys.readouterr().out.startswith("def return")

    from lmsys.serve.load import load_model
    from lmsys.serve.server import load_chat_template

    loaded = load_model(out)
    assert load_chat_template(loaded.config.data.tokenizer) == CHAT_TEMPLATE
    tokens = _tokens(2)
    np.testing.assert_allclose(_lmsys_logits(loaded.params, loaded.config.model, tokens),
                               _torch_logits(model, tokens[0]), atol=5e-4, rtol=1e-4)

    hf2 = tmp_path / "hf2"
    assert main(["convert", "to-hf", str(out), str(hf2), "--dtype", "float32"]) == 0
    assert json.loads((hf2 / "config.json").read_text())["max_position_embeddings"] == 256
    assert (hf2 / "tokenizer.json").is_file() and (hf2 / "tokenizer_config.json").is_file()
    model2 = transformers.AutoModelForCausalLM.from_pretrained(hf2, dtype=torch.float32).eval()
    np.testing.assert_allclose(_torch_logits(model2, tokens[0]), _torch_logits(model, tokens[0]),
                               atol=1e-6)
    capsys.readouterr()
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(out)]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err

    moved = tmp_path / "moved"  # config.yaml's absolute tokenizer path is gone: use the copy inside
    out.rename(moved)
    assert load_model(moved).config.data.tokenizer == str(moved / "tokenizer.json")


def test_training_run_to_hf(tmp_path):
    """A run trained with the builtin tokenizer exports with that tokenizer's tokenizer.json."""
    from common import write_corpus

    from lmsys.checkpoint import Checkpointer
    from lmsys.config import load_config
    from lmsys.data import load_tokenizer

    run = tmp_path / "run"
    source = write_corpus(tmp_path / "corpus", n_docs=10)
    assert main(["train", str(ROOT / "recipes/configs/tiny.yaml"), "steps=2", f"run_dir={run}", f"data.source={source}",
                 f"data.cache_dir={tmp_path / 'cache'}", "model.vocab_size=300", "model.d_model=64",
                 "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=16",
                 "model.d_ff=128", "seq_len=32", "checkpoint.async_save=false", "--no-progress"]) == 0
    assert main(["convert", "to-hf", str(run), str(tmp_path / "hf")]) == 0
    cfg = load_config(run / "config.yaml")
    ckpt = Checkpointer(run / "checkpoints")
    params, _ = ckpt.restore_params(cfg.model)
    ckpt.close()
    ours = load_tokenizer("builtin", 300, source=source, cache_dir=str(tmp_path / "cache"))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "def return self value"
    ids = ours.encode(text).ids
    assert theirs(text).input_ids == ids
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tokens = np.asarray([ids], np.int32)
    np.testing.assert_allclose(
        _torch_logits(model, tokens),
        _lmsys_logits(params, cfg.model, (tokens, np.arange(len(ids), dtype=np.int32)[None])),
        atol=5e-4, rtol=1e-4)


BASE = dict(model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=32,
            num_hidden_layers=1, num_attention_heads=2)


@pytest.mark.parametrize("change,match", [
    (dict(model_type="qwen3"), "model_type qwen3 is unsupported"),
    (dict(model_type="gpt2"), "model_type 'gpt2' is unsupported"),
    (dict(attention_bias=True), "attention_bias.*o_proj bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_type 'yarn'"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), "rope_type 'linear'"),
    (dict(model_type="mistral", sliding_window=64, max_position_embeddings=128), "sliding_window=64"),
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=64), "use_sliding_window"),
    (dict(num_key_value_heads=3), "model.n_heads.*n_kv_heads"),
])
def test_unsupported_configs_fail_clearly(change, match):
    with pytest.raises(ConversionError, match=match):
        config_from_hf({**BASE, **change})


def test_supported_config_variants():
    cfg = config_from_hf({**BASE, "model_type": "mistral", "sliding_window": 4096,
                          "max_position_embeddings": 4096, "rope_theta": 1e6})
    assert (cfg.head_dim, cfg.n_kv_heads, cfg.rope_theta, cfg.tie_embeddings) == (8, 2, 1e6, False)
    v5 = config_from_hf({**BASE, "rope_parameters": {**LLAMA3_ROPE, "rope_theta": 5e5},
                         "tie_word_embeddings": True})
    assert (v5.rope_theta, v5.rope_scaling_factor, v5.tie_embeddings) == (5e5, 8.0, True)


def test_missing_files_and_bad_shapes(tmp_path):
    with pytest.raises(ConversionError, match="no config.json"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(BASE))
    with pytest.raises(ConversionError, match="no \\*.safetensors"):
        load_hf(tmp_path)
    _hf_model("llama_tied", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "intermediate_size": 80}))
    with pytest.raises(ConversionError, match="mlp.gate_proj.weight has shape \\[96, 64\\], expected \\[80, 64\\]"):
        load_hf(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    with pytest.raises(ConversionError, match="lm_head.weight is missing"):
        load_hf(tmp_path / "hf")
