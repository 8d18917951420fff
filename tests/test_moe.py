"""Mixture of experts (lmsys.models.moe.moe_mlp) and expert parallelism over `mesh.expert`,
8 emulated CPU devices, float32: the MoE MLP equals a per-token numpy reference (top-k routing,
capacity, shared experts, router losses); expert=2/4/8, alone and with fsdp/tensor or pipeline
stages, give the loss, router losses and gradients of one device; expert=4 holds a quarter of
the expert weights per device; misconfigurations fail with a message naming the key."""

import dataclasses
import math

import jax
import numpy as np
import pytest
from common import synthetic_batch, tiny_config
from jax.sharding import PartitionSpec as P

from lmsys.config import ConfigError, ModelConfig, from_dict
from lmsys.models import llama, moe
from lmsys.parallel import Rules, build_mesh
from lmsys.plan import analysis
from lmsys.train import Trainer

MOE = {"n_experts": 8, "experts_per_token": 2, "moe_d_ff": 32, "n_shared_experts": 1,
       "router_aux_loss": 0.1, "router_z_loss": 0.01}


def _trainer(mesh, model=None, **top):
    """A Trainer of the MoE test model (MOE, updated by `model`) on the first devices."""
    cfg = tiny_config(mesh, model={**MOE, **(model or {})}, **top)
    return Trainer(cfg, Rules(build_mesh(cfg.mesh, jax.devices()[:math.prod(mesh.values())])))


# ----------------------------------------------------------------------------- one layer vs numpy


def _numpy_moe(h, lp, cfg: ModelConfig, capacity: int):
    """Token by token: top-k experts by logit, softmax over their logits, each expert taking the
    row's assignments in (choice, token) order up to `capacity`; plus the shared SwiGLU."""
    def silu(x):
        return x / (1 + np.exp(-x))

    B, T, _ = h.shape
    E, K = cfg.n_experts, cfg.experts_per_token
    logits = h @ lp["router"]
    top = np.argsort(-logits, axis=-1)[..., :K]
    out = np.zeros_like(h)
    for b in range(B):
        filled = np.zeros(E, int)
        for k in range(K):
            for t in range(T):
                e = top[b, t, k]
                if filled[e] >= capacity:
                    continue
                filled[e] += 1
                chosen = logits[b, t, top[b, t]]
                w = np.exp(chosen - chosen.max())
                w = w / w.sum()
                x = h[b, t]
                y = (silu(x @ lp["w_gate"][e]) * (x @ lp["w_up"][e])) @ lp["w_down"][e]
                out[b, t] += w[k] * y
    if cfg.n_shared_experts:
        out += (silu(h @ lp["shared_w_gate"]) * (h @ lp["shared_w_up"])) @ lp["shared_w_down"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    fraction = np.bincount(top.ravel(), minlength=E) / top.size
    balance = E * np.sum(fraction * probs.mean(axis=(0, 1)))
    lse = np.log(np.exp(logits).sum(-1))
    return out, np.array([balance, np.mean(lse ** 2)])


@pytest.mark.parametrize("capacity_factor, capacity", [(0.0, 12), (1.0, 3)])
def test_moe_mlp_matches_a_numpy_reference(capacity_factor, capacity):
    cfg = ModelConfig(d_model=16, d_ff=24, n_layers=1, n_experts=8, experts_per_token=2,
                      n_shared_experts=1, moe_capacity_factor=capacity_factor, init_std=0.5)
    assert moe.moe_capacity(cfg, 12) == capacity  # dropless: every token; else ceil(1 x 2 x 12 / 8)
    specs = moe.moe_param_specs(cfg)
    keys = jax.random.split(jax.random.key(0), len(specs) + 1)
    lp = {name: 0.5 * jax.random.normal(k, s.shape[1:]) for k, (name, s) in zip(keys, specs.items())}
    h = jax.random.normal(keys[-1], (3, 12, 16))
    out, stats = jax.jit(lambda h, lp: moe.moe_mlp(h, lp, cfg=cfg))(h, lp)
    losses = moe.router_losses(stats, cfg)
    lp_np = {k: np.asarray(v, np.float64) for k, v in lp.items()}
    ref_out, ref_losses = _numpy_moe(np.asarray(h, np.float64), lp_np, cfg, capacity)
    np.testing.assert_allclose(out, ref_out, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    if capacity_factor:  # the capacity really dropped assignments: without it the output differs
        dropless, _ = _numpy_moe(np.asarray(h, np.float64), lp_np, cfg, capacity=12)
        assert np.abs(dropless - ref_out).max() > 1e-2


def test_router_losses_enter_the_objective():
    """The reported loss is the cross-entropy; the gradient is that of loss + weighted router
    losses (switching the weights off changes the router's gradient)."""
    results = {}
    for aux, z in ((0.1, 0.01), (0.0, 0.0)):
        trainer = _trainer({"fsdp": 1}, model={"router_aux_loss": aux, "router_z_loss": z})
        params = trainer.init(0)["params"]
        results[aux] = jax.jit(trainer.grads_and_metrics)(params, synthetic_batch(trainer.cfg))
    (loss_a, g_a, _, m_a), (loss_b, g_b, _, _) = results[0.1], results[0.0]
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
    assert set(m_a) == {"moe_aux_loss", "moe_z_loss"}
    assert 2 * 0.9 < m_a["moe_aux_loss"] < 2 * 1.5  # two layers, each near balanced (1.0)
    assert not np.allclose(g_a["layers"]["router"], g_b["layers"]["router"], rtol=1e-3)


# ----------------------------------------------------------------------------- expert parallelism

# name -> (mesh, other top-level keys)
COMBOS = {
    "expert2": ({"expert": 2, "fsdp": 1}, {}),
    "expert4": ({"expert": 4, "fsdp": 1}, {}),
    "expert8": ({"expert": 8, "fsdp": 1}, {}),
    "expert2-fsdp2-tensor2": ({"expert": 2, "fsdp": 2, "tensor": 2}, {}),
    "expert2-data2-accum2": ({"expert": 2, "data": 2, "fsdp": 1}, {"grad_accum": 2}),
    # pipelined: each layer's router statistics add up over the microbatches (one device's
    # losses without accumulation), also when circular stages take the layers out of order
    "stage2-expert2": ({"stage": 2, "expert": 2, "fsdp": 1}, {}),
    "stage2-circular-expert2-data2": ({"stage": 2, "expert": 2, "data": 2, "fsdp": 1},
                                      {"pipeline": {"repeats": 2}, "model": {"n_layers": 4}}),
}


def _loss_and_grads(mesh, **top):
    trainer = _trainer(mesh, **top)
    params = trainer.init(0)["params"]
    batch = synthetic_batch(trainer.cfg, sharding=trainer.batch_sharding)
    compiled = jax.jit(trainer.grads_and_metrics).lower(params, batch).compile()
    loss, grads, _, metrics = compiled(params, batch)
    return params, float(loss), jax.device_get(metrics), jax.device_get(grads), compiled.as_text()


@pytest.fixture(scope="module")
def reference():
    """One device with the same other keys but the pipeline's (the load-balancing loss of a
    microbatch is not additive, so grad_accum compares with grad_accum)."""
    cache = {}

    def get(**top):
        top.pop("pipeline", None)
        key = repr(sorted(top.items()))
        if key not in cache:
            cache[key] = _loss_and_grads({"fsdp": 1}, **top)[1:4]
        return cache[key]

    return get


@pytest.mark.parametrize("name", list(COMBOS))
def test_expert_parallel_matches_one_device(name, reference):
    mesh, top = COMBOS[name]
    params, loss, metrics, grads, hlo = _loss_and_grads(mesh, **top)
    ref_loss, ref_metrics, ref_grads = reference(**top)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for k in ref_metrics:
        np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-5)
    for (path, g), ref in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        rel = np.linalg.norm(g - ref) / np.linalg.norm(ref)
        assert rel <= 1e-5, (jax.tree_util.keystr(path), rel)
    spec = params["layers"]["w_gate"].sharding.spec  # [layers, experts, embed, mlp]
    assert spec[1] == "expert"
    if mesh.get("tensor", 1) > 1:
        assert spec[2:] == ("fsdp", "tensor")
    assert params["layers"]["router"].sharding.spec[-1:] != ("expert",)  # router kept whole
    assert "all-to-all" in hlo  # tokens travel to their experts' devices and back


def test_expert4_holds_a_quarter_of_the_expert_weights():
    """Per-device argument bytes of the compiled train step (params, Adam moments, batch) match
    lmsys.plan.analysis, in which expert=4 holds 1/4 of the expert weights."""
    trainer = _trainer({"expert": 4, "fsdp": 1}, model={"moe_d_ff": 256, "n_shared_experts": 0})
    cfg = trainer.cfg
    whole = analysis.expert_param_bytes_per_device(cfg.model, {})
    quarter = analysis.expert_param_bytes_per_device(cfg.model, {"expert": 4})
    assert whole == 3 * 2 * 8 * 64 * 256 * 4  # w_gate, w_up, w_down x layers x experts x D x F, f32
    assert quarter == whole / 4
    params = analysis.param_bytes_per_device(cfg.model, {"expert": 4})
    dense = sum(analysis.param_bytes_per_device(cfg.model, {}).values()) - whole  # replicated

    assert trainer.state_shardings["params"]["layers"]["w_down"].spec == P(None, "expert")
    batch = trainer.abstract_batch()
    compiled = trainer.step.lower(trainer.abstract_state, batch).compile()
    measured = compiled.memory_analysis().argument_size_in_bytes
    batch_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in batch.values()) / 4  # rows split too
    expert_state = measured - batch_bytes - 3 * dense  # params + 2 Adam moments
    assert abs(expert_state - 3 * quarter) <= 0.15 * 3 * quarter, (expert_state, 3 * quarter)
    assert abs(sum(params.values()) - dense - quarter) < 1


# ----------------------------------------------------------------------------- presets and errors


def test_moe_presets():
    mixtral = from_dict({"model": {"preset": "mixtral-8x7b"}}).model
    assert round(llama.count_params(mixtral) / 1e9, 1) == 46.7  # Mixtral-8x7B's published size
    active = llama.flops_per_token(mixtral, seq_len=0) / 6  # matmul params used per token
    assert 12.5e9 < active < 13.0e9
    tiny = from_dict({"model": {"preset": "tiny-moe"}}).model
    assert (tiny.n_experts, tiny.experts_per_token) == (8, 2)
    params = llama.init(jax.random.key(0), dataclasses.replace(tiny, n_layers=1))
    assert params["layers"]["w_up"].shape == (1, 8, 256, 384)


@pytest.mark.parametrize("mesh, model, message", [
    ({"expert": 4, "fsdp": 1}, {**MOE, "n_experts": 6},
     r"'model.n_experts' = 6: must be divisible by mesh.expert \(4\)"),
    ({"fsdp": 1}, {**MOE, "n_experts": 2, "experts_per_token": 3},
     r"'model.experts_per_token' = 3: must be between 1 and model.n_experts \(2\)"),
    ({"expert": 2, "fsdp": 1}, {},
     r"'mesh.expert' = 2: needs a mixture-of-experts model \(model.n_experts > 0\)"),
    ({"tensor": 2, "fsdp": 1}, {**MOE, "moe_d_ff": 33}, r"'model.moe_d_ff' = 33: must be divisible by mesh.tensor \(2\)"),
    ({"fsdp": 1}, {**MOE, "moe_capacity_factor": -1.0}, "'model.moe_capacity_factor' = -1.0: must be >= 0"),
])
def test_misconfigurations_fail_at_config_time(mesh, model, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(mesh, model=model)


def test_expert_axis_filled_from_the_devices_must_divide_the_experts():
    cfg = tiny_config({"expert": -1, "fsdp": 1}, model={**MOE, "n_experts": 4})  # fills 8
    with pytest.raises(ConfigError, match=r"'model.n_experts' = 4: must be divisible by mesh.expert \(8\)"):
        Trainer(cfg, Rules(build_mesh(cfg.mesh)))
