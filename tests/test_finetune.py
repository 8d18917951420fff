"""Fine-tuning from imported weights: `init_from` an HF model directory starts the run from its
weights and tokenizer; chat data (JSONL messages) is rendered with the model's chat template with
the loss on assistant tokens only; a resumed fine-tune continues from its own checkpoint."""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lmsys.config import ConfigError, from_dict, load_config
from lmsys.data import build_chat_dataset, load_tokenizer
from lmsys.interop import load_hf
from lmsys.models import llama
from lmsys.train.loop import load_data, resolve_init_from, train
from lmsys.train.step import loss_sums

ROOT = Path(__file__).resolve().parents[1]
V = 64
WORDS = ["system", "user", "assistant", "hello", "hi", "how", "are", "you", "fine", "thanks", "what",
         "is", "two", "plus", "four", "be", "brief", "the", "answer", "good", "bye", "see", "later"]
SPECIALS = ["<|endoftext|>", "<|pad|>", "[UNK]", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHATS = [
    [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi how are you"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is two plus two"},
     {"role": "assistant", "content": "four"}],
    [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
     {"role": "user", "content": "how are you"}, {"role": "assistant", "content": "fine thanks"}],
    [{"role": "user", "content": "hello"}],  # nothing to train on: skipped
    [{"role": "user", "content": "good bye"}, {"role": "assistant", "content": "see you later"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is the answer"},
     {"role": "assistant", "content": "four"}],
]


def _write_tokenizer(directory: Path):
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIALS])
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "chat_template": CHATML}))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf") / "tiny_llama"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=0, eos_token_id=4,
                                      initializer_range=0.3)  # far from a random lmsys init's loss
    transformers.LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    _write_tokenizer(directory)
    return directory


def _write_chats(path: Path, repeat: int = 1) -> str:
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for _ in range(repeat) for m in CHATS))
    return str(path)


def _ft_config(hf_dir, tmp_path, **top):
    tree = {"init_from": str(hf_dir), "run_dir": str(tmp_path / "run"), "steps": 6, "batch_size": 8,
            "seq_len": 32, "optimizer": {"lr": 3e-3, "warmup_steps": 0, "weight_decay": 0.0},
            "checkpoint": {"async_save": False},
            "data": {"format": "chat", "source": _write_chats(tmp_path / "chats.jsonl", 2),
                     "cache_dir": str(tmp_path / "cache")}}
    tree.update(top)
    return from_dict(tree)


def test_chat_dataset_masks_exactly_assistant_tokens(hf_dir, tmp_path):
    tokenizer = load_tokenizer(str(hf_dir / "tokenizer.json"), V)
    ds = build_chat_dataset(_write_chats(tmp_path / "c.jsonl"), tokenizer, CHATML, seq_len=32, seed=0,
                            tokenizer_spec=str(hf_dir / "tokenizer.json"), cache_dir=str(tmp_path), shuffle=False)
    im_end = tokenizer.token_to_id("<|im_end|>")
    expected = [tokenizer.encode(m["content"], add_special_tokens=False).ids + [im_end]
                for chat in CHATS for m in chat if m["role"] == "assistant"]
    rows = [ds.row(i) for i in range(ds.num_rows)]
    trained = np.concatenate([r["targets"][r["loss_mask"] == 1] for r in rows])
    assert trained.tolist() == [t for ids in expected for t in ids]  # 1 exactly there, 0 elsewhere
    assistant_texts = [m["content"] for chat in CHATS for m in chat if m["role"] == "assistant"]
    decoded = tokenizer.decode(trained.tolist(), skip_special_tokens=True)
    assert decoded.split() == " ".join(assistant_texts).split()
    assert ds.num_documents == 5  # the conversation without an assistant message is dropped
    assert max(r["segment_ids"].max() for r in rows) >= 2  # several conversations per row
    for r in rows:
        seg, pos = r["segment_ids"], r["positions"]
        for s in range(1, seg.max() + 1):
            assert pos[seg == s].tolist() == list(range((seg == s).sum()))  # positions restart
        assert (r["loss_mask"][seg == 0] == 0).all()  # padding
        inside = (seg[1:] == seg[:-1]) & (seg[1:] > 0)
        np.testing.assert_array_equal(r["tokens"][1:][inside], r["targets"][:-1][inside])
    batch = ds.batch(0, 8)
    assert batch["tokens"].shape == (8, 32) and batch["loss_mask"].dtype == np.float32
    np.testing.assert_array_equal(ds.batch(0, 8)["tokens"], batch["tokens"])  # deterministic


def test_finetune_from_hf_starts_from_its_weights_and_resumes(hf_dir, tmp_path):
    cfg = _ft_config(hf_dir, tmp_path)
    first = train(cfg, progress=False, stop_at=3)
    assert [h["step"] for h in first] == [1, 2, 3]

    # the first step's loss is the imported model's loss on the first batch
    resolved = resolve_init_from(cfg)
    params, model = load_hf(hf_dir)
    batch = load_data(resolved).batch(0, cfg.batch_size)
    logits, _ = llama.forward(params, batch["tokens"], batch["positions"], batch["segment_ids"], cfg=model)
    total, n = loss_sums(logits, batch["targets"], batch["loss_mask"])
    np.testing.assert_allclose(first[0]["loss"], float(total / n), rtol=1e-4)
    assert float(n) > 0 and abs(first[0]["loss"] - np.log(V)) > 1.0  # not a fresh random init's loss

    saved = yaml.safe_load((Path(cfg.run_dir) / "config.yaml").read_text())
    assert saved["init_from"] == str(hf_dir.absolute()) == resolved.init_from
    assert saved["model"]["d_model"] == 64 and saved["model"]["vocab_size"] == V
    assert saved["data"]["tokenizer"] == str(hf_dir.absolute() / "tokenizer.json")

    # resume: the run's checkpoint wins; the source's weights are not read again (moved away)
    moved = tmp_path / "weights"
    moved.mkdir()
    for f in hf_dir.glob("*.safetensors"):
        shutil.move(str(f), moved / f.name)
    try:
        rest = train(cfg, progress=False)
    finally:
        for f in moved.iterdir():
            shutil.move(str(f), hf_dir / f.name)
    assert [h["step"] for h in rest] == [4, 5, 6]
    losses = [h["loss"] for h in first + rest]
    assert losses[-1] < losses[0] - 0.05, losses  # it learns the repeated conversations

    # an lmsys run directory is a source too: the next fine-tune starts where this one ended
    from lmsys.checkpoint import load_run

    cfg2 = _ft_config(cfg.run_dir, tmp_path, run_dir=str(tmp_path / "run2"), steps=1)
    _, run_params, meta = load_run(cfg.run_dir)
    assert meta["step"] == 6
    logits, _ = llama.forward(run_params, batch["tokens"], batch["positions"], batch["segment_ids"], cfg=model)
    total, n = loss_sums(logits, batch["targets"], batch["loss_mask"])
    (h,) = train(cfg2, progress=False)
    np.testing.assert_allclose(h["loss"], float(total / n), rtol=1e-4)
    own = Path(cfg.run_dir) / "tokenizer.json"  # the run's own copy, with its chat template beside it
    assert resolve_init_from(cfg2).data.tokenizer == str(own)
    assert own.read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    assert (Path(cfg.run_dir) / "tokenizer_config.json").read_text() == (hf_dir / "tokenizer_config.json").read_text()


def test_init_from_errors(hf_dir, tmp_path):
    with pytest.raises(ConfigError, match="init_from.*no such directory"):
        train(_ft_config(tmp_path / "missing", tmp_path), progress=False)
    with pytest.raises(ConfigError, match="'model.d_model' = 128.*init_from"):
        resolve_init_from(_ft_config(hf_dir, tmp_path, model={"d_model": 128}))
    with pytest.raises(ConfigError, match="data.format=chat needs the model's tokenizer"):
        from_dict({"data": {"format": "chat", "source": "x.jsonl"}})
    # a key equal to the source's is fine; run choices (attention_impl) are kept
    cfg = resolve_init_from(_ft_config(hf_dir, tmp_path, model={"d_model": 64, "attention_impl": "auto"}))
    assert (cfg.model.n_kv_heads, cfg.model.attention_impl, cfg.model.tie_embeddings) == (2, "auto", False)


def test_finetune_recipe_resolves(hf_dir, tmp_path):
    chats = _write_chats(tmp_path / "chats.jsonl")
    cfg = load_config(ROOT / "recipes/configs/finetune.yaml",
                      [f"init_from={hf_dir}", f"data.source={chats}", f"run_dir={tmp_path / 'run'}"])
    cfg = resolve_init_from(cfg)
    assert cfg.data.format == "chat" and cfg.model.n_layers == 2 and cfg.optimizer.lr <= 1e-4
    assert jax.tree.leaves(cfg.data.tokenizer)[0].endswith("tokenizer.json")
