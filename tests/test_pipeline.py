"""Pipeline parallelism over `mesh.stage` (lmsys.parallel.pipeline), 8 emulated CPU devices,
float32: GPipe and circular schedules over 2 and 4 stages, alone and with data/fsdp/tensor and
gradient accumulation, give the loss and gradients of one device; stage=4 holds a quarter of
the layer state per device; misconfigurations fail with a message naming the key."""

import math

import jax
import numpy as np
import pytest

from common import synthetic_batch, tiny_config
from lmsys.config import ConfigError
from lmsys.parallel import Rules, build_mesh
from lmsys.parallel.pipeline import bubble_fraction
from lmsys.plan import analysis
from lmsys.train import Trainer

LAYERS8 = {"n_layers": 8}  # splits into 2 x 2 and 4 x 2 chunks

# name -> (mesh, pipeline.*, other top-level keys)
COMBOS = {
    "stage2-gpipe": ({"stage": 2, "fsdp": 1}, {}, {}),
    "stage4-gpipe-m8": ({"stage": 4, "fsdp": 1}, {"microbatches": 8}, {}),
    "stage2-circular-accum2": ({"stage": 2, "fsdp": 1}, {"repeats": 2}, {"grad_accum": 2}),
    "stage4-circular": ({"stage": 4, "fsdp": 1}, {"repeats": 2, "microbatches": 4}, {}),
    "stage2-fsdp2-tensor2": ({"stage": 2, "fsdp": 2, "tensor": 2}, {}, {}),
    "stage2-data2-fsdp2-circular": ({"stage": 2, "data": 2, "fsdp": 2}, {"repeats": 2}, {}),
}


def _loss_and_grads(mesh, **top):
    cfg = tiny_config(mesh, model=LAYERS8, **top)
    n = math.prod(mesh.values())
    trainer = Trainer(cfg, Rules(build_mesh(cfg.mesh, jax.devices()[:n])))
    params = trainer.init(cfg.seed)["params"]
    batch = synthetic_batch(cfg, sharding=trainer.batch_sharding)
    compiled = jax.jit(trainer.grads).lower(params, batch).compile()  # one compile per combination
    loss, grads, _ = compiled(params, batch)
    return params, float(loss), jax.device_get(grads), compiled.as_text()


@pytest.fixture(scope="module")
def reference():
    _, loss, grads, _ = _loss_and_grads({"fsdp": 1})
    return loss, grads


@pytest.mark.parametrize("name", list(COMBOS))
def test_pipeline_matches_one_device(name, reference):
    mesh, pipeline, top = COMBOS[name]
    params, loss, grads, hlo = _loss_and_grads(mesh, pipeline=pipeline, **top)
    ref_loss, ref_grads = reference
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for (path, g), ref in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        rel = np.linalg.norm(g - ref) / np.linalg.norm(ref)
        assert rel <= 1e-5, (jax.tree_util.keystr(path), rel)
    # the stacked layers are split over the stages, and activations travel between them
    assert params["layers"]["wq"].sharding.spec[0] == "stage"
    assert params["embed"].sharding.spec[:1] != ("stage",)
    assert "collective-permute" in hlo


def test_stage4_holds_a_quarter_of_the_layer_state():
    """Per-device argument bytes of the compiled train step (params, Adam moments, batch) match
    lmsys.plan.analysis, in which stage=4 holds 1/4 of the layer params and moments."""
    model = {"n_layers": 8, "d_model": 128, "d_ff": 512}
    cfg = tiny_config({"stage": 4, "fsdp": 1}, model=model)
    sizes = {"stage": 4}
    params = analysis.param_bytes_per_device(cfg.model, sizes)
    whole = analysis.param_bytes_per_device(cfg.model, {})
    assert params["layers"] == whole["layers"] / 4
    assert params["embed"] == whole["embed"]  # embedding and head run outside the pipeline
    assert analysis.optimizer_state_bytes_per_device(cfg.model, sizes) == 2 * sum(params.values())

    trainer = Trainer(cfg, Rules(build_mesh(cfg.mesh, jax.devices()[:4])))
    batch = trainer.abstract_batch()
    compiled = trainer.step.lower(trainer.abstract_state, batch).compile()
    measured = compiled.memory_analysis().argument_size_in_bytes
    batch_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in batch.values())  # whole per stage
    non_layer_state = 3 * (sum(params.values()) - params["layers"])  # params + 2 moments
    layer_state = measured - batch_bytes - non_layer_state
    expected = 3 * whole["layers"] / 4
    assert abs(layer_state - expected) <= 0.15 * expected, (layer_state, expected)


@pytest.mark.parametrize("remat", ["full", "selective"])
def test_remat_applies_to_each_layer_inside_the_stages(remat):
    """remat=full is the policy None (save nothing), which must not read as "no remat"."""
    cfg = tiny_config({"stage": 2, "fsdp": 1}, remat=remat)
    trainer = Trainer(cfg, Rules(build_mesh(cfg.mesh, jax.devices()[:2])))
    jaxpr = jax.make_jaxpr(trainer.grads)(trainer.abstract_state["params"], trainer.abstract_batch())
    assert "remat2[" in str(jaxpr)  # jax.checkpoint's primitive


def test_per_layer_stats_add_up_over_microbatches_in_model_order():
    """A block's second result (as the MoE router's statistics) comes back per layer in model
    order, summed over the microbatches of real ticks only, also when the circular schedule runs
    the layers out of order."""
    import dataclasses

    import jax.numpy as jnp

    from lmsys.config import PipelineConfig
    from lmsys.parallel.pipeline import pipeline

    cfg = tiny_config({"stage": 2, "fsdp": 1})
    rules = dataclasses.replace(Rules(build_mesh(cfg.mesh, jax.devices()[:2])),
                                pipeline=PipelineConfig(microbatches=4, repeats=2))
    L, B = 8, 8
    layers = {"id": jnp.arange(1.0, L + 1)}

    def block(x, lp, pos, seg, inner):  # adds its id; stats: id and the row sum it saw
        return x + lp["id"], {"id": lp["id"], "rows": jnp.sum(x, axis=(1, 2))}

    x = jnp.arange(B, dtype=jnp.float32)[:, None, None] * jnp.ones((B, 2, 3))
    out, stats = jax.jit(lambda layers, x: pipeline(block, layers, x, jnp.zeros((B, 2), jnp.int32),
                                                    None, rules=rules))(layers, x)
    np.testing.assert_allclose(out, x + L * (L + 1) / 2)
    np.testing.assert_allclose(stats["id"], 4 * np.arange(1, L + 1))  # 4 microbatches each
    before = np.concatenate([[0], np.cumsum(np.arange(1, L))])  # ids added before layer l
    rows = 6 * (np.arange(B)[None] + before[:, None])  # each row's sum entering layer l
    # microbatch j holds rows j and j+4: entry k of the summed stats is rows 4k..4k+3's
    np.testing.assert_allclose(stats["rows"], rows.reshape(L, 2, 4).sum(axis=2))


def test_bubble_fraction_formulas():
    assert bubble_fraction(4, 4) == 3 / 7  # GPipe: (p-1)/(m+p-1)
    assert bubble_fraction(4, 4, repeats=2) == 3 / 11  # interleaved: (p-1)/(m*v+p-1)
    assert bubble_fraction(1, 8) == 0


@pytest.mark.parametrize("mesh, top, message", [
    ({"stage": 4, "fsdp": 1}, {"model": {"n_layers": 6}},
     "'model.n_layers' = 6: must be divisible by mesh.stage x pipeline.repeats = 4 x 1"),
    ({"stage": 2, "fsdp": 1}, {"model": LAYERS8, "pipeline": {"repeats": 3}},
     "'model.n_layers' = 8: must be divisible by mesh.stage x pipeline.repeats = 2 x 3"),
    ({"stage": 4, "fsdp": 1}, {"model": LAYERS8, "pipeline": {"microbatches": 2}},
     "'pipeline.microbatches' = 2: must be >= mesh.stage (4)"),
    ({"stage": 2, "fsdp": 1}, {"model": LAYERS8, "pipeline": {"microbatches": 3}},
     "'pipeline.microbatches' = 3: must divide the 8 sequences"),
    ({"stage": 2, "fsdp": 1}, {"model": LAYERS8, "pipeline": {"repeats": 0}},
     "'pipeline.repeats' = 0: must be >= 1"),
])
def test_misconfigurations_fail_at_config_time(mesh, top, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_config(mesh, **top)


@pytest.mark.parametrize("mesh, microbatches, message", [
    ({"stage": -1, "fsdp": 1}, 8,  # stage fills the 8 devices
     "'model.n_layers' = 4: must be divisible by mesh.stage x pipeline.repeats = 8 x 1"),
    ({"stage": 2, "fsdp": 4}, 4,
     r"each of the 4 microbatches \(2 sequences\) must split over mesh data x fsdp = 4 devices"),
])
def test_misconfigurations_found_with_the_mesh(mesh, microbatches, message):
    cfg = tiny_config(mesh, model={"n_layers": 4}, pipeline={"microbatches": microbatches})
    with pytest.raises(ConfigError, match=message):
        Trainer(cfg, Rules(build_mesh(cfg.mesh)))
