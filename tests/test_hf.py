"""Hugging Face interop: tiny transformers models of every supported family, every tensor
randomized, imported into lmsys give the same logits and the same greedy generations through the
serving engine; HF -> lmsys -> HF and lmsys -> HF -> lmsys are bitwise round trips whose HF side
loads in transformers without missing/unexpected weights; a sharded import reads per-device
slices only; the `lmsys convert` commands produce directories `lmsys generate` runs; unsupported
configs, missing files and bad shapes fail with a message naming them."""

import dataclasses
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors import safe_open

from lmsys.cli import main
from lmsys.config import from_dict
from lmsys.interop import ConversionError, config_from_hf, load_hf, save_hf
from lmsys.interop import hf as hf_interop
from lmsys.interop.hf import INDEX_FILE
from lmsys.models import llama
from lmsys.parallel import Rules, build_mesh
from lmsys.serve.engine import Engine, EngineConfig
from lmsys.serve.scheduler import GenerationOptions

ROOT = Path(__file__).resolve().parents[1]
V, T, NEW = 96, 24, 32
WORDS = ["def", "return", "import", "class", "self", "value", "None", "for", "in", "if"]
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"

# original_max_position_embeddings 8 << the prompts (24 tokens + 32 generated): the scaled band
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8}
COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              initializer_range=0.3, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0)
FAMILIES = {  # name: (config class, model class, config fields beside COMMON)
    "llama2": ("LlamaConfig", "LlamaForCausalLM",  # multi-head attention, no RoPE scaling
               dict(num_key_value_heads=4, rope_theta=10000.0, tie_word_embeddings=False)),
    "llama3": ("LlamaConfig", "LlamaForCausalLM",  # GQA, Llama-3 RoPE, head_dim != hidden/heads
               dict(head_dim=8, rope_theta=500.0, rope_scaling=LLAMA3_ROPE, tie_word_embeddings=False)),
    "llama3.2": ("LlamaConfig", "LlamaForCausalLM",  # Llama-3 RoPE and tied embeddings
                 dict(rope_theta=500.0, rope_scaling=LLAMA3_ROPE, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(head_dim=16, sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",  # qkv bias
              dict(tie_word_embeddings=False, use_sliding_window=False)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",  # q/k norm, explicit head_dim, tied
              dict(head_dim=8, tie_word_embeddings=True, use_sliding_window=False)),
}


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
    """A random transformers model of family `kind`, saved with save_pretrained; every tensor is
    random (HF's init would leave norms at 1 and biases at 0). Returns it read back in fp32."""
    torch.manual_seed(0)
    config_cls, model_cls, fields = FAMILIES[kind]
    config = getattr(transformers, config_cls)(**{**COMMON, **fields})
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
            else:
                p.normal_(0, 0.3)
    model = model.to(torch_dtype).eval()
    directory.mkdir(parents=True, exist_ok=True)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    if tokenizer:
        _write_tokenizer(directory)
    # the reference: read back in float32 (a model cast to bf16 and back has a rounded RoPE table)
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def _safetensors(directory) -> dict[str, np.ndarray]:
    """Every tensor of an HF directory (single file or sharded), by name, as stored."""
    out = {}
    for path in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _load_transformers(directory):
    """transformers' model of `directory`, asserting it reported no missing, unexpected or
    mismatched weights (neither in its loading info nor in its log)."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch.float32, output_loading_info=True)
    finally:
        logger.removeHandler(handler)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    log = "\n".join(r.getMessage() for r in records)
    for word in ("MISSING", "UNEXPECTED", "MISMATCH", "newly initialized", "not used"):
        assert word.lower() not in log.lower(), log
    return model.eval()


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


def _assert_close(got, ref, tol=1e-4):
    """Norm-wise relative error <= tol, on logits that are not near zero."""
    assert np.abs(ref).max() > 0.5
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert err <= tol, err


def _engine_tokenizer():
    from tokenizers import Tokenizer, models

    return Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t2"))


def _check_greedy(model, params, cfg, prompts, engine=None):
    """32 greedy tokens from lmsys's serving engine (default: a new one) equal transformers'
    generate(do_sample=False), or the first difference is at a near-tie (top-2 logit gap < 1e-4).
    Returns tokens matched."""
    engine = engine or Engine(params, cfg, _engine_tokenizer(), EngineConfig(
        max_slots=len(prompts), page_size=8, max_seq_len=64, prefill_chunk=32, num_pages=16))
    reqs = engine.generate([list(map(int, p)) for p in prompts],
                           GenerationOptions(max_tokens=NEW, ignore_eos=True))
    model.generation_config.eos_token_id = None  # like ignore_eos: never stop early
    model.generation_config.pad_token_id = 1
    with torch.no_grad():
        out = model.generate(torch.tensor(np.asarray(prompts), dtype=torch.long),
                             attention_mask=torch.ones(np.shape(prompts), dtype=torch.long),
                             do_sample=False, max_new_tokens=NEW, output_logits=True,
                             return_dict_in_generate=True)
    theirs = out.sequences[:, len(prompts[0]):].numpy()
    assert theirs.shape == (len(prompts), NEW)
    matched = 0
    for row, req in enumerate(reqs):
        assert len(req.generated) == NEW
        for i in range(NEW):
            if req.generated[i] != theirs[row, i]:
                top2 = np.sort(out.logits[i][row].float().numpy())[-2:]
                assert top2[1] - top2[0] < 1e-4, (row, i, req.generated[i], int(theirs[row, i]))
                break
            matched += 1
    return matched


@pytest.mark.parametrize("kind,dtype,shard", [
    ("llama2", torch.float32, None),
    ("llama3", torch.float32, "30KB"),  # sharded with an index
    ("llama3.2", torch.float32, None),
    ("mistral", torch.bfloat16, None),
    ("qwen2", torch.float32, None),
    ("qwen3", torch.float32, None),
])
def test_family_matches_transformers(tmp_path, kind, dtype, shard):
    src = tmp_path / kind
    model = _hf_model(kind, src, dtype, shard)
    assert (src / INDEX_FILE).is_file() == (shard is not None)
    stored = _safetensors(src)
    for name, x in stored.items():  # every tensor random: a dropped or swapped one shows
        assert np.asarray(x, np.float32).std() > 0.05, name
    params, cfg = load_hf(src)
    assert (cfg.tie_embeddings, cfg.qkv_bias, cfg.qk_norm) == (
        FAMILIES[kind][2].get("tie_word_embeddings", False), kind == "qwen2", kind == "qwen3")
    if kind.startswith("llama3"):
        assert (cfg.rope_scaling_factor, cfg.rope_original_max_position) == (8.0, 8)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))

    tokens = _tokens()
    _assert_close(_lmsys_logits(params, cfg, tokens), _torch_logits(model, tokens[0]))
    assert _check_greedy(model, params, cfg, _tokens(5)[0]) >= NEW  # at least one row all equal

    # HF -> lmsys -> HF: the same tensors, bit for bit, in the source's dtype
    out = save_hf(params, cfg, tmp_path / "out", dtype="bfloat16" if dtype == torch.bfloat16 else "float32",
                  base_config=json.loads((src / "config.json").read_text()))
    again = _safetensors(out)
    assert sorted(again) == sorted(stored)
    for name, x in stored.items():
        assert again[name].dtype == x.dtype and again[name].tobytes() == x.tobytes(), name
    _load_transformers(out)


@pytest.mark.parametrize("qkv_bias,qk_norm,tie,dtype", [
    (False, False, False, "float32"), (True, False, True, "float32"), (False, True, True, "float32"),
    (False, False, True, "bfloat16")])
def test_export_loads_in_transformers(tmp_path, qkv_bias, qk_norm, tie, dtype):
    cfg = from_dict({"model": dict(vocab_size=V, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                   head_dim=8, d_ff=96, rope_theta=500.0, norm_eps=1e-5,
                                   rope_scaling_factor=8.0, rope_original_max_position=8,
                                   qkv_bias=qkv_bias, qk_norm=qk_norm, tie_embeddings=tie,
                                   init_std=0.3)}).model
    specs = jax.tree.leaves(llama.param_specs(cfg), is_leaf=lambda x: isinstance(x, llama.ParamSpec))
    params = llama.init(jax.random.key(1), cfg)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    randomized = [x if s.init == "normal" else  # norms near 1, biases around 0, all distinct
                  (1.0 if s.init == "ones" else 0.0) + 0.5 * jax.random.uniform(k, x.shape, minval=-1)
                  for x, s, k in zip(leaves, specs, keys)]
    params = jax.tree.unflatten(treedef, randomized)
    if dtype == "bfloat16":
        params = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)
    out = save_hf(params, cfg, tmp_path / "hf", dtype=dtype, max_shard_size=40_000)
    assert (out / INDEX_FILE).is_file()
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["architectures"] == [
        "Qwen3ForCausalLM" if qk_norm else "Qwen2ForCausalLM" if qkv_bias else "LlamaForCausalLM"]
    model = _load_transformers(out)
    tokens = _tokens(1)
    _assert_close(_lmsys_logits(params, cfg, tokens), _torch_logits(model, tokens[0]))
    back, cfg2 = load_hf(out)  # lmsys -> HF -> lmsys: bit for bit
    assert cfg2 == cfg.__class__(**{**cfg.__dict__, "init_std": cfg2.init_std, "preset": ""})
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, back)


def _import_counting_reads(hf_dir, cfg, rules, monkeypatch):
    """(shardings, params imported onto them, params imported onto one device, the reads of the
    sharded import as (tensor name, shape, bytes))."""
    shardings = rules.tree_shardings(llama.param_axes(cfg), llama.param_shapes(cfg))
    reads = []
    real_read = hf_interop._TensorReader.read

    def read(self, name, index):
        x = real_read(self, name, index)
        reads.append((name, x.shape, x.nbytes))
        return x

    monkeypatch.setattr(hf_interop._TensorReader, "read", read)
    params, _ = load_hf(hf_dir, shardings)
    monkeypatch.undo()
    return shardings, params, load_hf(hf_dir)[0], reads


def test_sharded_import_reads_only_slices(tmp_path, monkeypatch):
    """On fsdp=4 x tensor=2, every leaf lands on its rule-table sharding, and each read of a
    sharded leaf's HF tensor is exactly one device block's slice, never the whole tensor."""
    _hf_model("llama3", tmp_path / "hf", max_shard_size="30KB")
    cfg = config_from_hf(json.loads((tmp_path / "hf" / "config.json").read_text()))
    rules = Rules(build_mesh(from_dict({"mesh": {"fsdp": 4, "tensor": 2}}).mesh))
    shardings, params, plain, reads = _import_counting_reads(tmp_path / "hf", cfg, rules, monkeypatch)
    reads = [(name, shape) for name, shape, _ in reads]
    specs = llama.param_specs(cfg)
    split = 0
    for path, (pattern, kind) in hf_interop._hf_names(cfg).items():
        leaf, sharding = hf_interop._get(params, path), hf_interop._get(shardings, path)
        assert leaf.sharding == sharding, path
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(hf_interop._get(plain, path)))
        stacked = path[0] == "layers"
        shape = hf_interop._get(specs, path).shape
        full = hf_interop._hf_shape(shape[1:] if stacked else shape, kind)
        block = sharding.shard_shape(shape)
        block_hf = hf_interop._hf_shape(block[1:] if stacked else block, kind)
        names = {pattern.format(i=i) for i in range(cfg.n_layers)} if stacked else {pattern}
        seen = [s for n, s in reads if n in names]
        assert seen and len(seen) % len(names) == 0, path
        if sharding.is_fully_replicated:
            assert set(seen) == {full}, path  # read once, not once per device
            assert len(seen) == len(names), path
        else:
            split += 1
            assert set(seen) == {block_hf} and block_hf != full, (path, set(seen), block_hf)
            blocks = {tuple(s.indices(n)[:2] for s, n in zip(index, shape))
                      for index in sharding.devices_indices_map(shape).values()}
            assert len(seen) == len(names) * len(blocks), path  # each distinct block read once
    assert split >= 8  # embed, unembed and the 7 projection matrices are split
    wq = params["layers"]["wq"]
    assert wq.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert wq.addressable_shards[0].data.shape == (2, 16, 2, 8)


def test_convert_and_generate(tmp_path, capsys):
    model = _hf_model("llama3", tmp_path / "hf", tokenizer=True)
    out = tmp_path / "lm"
    assert main(["convert", "from-hf", str(tmp_path / "hf"), str(out)]) == 0
    assert {"config.yaml", "tokenizer.json", "tokenizer_config.json", "checkpoints"} <= {
        p.name for p in out.iterdir()}
    texts = []
    for model_dir in (out, tmp_path / "hf"):  # the converted dir, and the HF dir read directly
        capsys.readouterr()
        assert main(["generate", str(model_dir), "--prompt", "def return", "--max-tokens", "4",
                     "--max-seq-len", "32", "--num-pages", "8"]) == 0
        texts.append(capsys.readouterr().out)
        assert texts[-1].startswith("def return")
    # served on a data=2 x tensor=2 mesh: the same greedy text
    assert main(["generate", str(out), "--prompt", "def return", "--max-tokens", "4",
                 "--max-seq-len", "32", "--num-pages", "8", "--data-parallel", "2",
                 "--tensor-parallel", "2"]) == 0
    assert capsys.readouterr().out == texts[0]
    # speculative decoding with a draft model (the HF directory of the same model): the same text
    assert main(["generate", str(out), "--prompt", "def return", "--max-tokens", "4", "--max-seq-len", "32",
                 "--num-pages", "8", "--speculative", "draft", "--draft-model", str(tmp_path / "hf")]) == 0
    assert capsys.readouterr().out == texts[0]
    assert main(["generate", str(out), "--prompt", "x", "--speculative", "draft"]) == 2
    assert "--speculative draft goes with --draft-model" in capsys.readouterr().err
    assert main(["generate", str(out), "--prompt", "x", "--data-parallel", "4",
                 "--tensor-parallel", "4"]) == 2
    assert "needs 16 devices; this machine has 8" in capsys.readouterr().err
    assert main(["serve", str(out), "--max-slots", "3", "--data-parallel", "2"]) == 2
    assert "--max-slots 3 must be a multiple of --data-parallel 2" in capsys.readouterr().err

    from lmsys.checkpoint import load_model
    from lmsys.data.chat_template import load_chat_template

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
    (dict(model_type="gemma3"), "model_type 'gemma3' is unsupported"),  # the multimodal wrapper
    (dict(model_type="qwen3_moe", num_experts=4, moe_intermediate_size=8, mlp_only_layers=[0]),
     "mlp_only_layers"),
    (dict(model_type="mixtral", num_local_experts=4, router_jitter_noise=0.1), "router_jitter_noise"),
    (dict(model_type="gemma2", sliding_window=4, use_bidirectional_attention=True),
     "use_bidirectional_attention"),
    (dict(model_type="gemma2", num_hidden_layers=3, sliding_window=4,
          layer_types=["full_attention", "sliding_attention", "sliding_attention"]), "not this pattern"),
    (dict(model_type="qwen3", attention_bias=True), "attention_bias.*no attention output bias"),
    (dict(model_type="qwen3", use_sliding_window=True, sliding_window=64), "use_sliding_window"),
    (dict(model_type="gpt2"), "model_type 'gpt2' is unsupported"),
    (dict(attention_bias=True), "attention_bias.*o_proj bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_type 'yarn'"),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}), "rope_type 'dynamic'"),
    (dict(model_type="mistral", sliding_window=0, layer_types=["sliding_attention"]), "positive window"),
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
    assert cfg.sliding_window == 0  # a window as long as the context is none
    windowed = config_from_hf({**BASE, "model_type": "mistral", "sliding_window": 64,
                               "max_position_embeddings": 128})
    assert (windowed.sliding_window, windowed.global_every) == (64, 0)
    v5 = config_from_hf({**BASE, "rope_parameters": {**LLAMA3_ROPE, "rope_theta": 5e5},
                         "tie_word_embeddings": True})
    assert (v5.rope_theta, v5.rope_scaling_factor, v5.tie_embeddings) == (5e5, 8.0, True)


def test_supported_qwen3_config():
    cfg = config_from_hf({**BASE, "model_type": "qwen3", "head_dim": 16, "tie_word_embeddings": True})
    assert (cfg.qk_norm, cfg.qkv_bias, cfg.head_dim, cfg.tie_embeddings) == (True, False, 16, True)


def test_export_refuses_what_hf_cannot_express(tmp_path):
    cfg = from_dict({"model": dict(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2,
                                   head_dim=8, d_ff=32, qkv_bias=True, qk_norm=True)}).model
    with pytest.raises(ConversionError, match="qkv_bias with model.qk_norm has no Hugging Face"):
        save_hf(llama.init(jax.random.key(0), cfg), cfg, tmp_path / "hf")
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    moe = dataclasses.replace(cfg, qkv_bias=False, qk_norm=False, n_experts=4, experts_per_token=2,
                              n_shared_experts=2)
    with pytest.raises(ConversionError, match="model.n_experts=4 with n_shared_experts=2.*no Hugging Face MoE"):
        save_hf(llama.init(jax.random.key(0), moe), moe, tmp_path / "hf")
    assert not (tmp_path / "hf" / "model.safetensors").exists()


def test_missing_files_and_bad_shapes(tmp_path):
    with pytest.raises(ConversionError, match="no config.json"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(BASE))
    with pytest.raises(ConversionError, match="no \\*.safetensors"):
        load_hf(tmp_path)
    hf = tmp_path / "hf"
    _hf_model("llama3.2", hf)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "intermediate_size": 80}))
    with pytest.raises(ConversionError, match="mlp.gate_proj.weight has shape \\[96, 64\\], expected \\[80, 64\\]"):
        load_hf(hf)
    (hf / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    with pytest.raises(ConversionError, match="lm_head.weight is missing"):
        load_hf(hf)
    (hf / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    with pytest.raises(ConversionError, match="tensors model.layers.1.input_layernorm.weight, .* have no "
                                              "place in the lmsys model"):
        load_hf(hf)
    (hf / "config.json").write_text(json.dumps(config))

    from safetensors.numpy import save_file

    tensors = _safetensors(hf)  # a sharded copy whose index names a file that is not there
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text(json.dumps(config))
    names = sorted(tensors)
    save_file({n: tensors[n] for n in names[:5]}, str(sharded / "model-00001-of-00002.safetensors"))
    weight_map = {n: f"model-0000{1 + (i >= 5)}-of-00002.safetensors" for i, n in enumerate(names)}
    (sharded / INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ConversionError, match="names model-00002-of-00002.safetensors, which is missing"):
        load_hf(sharded)
    # the transformers check above can fail: the same copy with one tensor dropped is reported
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, str(tmp_path / "broken.safetensors"), metadata={"format": "pt"})
    for f in sharded.iterdir():
        f.unlink()
    (tmp_path / "broken.safetensors").rename(sharded / "model.safetensors")
    (sharded / "config.json").write_text(json.dumps(config))
    with pytest.raises(AssertionError, match="up_proj"):
        _load_transformers(sharded)
