"""Loading a trained model for serving: parameters, model config and tokenizer from a run dir."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmsys.checkpoint import CheckpointError, Checkpointer
from lmsys.config import Config, load_config


@dataclass
class LoadedModel:
    name: str
    config: Config
    params: dict
    tokenizer: object
    eos_token_id: int | None
    step: int


def load_model(path: str | Path, rules=None, step: int | None = None) -> LoadedModel:
    """A training run directory (with `config.yaml` and `checkpoints/`): the latest (or given)
    checkpoint's parameters, sharded by `rules` when given, and the run's tokenizer."""
    from lmsys.data import eos_id, load_tokenizer
    from lmsys.models import llama

    run_dir = Path(path)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir} is not a training run directory (no config.yaml); "
                              f"pass the run_dir of an `lmsys train` run")
    if not (run_dir / "checkpoints").is_dir():
        raise CheckpointError(f"{run_dir} has no checkpoints/ yet; train it first")
    cfg = load_config(run_dir / "config.yaml")
    shardings = None
    if rules is not None:
        shardings = rules.tree_shardings(llama.param_axes(cfg.model), llama.param_shapes(cfg.model))
    ckpt = Checkpointer(run_dir / "checkpoints")
    try:
        params, meta = ckpt.restore_params(cfg.model, shardings, step)
    finally:
        ckpt.close()
    d = cfg.data
    tokenizer = load_tokenizer(d.tokenizer, cfg.model.vocab_size, source=d.source,
                               cache_dir=d.cache_dir or None, max_documents=d.max_documents,
                               text_field=d.text_field)
    return LoadedModel(run_dir.name, cfg, params, tokenizer, eos_id(tokenizer), int(meta["step"]))
