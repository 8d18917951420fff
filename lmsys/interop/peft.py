"""PEFT LoRA adapter directories in and out (adapter_config.json + adapter_model.safetensors),
the format `peft.PeftModel.from_pretrained(base, dir)` loads; no peft or PyTorch needed here.

    save_peft(adapters, cfg, "out/adapter", base="path/to/hf_model")   # a LoRA run's adapters
    adapters, lora_cfg, base = load_peft("out/adapter", model)          # lmsys.models.lora tree

PEFT keeps, per adapted Linear, lora_A.weight [r, in] and lora_B.weight [out, r] with
y = x W^T + (alpha / r) x A^T B^T; lmsys keeps A [in..., r] and B [r, out...] in the layout of
the base weight (heads split out, lmsys.interop.hf), stacked over the layers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lmsys.interop.hf import _hf_names
from lmsys.interop.hf_config import ConversionError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
# PEFT options lmsys's adapters do not have; an adapter that sets one is refused, naming it
UNSUPPORTED = {"use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "bias": "none",
               "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}


def _modules(model) -> dict[str, str]:
    """lmsys base weight -> the HF module path pattern ("model.layers.{i}.self_attn.q_proj")."""
    from lmsys.models.lora import TARGETS

    names = _hf_names(model)
    return {w: names[("layers", w)][0].removesuffix(".weight") for w in TARGETS.values()}


def save_peft(adapters: dict, lora_cfg, model, out_dir: str | Path, base: str = "") -> Path:
    """Writes a lmsys adapters tree (params["layers"]["lora"] of a LoRA run, float32) as a PEFT
    LoRA directory for the Hugging Face model at `base` (base_model_name_or_path)."""
    from safetensors.numpy import save_file

    from lmsys.models.lora import EXTRA, TARGETS

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    modules = _modules(model)
    tensors = {}
    r = lora_cfg.rank
    for w, ab in adapters.items():
        if w in EXTRA:
            continue
        a, b = np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32)
        for i in range(a.shape[0]):
            name = PREFIX + modules[w].format(i=i)
            tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, r).T)
            tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(r, -1).T)
    save_file(tensors, out / WEIGHTS_FILE, metadata={"format": "pt"})
    names = {v: k for k, v in TARGETS.items()}
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
              "r": r, "lora_alpha": lora_cfg.alpha, "lora_dropout": lora_cfg.dropout,
              "target_modules": sorted(modules[w].rsplit(".", 1)[1] for w in adapters if w in names),
              "inference_mode": True, "init_lora_weights": True, **UNSUPPORTED}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


def read_config(adapter_dir: str | Path) -> dict:
    """adapter_config.json of a PEFT LoRA directory, checked for what lmsys supports."""
    path = Path(adapter_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConversionError(f"{adapter_dir} is not a PEFT adapter directory (no {CONFIG_FILE})")
    config = json.loads(path.read_text())
    if config.get("peft_type") != "LORA":
        raise ConversionError(f"{path}: peft_type {config.get('peft_type')!r} is not supported; only LORA adapters")
    for key, default in UNSUPPORTED.items():
        if config.get(key, default) not in (default, None):  # null: unset
            raise ConversionError(f"{path}: {key} = {config[key]!r} is not supported by lmsys's LoRA "
                                  f"(only {default!r})")
    if not isinstance(config.get("target_modules"), list):
        raise ConversionError(f"{path}: target_modules {config.get('target_modules')!r} must be a list of "
                              f"module names (a regex is not supported)")
    return config


def load_peft(adapter_dir: str | Path, model):
    """(adapters, LoraConfig, base): a PEFT LoRA directory as a lmsys adapters tree (float32
    numpy, the `lmsys.models.lora` layout with its scale) for `model` (a ModelConfig), and the
    adapter's base_model_name_or_path. Tensors lmsys has no place for, or of the wrong shape,
    fail naming them."""
    from safetensors import safe_open

    from lmsys.config import LoraConfig
    from lmsys.models import llama, lora

    adapter_dir = Path(adapter_dir)
    config = read_config(adapter_dir)
    weights = adapter_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise ConversionError(f"{adapter_dir} has no {WEIGHTS_FILE} (an adapter_model.bin is not read; "
                              f"re-save it with safe_serialization=True)")
    r, L = int(config["r"]), model.n_layers
    modules = _modules(model)
    short = {m.rsplit(".", 1)[1]: w for w, m in modules.items()}
    bad = [t for t in config["target_modules"] if t not in short]
    if bad:
        raise ConversionError(f"{adapter_dir}: target_modules {bad} have no lmsys LoRA target; "
                              f"supported: {', '.join(sorted(short))}")
    targets = [short[t] for t in config["target_modules"]]
    lora_cfg = LoraConfig(rank=r, alpha=float(config["lora_alpha"]), dropout=float(config.get("lora_dropout", 0.0)),
                          targets=",".join(k for k, v in lora.TARGETS.items() if v in targets))
    specs = lora.param_specs(llama.param_specs(model)["layers"], lora_cfg)
    out, seen = {}, set()
    with safe_open(str(weights), framework="numpy") as f:
        keys = set(f.keys())
        for w in targets:
            a_LIr, b_LrO = specs[w]["a"].shape, specs[w]["b"].shape
            a, b = np.zeros(a_LIr, np.float32), np.zeros(b_LrO, np.float32)
            for i in range(L):
                name = PREFIX + modules[w].format(i=i)
                for ab, arr, shape in (("A", a, (r, int(np.prod(a_LIr[1:-1])))),
                                       ("B", b, (int(np.prod(b_LrO[2:])), r))):
                    key = f"{name}.lora_{ab}.weight"
                    if key not in keys:
                        raise ConversionError(f"{weights}: {key} is missing")
                    t = f.get_tensor(key).astype(np.float32)
                    if t.shape != shape:
                        raise ConversionError(f"{weights}: {key} has shape {t.shape}, expected {shape} "
                                              f"for this base model")
                    arr[i] = (t.T.reshape(a_LIr[1:]) if ab == "A" else t.T.reshape(b_LrO[1:]))
                    seen.add(key)
            out[w] = {"a": a, "b": b}
    extra = sorted(keys - seen)
    if extra:
        raise ConversionError(f"{weights}: {len(extra)} tensors have no place in lmsys's LoRA, e.g. {extra[0]}")
    out["scale"] = np.full((L,), lora_cfg.alpha / r, np.float32)
    return out, lora_cfg, str(config.get("base_model_name_or_path") or "")


def open_peft(path: Path, files=None):
    """A PEFT adapter directory as a model reference (lmsys.checkpoint.open_model): its base
    (base_model_name_or_path: a local model directory or models:/NAME@ALIAS) with the adapter
    merged in; the base's config and tokenizer."""
    import dataclasses

    from lmsys.checkpoint import CheckpointError, open_model

    base_ref = str(read_config(path).get("base_model_name_or_path") or "")
    if not (base_ref.startswith("models:/") or Path(base_ref).expanduser().is_dir()):
        raise CheckpointError(f"{path}: the adapter's base_model_name_or_path {base_ref!r} is not a local model "
                              f"directory; download the base and set base_model_name_or_path in "
                              f"{path / CONFIG_FILE} to it")
    base = open_model(base_ref, files=files)
    return dataclasses.replace(base, kind="peft", path=path, name=path.absolute().name,
                               ref=str(path.absolute()), base=base)


def merged_params(found, rules=None, step: int | None = None) -> tuple[dict, int]:
    """(params, step) of an `open_peft` reference: its base's params with the adapter merged in."""
    import jax

    from lmsys.models import lora

    params, step = found.base.params(rules, step)
    adapters, _, _ = load_peft(found.path, found.config.model)
    keep = jax.tree.map(lambda x: x.sharding, params)  # the base's layout (e.g. the training shardings)
    return jax.jit(lora.merge, out_shardings=keep)(lora.with_adapters(params, adapters)), step


def export_lora_run(found, out_dir: str | Path, step: int | None = None) -> Path:
    """`lmsys convert to-hf` of a LoRA run: its adapters as a PEFT directory for its base (the
    run's recorded base reference), with the tokenizer files."""
    from lmsys.data.tokenizer import copy_tokenizer_files
    from lmsys.train.adapters import load_adapters

    trainable, meta = load_adapters(found.path, found.config, None, step)
    base = (meta.get("base") or {}).get("init_from", "")
    out = save_peft(trainable, found.config.lora, found.config.model, out_dir, base)
    tokenizer = Path(found.config.data.tokenizer)
    if tokenizer.is_file():
        copy_tokenizer_files(tokenizer.parent, out)
    return out
