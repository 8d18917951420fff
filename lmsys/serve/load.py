"""Loading a model for serving: parameters, model config and tokenizer from a training run dir,
the output of `lmsys convert from-hf`, or a Hugging Face model directory."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from lmsys.checkpoint import CheckpointError, load_run
from lmsys.config import Config


@dataclass
class LoadedModel:
    name: str
    config: Config
    params: dict
    tokenizer: object
    eos_token_id: int | None
    step: int


def load_model(path: str | Path, rules=None, step: int | None = None,
               registry_uri: str | None = None) -> LoadedModel:
    """A training run directory (with `config.yaml` and `checkpoints/`, e.g. written by `lmsys
    train` or `lmsys convert from-hf`): the latest (or given) checkpoint's parameters, sharded by
    `rules` when given, and the run's tokenizer. A Hugging Face model directory (config.json +
    *.safetensors) is read directly (step 0). A registered model, `models:/NAME@ALIAS` or
    `models:/NAME/VERSION` (registry: `registry_uri`, else $LMSYS_REGISTRY_URI or the local one),
    loads its recorded checkpoint once its files still match the registered sha256."""
    from lmsys.data import eos_id, tokenizer_for
    from lmsys.interop.hf import is_hf_dir

    if isinstance(path, str) and path.startswith("models:/"):
        return _load_registered(path, rules, step, registry_uri)
    run_dir = Path(path)
    if not (run_dir / "config.yaml").is_file() and is_hf_dir(run_dir):
        return _load_hf_dir(run_dir, rules)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"{run_dir} is not a training run directory (no config.yaml) nor a "
                              f"Hugging Face model directory (config.json + *.safetensors); pass "
                              f"the run_dir of an `lmsys train` run")
    cfg, params, meta = load_run(run_dir, rules, step)
    tok_spec = cfg.data.tokenizer
    if (tok_spec != "builtin" and not Path(tok_spec).expanduser().exists()
            and (run_dir / "tokenizer.json").is_file()):
        cfg.data.tokenizer = str(run_dir / "tokenizer.json")  # the directory was moved
    tokenizer = tokenizer_for(cfg.data, cfg.model.vocab_size)
    return LoadedModel(run_dir.name, cfg, params, tokenizer, eos_id(tokenizer), int(meta["step"]))


def _load_registered(ref: str, rules, step: int | None, registry_uri: str | None) -> LoadedModel:
    """A registered model version: resolve, verify the checkpoint's hash, load its run dir."""
    from lmsys.interop.registry import RegistryError, resolve_verified

    resolved = resolve_verified(ref, registry_uri)
    if step is not None and step != resolved.step:
        raise RegistryError(f"{ref} is {resolved} at step {resolved.step}, not step {step}")
    model = load_model(resolved.run_dir, rules, resolved.step)
    model.name = resolved.name
    return model


def _load_hf_dir(hf_dir: Path, rules) -> LoadedModel:
    """A Hugging Face model directory: parameters via lmsys.interop, its tokenizer.json."""
    from lmsys.config import from_dict
    from lmsys.data import eos_id, load_tokenizer
    from lmsys.interop.hf import config_from_hf, load_hf, read_hf_config
    from lmsys.models import llama

    hf_config = read_hf_config(hf_dir)
    model_cfg = config_from_hf(hf_config)
    shardings = None
    if rules is not None:
        shardings = rules.tree_shardings(llama.param_axes(model_cfg), llama.param_shapes(model_cfg))
    params, model_cfg = load_hf(hf_dir, shardings)
    cfg = from_dict({"model": dataclasses.asdict(model_cfg), "data": {"tokenizer": str(hf_dir)}})
    tokenizer = load_tokenizer(str(hf_dir), model_cfg.vocab_size)
    eos = hf_config.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    if eos is None:
        eos = eos_id(tokenizer)
    return LoadedModel(hf_dir.absolute().name, cfg, params, tokenizer, int(eos), 0)
