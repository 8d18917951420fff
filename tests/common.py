"""Small shared pieces for tests: a tiny model config, synthetic batches, a subprocess's
environment."""

import os

import jax
import numpy as np

from lmsys.config import from_dict

# heads 8 and kv_heads 4: KV heads shard over tensor=2 and replicate over tensor=8.
TINY_MODEL = dict(preset="tiny", vocab_size=256, d_model=64, n_layers=2, n_heads=8, n_kv_heads=4,
                  head_dim=16, d_ff=128, qkv_bias=True)


def tiny_config(mesh: dict | None = None, **top):
    tree = {"model": dict(TINY_MODEL), "mesh": mesh or {}, "batch_size": 8, "seq_len": 32,
            "optimizer": {"lr": 1e-2, "warmup_steps": 1}, "checkpoint": {"async_save": False}}
    for key, value in top.items():
        if isinstance(value, dict):
            tree.setdefault(key, {}).update(value)
        else:
            tree[key] = value
    return from_dict(tree)


def synthetic_batch(cfg, seed: int = 0, sharding=None) -> dict:
    """Random tokens packed as two documents per row (segment ids 1 and 2), last 3 positions
    padding (loss mask 0)."""
    rng = np.random.default_rng(seed)
    B, T = cfg.batch_size, cfg.seq_len
    toks = rng.integers(0, cfg.model.vocab_size, (B, T + 1))
    half = T // 2
    seg = np.where(np.arange(T) < half, 1, 2)[None].repeat(B, 0)
    pos = np.where(np.arange(T) < half, np.arange(T), np.arange(T) - half)[None].repeat(B, 0)
    mask = np.ones((B, T), np.float32)
    mask[:, -3:] = 0
    batch = {"tokens": toks[:, :-1], "targets": toks[:, 1:], "positions": pos,
             "segment_ids": seg, "loss_mask": mask}
    batch = {k: np.asarray(v, np.float32 if k == "loss_mask" else np.int32) for k, v in batch.items()}
    if sharding is not None:
        batch = {k: jax.device_put(v, sharding) for k, v in batch.items()}
    return batch


def write_corpus(directory, n_docs: int = 40, seed: int = 0):
    """A small text corpus with repeated structure (so a model can learn from it)."""
    rng = np.random.default_rng(seed)
    words = ["def", "return", "import", "class", "self", "value", "None", "for", "in", "if"]
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        lines = [" ".join(rng.choice(words, 6)) for _ in range(20)]
        (directory / f"doc{i:03d}.txt").write_text("\n".join(lines) + "\n")
    return str(directory)


def subprocess_env(devices: int = 0, drop: tuple[str, ...] = ()) -> dict[str, str]:
    """This environment for a child process with `devices` emulated CPU devices (0: one plain
    CPU device, as on a laptop), keeping conftest's other XLA flags (the quick compile, the
    collective timeout) and its compilation cache; the variables in `drop` left out."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count=")]
    if devices:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "XLA_FLAGS": " ".join(flags)}


def tiny_served_model(root, vocab: int = 512, specials: tuple[str, ...] = ()):
    """(model config, params on the first device, builtin tokenizer trained on `write_corpus`
    under `root`, with `specials` added as special tokens): the random tiny model the serving
    tests share."""
    from lmsys.data import load_tokenizer
    from lmsys.models import llama

    tok = load_tokenizer("builtin", vocab, source=write_corpus(root / "corpus"), cache_dir=str(root))
    tok.add_special_tokens(list(specials))
    assert tok.get_vocab_size() <= vocab, "the specials do not fit the model's vocabulary"
    cfg = tiny_config(model={"vocab_size": vocab}).model
    return cfg, jax.device_put(llama.init(jax.random.key(0), cfg), jax.devices()[0]), tok
