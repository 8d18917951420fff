"""LoRA: a model with adapters computes its merged model's logits; training moves the adapters
only (the base stays bit-identical, the optimizer state holds adapter leaves only) and gives the
same numbers on every mesh; a LoRA run's checkpoints hold the adapters and a reference to the
base, resume against that base only, and load (serve, generate, export) as the merged model."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

from common import synthetic_batch, tiny_config
from lmsys.config import ConfigError, from_dict
from lmsys.models import llama, lora
from lmsys.parallel import Rules, build_mesh
from lmsys.train import Trainer
from lmsys.train import adapters
from test_finetune import hf_dir  # noqa: F401  (the tiny HF Llama fixture)

LORA = {"rank": 4, "alpha": 8.0, "targets": "all"}
MESHES = {  # name: (mesh, devices, extra top-level keys)
    "f2t2": (dict(data=1, fsdp=2, tensor=2), 4, {}),
    "s2f2t2": (dict(stage=2, fsdp=2, tensor=2), 8, {"grad_accum": 2, "remat": "full"}),
}


_FORWARDS = {}


def _forward(params, batch, cfg):
    """The logits, jitted once per model config (eager ops would each compile)."""
    key = repr(cfg.model)
    if key not in _FORWARDS:
        model = cfg.model
        _FORWARDS[key] = jax.jit(lambda p, b: llama.forward(p, b["tokens"], b["positions"], b["segment_ids"],
                                                            cfg=model)[0])
    return _FORWARDS[key](params, batch)


def _random_b(params, seed=1):
    """params whose adapters' B are random (fresh ones are zero: the base's function)."""
    ad = lora.adapters_of(params)
    keys = iter(jax.random.split(jax.random.key(seed), len(ad)))
    ad = {w: (v if w in lora.EXTRA else {**v, "b": 0.1 * jax.random.normal(next(keys), v["b"].shape)})
          for w, v in ad.items()}
    return lora.with_adapters(params, ad)


def test_lora_logits_equal_merged_and_unmerge_restores_the_base():
    cfg = tiny_config(lora=LORA)
    params = _random_b(adapters.init_params(cfg, 0))
    batch = synthetic_batch(cfg)
    with jax.default_matmul_precision("highest"):
        adapted, merged = _forward(params, batch, cfg), _forward(lora.merge(params), batch, cfg)
        plain = _forward(lora.with_adapters(params, None), batch, cfg)
    np.testing.assert_allclose(adapted, merged, atol=1e-5, rtol=0)
    assert float(jnp.max(jnp.abs(adapted - plain))) > 1e-2  # the adapters do change the logits
    back = lora.unmerge(lora.merge(params), lora.adapters_of(params))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0), back, params)


def _train(name=None, steps=3):
    mesh, n, top = MESHES[name] if name else ({}, 1, {})
    cfg = tiny_config(mesh, lora=LORA, **top)
    trainer = Trainer(cfg, Rules(build_mesh(cfg.mesh, jax.devices()[:n])))
    state = trainer.init(cfg.seed)
    before = jax.device_get(state["params"])
    batch = synthetic_batch(cfg, sharding=trainer.batch_sharding)
    losses = []
    for _ in range(steps):
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
    return trainer, before, jax.device_get(state), state, losses


@pytest.fixture(scope="module")
def one_device():
    return _train()


def test_training_moves_only_the_adapters(one_device):
    trainer, before, after, _, losses = one_device
    assert losses[-1] < losses[0] - 0.01, losses
    _, frozen_before = adapters.split(before)
    trained, frozen_after = adapters.split(after["params"])
    eq = jax.tree.map(lambda a, b: a.dtype == b.dtype and np.array_equal(a, b), frozen_before, frozen_after)
    assert all(jax.tree.leaves(eq))  # the base (and the scale) bit-identical
    assert all(float(np.abs(ab["b"]).max()) > 0 for ab in trained.values())  # every B trained
    # the optimizer state: Adam's moments of the adapters' A and B only, nothing of the base
    paths = {jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_flatten_with_path(after["opt_state"])[0]
             if x.ndim > 0}
    expected = {f"{m}['{w}']['{ab}']" for w in lora.TARGETS.values() for ab in "ab" for m in ("mu", "nu")}
    assert {p.split(".", 1)[1] for p in paths} == expected
    assert trainer.checkpointed(after)["params"].keys() == set(lora.TARGETS.values())


@pytest.mark.parametrize("name", list(MESHES))
def test_lora_on_a_mesh_equals_one_device(name, one_device):
    trainer, _, after, state, losses = _train(name)
    _, _, ref, _, ref_losses = one_device
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0),
                 adapters.split(after["params"])[0], adapters.split(ref["params"])[0])
    ad = lora.adapters_of(state["params"])  # A and B split like their base matrix's dims
    stage = ("stage",) if trainer.rules.mesh.shape["stage"] > 1 else (None,)
    assert ad["wq"]["a"].sharding.spec == P(*stage, "fsdp")
    assert ad["wq"]["b"].sharding.spec == P(*stage, None, "tensor")
    assert ad["wo"]["a"].sharding.spec == P(*stage, "tensor")
    assert ad["wo"]["b"].sharding.spec == P(*stage, None, "fsdp")


def test_lora_config_errors():
    with pytest.raises(ConfigError, match="'lora.targets' = 'q,x'.*among q, k, v, o, gate, up, down"):
        tiny_config(lora={"rank": 4, "targets": "q,x"})
    with pytest.raises(ConfigError, match="'lora.rank' = -1"):
        tiny_config(lora={"rank": -1})
    with pytest.raises(ConfigError, match="'lora.dropout' = 1.0"):
        tiny_config(lora={"rank": 4, "dropout": 1.0})
    with pytest.raises(ConfigError, match="'lora.base_quantize' = 'int8': quantizes the frozen base of LoRA"):
        tiny_config(lora={"base_quantize": "int8"})
    with pytest.raises(ConfigError, match="'lora.base_quantize' = 'int4': must be '' \\(off\\), int8 or fp8"):
        tiny_config(lora={"rank": 4, "base_quantize": "int4"})
    with pytest.raises(ConfigError, match="mixture-of-experts model has no dense MLP for gate"):
        tiny_config(lora={"rank": 4, "targets": "q,gate"}, model={"n_experts": 4, "experts_per_token": 2})


# ----------------------------------------------------------------------------- a LoRA run


def test_lora_run_checkpoints_adapters_and_its_base(hf_dir, tmp_path):
    from test_finetune import _ft_config

    from lmsys.checkpoint import Checkpointer, CheckpointError, load_model
    from lmsys.interop import load_hf
    from lmsys.train.loop import load_data, resolve_init_from, train
    from lmsys.train.step import loss_sums

    cfg = _ft_config(hf_dir, tmp_path, steps=4, lora=LORA)
    first = train(cfg, progress=False, stop_at=2)
    base, model = load_hf(hf_dir)
    batch = load_data(resolve_init_from(cfg)).batch(0, cfg.batch_size)
    total, n = loss_sums(_forward(base, batch, resolve_init_from(cfg)), batch["targets"], batch["loss_mask"])
    np.testing.assert_allclose(first[0]["loss"], float(total / n), rtol=1e-5)  # B = 0: the base's loss

    ckpt = Checkpointer(Path(cfg.run_dir) / "checkpoints", read_only=True)
    meta = ckpt.meta(2)
    ckpt.close()
    saved = ocp.StandardCheckpointer().metadata(Path(cfg.run_dir) / "checkpoints/2/state").item_metadata
    assert meta["base"] == {"init_from": str(hf_dir.absolute()), "step": 0,
                            "sha256": adapters.weights_hash(hf_dir)}
    assert set(saved["params"]) == set(lora.TARGETS.values())  # adapters only, no base weights
    assert set(saved["params"]["wq"]) == {"a", "b"}

    rest = train(cfg, progress=False)  # resumes from step 2 against the same base
    assert [h["step"] for h in rest] == [3, 4]
    assert rest[-1]["loss"] < first[0]["loss"]

    # loading the run (serve, generate, convert) gives the merged model
    loaded = load_model(cfg.run_dir)
    assert lora.adapters_of(loaded.params) is None and loaded.step == 4  # merged: no adapters left
    trained, _ = _adapters_of_run(cfg)
    expected = lora.merge(adapters.attach(base, trained, resolve_init_from(cfg)))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0), loaded.params, expected)

    # another base (its weights changed): the adapters are refused, naming the base
    from safetensors.numpy import load_file, save_file

    (weights,) = hf_dir.glob("*.safetensors")
    original = weights.read_bytes()
    tensors = load_file(weights)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1
    save_file(tensors, weights, metadata={"format": "pt"})
    try:
        with pytest.raises(CheckpointError, match="LoRA adapters of another base .*sha256"):
            train(cfg, progress=False)
        with pytest.raises(CheckpointError, match="LoRA adapters of another base"):
            load_model(cfg.run_dir)
    finally:
        weights.write_bytes(original)


def _adapters_of_run(cfg):
    from lmsys.checkpoint import Checkpointer
    from lmsys.train.loop import resolve_init_from

    ckpt = Checkpointer(Path(cfg.run_dir) / "checkpoints", read_only=True)
    try:
        shapes = adapters.split(adapters.param_shapes(resolve_init_from(cfg)))[0]
        return ckpt.restore_params(resolve_init_from(cfg).model, None, shapes=shapes)
    finally:
        ckpt.close()


def test_lora_dropout_masks_the_adapter_input_in_training_only(one_device):
    cfg = tiny_config(lora={**LORA, "dropout": 0.5})
    trainer = Trainer(cfg, Rules(build_mesh(cfg.mesh, jax.devices()[:1])))
    state = _random_b(trainer.init(cfg.seed)["params"])
    batch = synthetic_batch(cfg)
    grads = jax.jit(trainer.grads_and_metrics)
    loss = lambda k: float(grads(state, batch, k)[0])  # noqa: E731
    plain = float(grads(state, batch)[0])  # no key: no dropout
    assert loss(jax.random.key(3)) == loss(jax.random.key(3)) != plain
    assert abs(loss(jax.random.key(3)) - loss(jax.random.key(4))) > 1e-6


def test_lora_recipe_resolves(hf_dir, tmp_path):
    from test_finetune import ROOT, _write_chats

    from lmsys.config import load_config
    from lmsys.train.loop import resolve_init_from

    chats = _write_chats(tmp_path / "chats.jsonl")
    cfg = resolve_init_from(load_config(ROOT / "recipes/configs/lora.yaml", [
        f"init_from={hf_dir}", f"data.source={chats}", f"run_dir={tmp_path / 'run'}"]))
    assert cfg.lora.rank == 16 and adapters.split(adapters.param_shapes(cfg))[0].keys() == set(lora.TARGETS.values())


# ----------------------------------------------------------------------------- memory


def _small(**top):
    return from_dict({"model": {"preset": "small"}, "batch_size": 2, "seq_len": 64, **top})


def _nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_int8_base_trains_in_half_the_bytes():
    from lmsys.models.quantize import CONTRACTING_AXES

    cfg = tiny_config(lora={**LORA, "base_quantize": "int8"})
    small = _small(lora={**LORA, "base_quantize": "int8"})
    state = Trainer(small, Rules(build_mesh(small.mesh, jax.devices()[:1]))).abstract_state
    _, frozen = adapters.split(state["params"])
    matrices = [(frozen["layers"] if k in frozen["layers"] else frozen)[k] for k in CONTRACTING_AXES
                if k in frozen["layers"] or k in frozen]
    assert all(hasattr(m, "qvalue") for m in matrices)
    ratio = _nbytes(matrices) / sum(m.qvalue.size * 2 for m in matrices)  # vs the same matrices in bf16
    assert ratio <= 0.55, ratio

    # it trains (tiny model): the logits are those of the dequantized base with the adapters merged
    trainer = Trainer(cfg, Rules(build_mesh(cfg.mesh, jax.devices()[:1])))
    state = trainer.init(cfg.seed)
    batch = synthetic_batch(cfg)
    losses = []
    for _ in range(2):
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[1] < losses[0]
    params = jax.jit(llama.materialize, static_argnums=1)(state["params"], jnp.float32)
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(_forward(params, batch, cfg), _forward(lora.merge(params), batch, cfg),
                                   atol=1e-5, rtol=0)


def test_train_step_arguments_are_the_frozen_base_plus_adapters():
    """small preset, rank 8: the compiled step's arguments (params + Adam state + batch) are at
    most 1.05x the frozen base + the adapters: no optimizer state or second copy of the base."""
    cfg = _small(lora={"rank": 8})
    trainer = Trainer(cfg, Rules(build_mesh(cfg.mesh, jax.devices()[:1])))
    compiled = trainer.step.lower(trainer.abstract_state, trainer.abstract_batch()).compile()
    trainable, frozen = adapters.split(trainer.abstract_state["params"])
    args = compiled.memory_analysis().argument_size_in_bytes
    assert args <= 1.05 * (_nbytes(frozen) + _nbytes(trainable)), (args, _nbytes(frozen), _nbytes(trainable))
