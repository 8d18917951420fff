"""LoRA training around the model's adapters (lmsys.models.lora): the params tree of a run with
or without adapters, its split into trainable and frozen parts, and the frozen base's reference.

With lora.rank > 0 the train state's params are the base weights plus the adapters
(params["layers"]["lora"]); only the adapters' A and B are trainable: the optimizer, its state
and the gradients see `split(params)[0]` alone, and the rest passes through the step unchanged.
A checkpoint holds the trainable part, the optimizer state and (in its meta) `base`: where the
frozen base comes from (init_from, pinned, or the seed of a random init) and a sha256 of its
weight files, checked when the run resumes or is loaded.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp

from lmsys.config import Config
from lmsys.models import llama, lora
from lmsys.models.common import ParamSpec


# params outside the model's tree that are frozen: the reference of DPO or of GRPO's KL term for
# full fine-tuning
FROZEN_KEYS = ("dpo_reference",)


def reference_copy(cfg: Config) -> bool:
    """Whether a full fine-tune keeps a frozen copy of its starting weights as the reference
    (DPO; GRPO with rl.kl_beta > 0); with LoRA the reference is the base, adapters off."""
    return not cfg.lora.rank and (cfg.data.format == "preference"
                                  or (cfg.data.format == "prompts" and cfg.rl.kl_beta > 0))


def has_frozen(cfg: Config) -> bool:
    """Whether a run's params have a frozen part (the LoRA base, the reference copy), which
    checkpoints leave out and a resume loads again from init_from (or the seed's init)."""
    return bool(cfg.lora.rank) or reference_copy(cfg)


def param_specs(cfg: Config) -> dict:
    """ParamSpecs of a run's params: the model's, with lora.rank > 0 plus the adapters; for DPO
    without LoRA plus the reference copy."""
    specs = llama.param_specs(cfg.model)
    if cfg.lora.rank:
        specs = lora.with_adapters(specs, lora.param_specs(specs["layers"], cfg.lora))
    elif reference_copy(cfg):
        specs = {**specs, "dpo_reference": llama.param_specs(cfg.model)}
    return specs


def _is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def _of_specs(fn, cfg: Config) -> dict:
    return jax.tree.map(fn, param_specs(cfg), is_leaf=_is_spec)


def param_axes(cfg: Config) -> dict:
    """The logical axes of a run's params (`param_specs`)."""
    return _of_specs(lambda s: s.axes, cfg)


def param_shapes(cfg: Config) -> dict:
    """float32 ShapeDtypeStructs of a run's params (`param_specs`)."""
    return _of_specs(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), cfg)


def decay_mask(cfg: Config) -> dict:
    """Weight decay on the trainable matrices: the model's normal-initialized ones, or all the
    adapters' A and B."""
    trainable, _ = split(param_specs(cfg))
    return jax.tree.map(lambda s: bool(cfg.lora.rank) or s.init == "normal", trainable, is_leaf=_is_spec)


def init_params(cfg: Config, seed: int, base: dict | None = None) -> dict:
    """float32 params: `base` (default: the model's random init of `seed`, as without LoRA) and
    with lora.rank > 0 fresh adapters (B = 0: the model computes the base's function)."""
    key = jax.random.key(seed)
    if base is None:
        base = llama.init(key, cfg.model)
    else:
        base = jax.tree.map(lambda x: x.astype(jnp.float32), base)
    if not cfg.lora.rank:
        return {**base, "dpo_reference": base} if reference_copy(cfg) else base
    if cfg.lora.base_quantize:  # the frozen matrices int8/fp8 (qwix QArrays), dequantized per layer
        from lmsys.models.quantize import quantize_params

        base = quantize_params(base, cfg.lora.base_quantize)
    specs = lora.param_specs(llama.param_specs(cfg.model)["layers"], cfg.lora)
    return lora.with_adapters(base, lora.init(jax.random.fold_in(key, 1), specs, cfg.lora))


def shardings(rules, cfg: Config, abstract: dict) -> dict:
    """Shardings of a run's params by the rule table; `abstract`: their shapes (a quantized
    matrix is a QArray: its values and scales laid out by the matrix's axes)."""
    return jax.tree.map(lambda axes, s: jax.tree.map(lambda x: rules.sharding(axes, x.shape), s),
                        param_axes(cfg), abstract, is_leaf=lambda t: isinstance(t, tuple))


def split(params: dict):
    """(trainable, frozen): without adapters the model's params train (frozen: None, or DPO's
    reference); with adapters only their A and B (a {weight: {"a", "b"}} tree), the rest is
    frozen."""
    ref = {k: params[k] for k in FROZEN_KEYS if k in params}
    params = {k: v for k, v in params.items() if k not in FROZEN_KEYS}
    adapters = lora.adapters_of(params)
    if adapters is None:
        return params, (ref or None)
    trainable = {w: ab for w, ab in adapters.items() if w not in lora.EXTRA}
    frozen = lora.with_adapters(params, {k: v for k, v in adapters.items() if k in lora.EXTRA})
    return trainable, {**frozen, **ref}


def join(trainable, frozen) -> dict:
    """The inverse of `split`."""
    if frozen is None:
        return trainable
    if lora.adapters_of(frozen) is None:  # the model's params train; the frozen part beside them
        return {**trainable, **frozen}
    return lora.with_adapters(frozen, {**lora.adapters_of(frozen), **trainable})


def attach(base: dict, trainable: dict, cfg: Config) -> dict:
    """`base` params with trained adapters (`split(params)[0]` of a LoRA run of `cfg`)."""
    scale = jnp.full((cfg.model.n_layers,), cfg.lora.alpha / cfg.lora.rank, jnp.float32)
    return lora.with_adapters(base, {**trainable, "scale": scale})


def with_dropout(params: dict, key: jax.Array, rate: float) -> dict:
    """params whose adapters drop their inputs at `rate` (a training pass), one key per layer."""
    adapters = lora.adapters_of(params)
    if adapters is None or rate <= 0:
        return params
    L = adapters["scale"].shape[0]
    keys = jax.random.key_data(jax.random.split(key, L))
    return lora.with_adapters(params, {**adapters, "dropout_key": keys,
                                       "dropout_rate": jnp.full((L,), rate, jnp.float32)})


# ----------------------------------------------------------------------------- the frozen base


def weights_hash(path: str | Path, step: int | None = None) -> str:
    """sha256 over the files holding a model's weights: a Hugging Face directory's config.json
    and *.safetensors, or an lmsys run's checkpoint step directory (latest: `step` None)."""
    from lmsys.interop.registry import checkpoint_hash, files_hash

    root = Path(path)
    if (root / "config.yaml").is_file():
        steps = sorted(int(d.name) for d in (root / "checkpoints").iterdir() if d.name.isdigit())
        return checkpoint_hash(root / "checkpoints" / str(steps[-1] if step is None else step))
    return files_hash(root, [p for p in (root / "config.json", root / "adapter_config.json") if p.is_file()]
                      + sorted(root.glob("*.safetensors")))


def base_reference(cfg: Config, step: int | None = None) -> dict:
    """The frozen base of a LoRA run, as a checkpoint's meta records it: {"init_from": the pinned
    reference (a directory or models:/NAME/VERSION), "step", "sha256"} or, without init_from,
    {"seed"} (the random init)."""
    if not cfg.init_from:
        return {"seed": cfg.seed}
    if cfg.init_from.startswith("models:/"):
        from lmsys.interop.registry import Registry

        resolved = Registry().resolve(cfg.init_from)
        return {"init_from": cfg.init_from, "step": resolved.step, "sha256": resolved.sha256}
    return {"init_from": cfg.init_from, "step": step, "sha256": weights_hash(cfg.init_from, step)}


def check_base(saved: dict | None, now: dict, where: str) -> None:
    """Refuses (CheckpointError) adapters trained on another base than the one at hand."""
    from lmsys.checkpoint import CheckpointError

    if saved is None:
        raise CheckpointError(f"checkpoint {where} has no base reference: it is not a LoRA checkpoint; "
                              f"set lora.rank=0 or train into a new run_dir")
    if not now:
        raise CheckpointError(f"checkpoint {where} holds LoRA adapters only (of the base {saved}); resume "
                              f"with the lora.* keys it was trained with, or train into a new run_dir")
    for key in ("init_from", "seed", "sha256"):
        if saved.get(key) != now.get(key):
            raise CheckpointError(
                f"checkpoint {where} holds LoRA adapters of another base ({key} {saved.get(key)!r} there, "
                f"{now.get(key)!r} now); give the base it was trained on (init_from={saved.get('init_from')}) "
                f"or train into a new run_dir")


def load_base(cfg: Config, shardings=None, rules=None) -> tuple[dict, int | None]:
    """The frozen base params of a LoRA config and the step they come from: init_from's weights,
    or the random init of cfg.seed (placed on `shardings`, a tree like the model's params)."""
    if cfg.init_from:
        from lmsys.checkpoint import open_model

        return open_model(cfg.init_from).params(rules)
    init = jax.jit(lambda: llama.init(jax.random.key(cfg.seed), cfg.model), out_shardings=shardings)
    return init(), None


def load_adapters(run_dir: Path, cfg: Config, rules=None, step: int | None = None):
    """(adapters, meta) of a LoRA run's checkpoint: the trained A and B (`split(params)[0]`)."""
    from lmsys.checkpoint import Checkpointer

    ckpt = Checkpointer(Path(run_dir) / "checkpoints", read_only=True)
    try:
        shardings = None if rules is None else split(rules.tree_shardings(param_axes(cfg), param_shapes(cfg)))[0]
        return ckpt.restore_params(cfg.model, shardings, step, shapes=split(param_shapes(cfg))[0])
    finally:
        ckpt.close()


def load_run(run_dir: Path, cfg: Config, rules=None, step: int | None = None, merged: bool = True):
    """(params, meta) of a LoRA run's checkpoint: its base (checked against the recorded
    reference) with the adapters, folded in (`merged`: a plain model, what serving and export
    use) or attached (params["layers"]["lora"])."""
    trainable, meta = load_adapters(run_dir, cfg, rules, step)
    saved = meta.get("base")
    where = f"{Path(run_dir) / 'checkpoints'} step {meta['step']}"
    if saved is None:
        check_base(saved, {}, where)
    base_cfg = dataclasses.replace(cfg, init_from=saved.get("init_from", ""), seed=saved.get("seed", cfg.seed))
    base_shardings = None if rules is None else rules.tree_shardings(
        llama.param_axes(cfg.model), llama.param_shapes(cfg.model))
    base, base_step = load_base(base_cfg, base_shardings, rules)
    check_base(saved, base_reference(base_cfg, base_step), where)
    params = attach(base, trainable, cfg)
    if merged:  # laid out as the base
        params = jax.jit(lora.merge, out_shardings=jax.tree.map(lambda x: x.sharding, base))(params)
    return params, meta
