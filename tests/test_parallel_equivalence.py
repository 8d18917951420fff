"""The same model trains to the same numbers on every mesh, with the shardings the rule table
promises. 8 emulated CPU devices; float32."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from common import synthetic_batch, tiny_config
from lmsys.parallel import Rules, build_mesh
from lmsys.train import Trainer

MESHES = {
    "1dev": dict(data=1, fsdp=1, tensor=1),
    "data8": dict(data=8, fsdp=1, tensor=1),
    "fsdp8": dict(data=1, fsdp=8, tensor=1),
    "tensor8": dict(data=1, fsdp=1, tensor=8),
    "d2f2t2": dict(data=2, fsdp=2, tensor=2),
}

# Leaf -> expected PartitionSpec per mesh. Layer params carry a leading (replicated) layers axis.
# kv_heads=4 shards over tensor=2 but is replicated over tensor=8.
EXPECTED = {
    "1dev": dict(embed=P(), wq=P(), wk=P(), wo=P(), w_gate=P(), w_down=P(), attn_norm=P(), batch=P()),
    "data8": dict(embed=P(), wq=P(), wk=P(), wo=P(), w_gate=P(), w_down=P(), attn_norm=P(),
                  batch=P("data")),
    "fsdp8": dict(embed=P(None, "fsdp"), wq=P(None, "fsdp"), wk=P(None, "fsdp"),
                  wo=P(None, None, None, "fsdp"), w_gate=P(None, "fsdp"), w_down=P(None, None, "fsdp"),
                  attn_norm=P(), batch=P("fsdp")),
    "tensor8": dict(embed=P("tensor"), wq=P(None, None, "tensor"), wk=P(), wo=P(None, "tensor"),
                    w_gate=P(None, None, "tensor"), w_down=P(None, "tensor"), attn_norm=P(), batch=P()),
    "d2f2t2": dict(embed=P("tensor", "fsdp"), wq=P(None, "fsdp", "tensor"), wk=P(None, "fsdp", "tensor"),
                   wo=P(None, "tensor", None, "fsdp"), w_gate=P(None, "fsdp", "tensor"),
                   w_down=P(None, "tensor", "fsdp"), attn_norm=P(), batch=P(("data", "fsdp"))),
}


def _run(name, **over):
    cfg = tiny_config(MESHES[name], **over)
    devices = jax.devices()[:1] if name == "1dev" else None
    trainer = Trainer(cfg, Rules(build_mesh(cfg.mesh, devices)))
    state = trainer.init(cfg.seed)
    batch = synthetic_batch(cfg, sharding=trainer.batch_sharding)
    grads = jax.device_get(jax.jit(trainer.grads)(state["params"], batch)[1])
    losses = []
    for _ in range(3):  # the same batch thrice: the loss must fall
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
    return trainer, state, batch, losses, grads


@pytest.fixture(scope="module")
def reference():
    return _run("1dev")


@pytest.mark.parametrize("name", list(MESHES))
def test_same_losses_grads_and_shardings(name, reference):
    trainer, state, batch, losses, grads = _run(name) if name != "1dev" else reference
    _, _, _, ref_losses, ref_grads = reference
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses[2] < losses[0]  # the steps really train
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        ref = dict(jax.tree_util.tree_leaves_with_path(ref_grads))[path]
        rel = np.linalg.norm(g - ref) / np.linalg.norm(ref)
        assert rel <= 1e-5, (jax.tree_util.keystr(path), rel)

    want = EXPECTED[name]
    params = state["params"]
    got = {"embed": params["embed"], "attn_norm": params["layers"]["attn_norm"],
           **{k: params["layers"][k] for k in ("wq", "wk", "wo", "w_gate", "w_down")}}
    for leaf, array in got.items():
        assert array.sharding.spec == want[leaf], (leaf, array.sharding.spec)
    # Adam's moments are laid out like their parameters.
    adam = state["opt_state"][1][0]
    assert adam.mu["layers"]["wq"].sharding.spec == want["wq"]
    assert adam.nu["embed"].sharding.spec == want["embed"]
    assert batch["tokens"].sharding.spec == want["batch"]


@pytest.mark.parametrize("name,tied", [("1dev", True), ("fsdp8", True), ("fsdp8", False), ("d2f2t2", True)])
def test_chunked_loss_remat_gathers_and_lookup_train_the_same(name, tied, reference):
    """loss_chunk (cross-entropy 8 positions at a time, its gradients made in the same pass),
    remat=full (under fsdp each layer's weights gathered once per pass, the gradient
    reduce-scattered by a custom VJP) and the embedding lookup by all-to-all: the losses and
    gradients of one device with none of them. Untied, the lookup's and the head's gradients
    land in different tensors."""
    if tied:
        ref_losses, ref_grads = reference[3], reference[4]
    else:
        _, _, _, ref_losses, ref_grads = _run("1dev", model={"tie_embeddings": False})
    _, _, _, losses, grads = _run(name, loss_chunk=8, remat="full", model={"tie_embeddings": tied})
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        ref = dict(jax.tree_util.tree_leaves_with_path(ref_grads))[path]
        assert np.linalg.norm(g - ref) <= 1e-5 * np.linalg.norm(ref), jax.tree_util.keystr(path)


def test_chunked_loss_sums_scales_its_gradient_by_the_cotangent():
    """chunked_loss_sums makes its gradients for a unit cotangent in the forward pass and scales
    them in the backward: any cotangent gives loss_sums' gradients (float32, 4 chunks)."""
    from lmsys.train.step import chunked_loss_sums, loss_sums

    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(2, 16, 8)).astype(np.float32), rng.normal(size=(8, 32)).astype(np.float32)
    targets, mask = rng.integers(0, 32, (2, 16)), (rng.random((2, 16)) > 0.2).astype(np.float32)
    rules = Rules(build_mesh(tiny_config().mesh, jax.devices()[:1]))
    chunked = lambda x, w: 0.37 * chunked_loss_sums(x, w, targets, mask, 4, rules)[0]  # noqa: E731
    whole = lambda x, w: 0.37 * loss_sums(x @ w, targets, mask)[0]  # noqa: E731
    np.testing.assert_allclose(chunked(x, w), whole(x, w), rtol=1e-6)
    for got, want in zip(jax.grad(chunked, (0, 1))(x, w), jax.grad(whole, (0, 1))(x, w)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_grad_accumulation_equals_one_big_batch():
    """grad_accum=2 gives the loss and gradients of the whole batch at once."""
    results = []
    for accum in (1, 2):
        cfg = tiny_config({"fsdp": 4, "data": 2}, batch_size=16, grad_accum=accum)
        trainer = Trainer(cfg, Rules(build_mesh(cfg.mesh)))
        params = trainer.init(0)["params"]
        loss, grads, _ = jax.jit(trainer.grads)(params, synthetic_batch(cfg, sharding=trainer.batch_sharding))
        results.append((float(loss), jax.device_get(grads)))
    np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(results[1][1]), jax.tree.leaves(results[0][1])):
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b)


def test_zero1_splits_adam_moments_over_data_and_trains_the_same(reference):
    """optimizer.zero1 with data=8: params replicated, each Adam moment split 8 ways; the same
    losses as one device; the compiled step holds ~1/8 of the optimizer state per device."""
    _, _, _, ref_losses, _ = reference
    cfg = tiny_config({"data": 8, "fsdp": 1}, optimizer={"zero1": True})
    trainer = Trainer(cfg, Rules(build_mesh(cfg.mesh)))
    state = trainer.init(cfg.seed)
    assert state["params"]["layers"]["wq"].sharding.spec == P()
    adam = state["opt_state"][1][0]
    assert adam.mu["layers"]["wq"].sharding.spec == P(None, "data")
    assert adam.nu["embed"].sharding.spec == P(None, "data")
    batch = synthetic_batch(cfg, sharding=trainer.batch_sharding)
    losses = []
    for _ in range(3):
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)

    # per-device argument bytes: params whole, moments / 8 (small replicated leaves aside)
    import math

    def nbytes(tree):
        return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))

    plain = Trainer(tiny_config({"data": 8, "fsdp": 1}), trainer.rules)
    sizes = []
    for t in (plain, trainer):
        compiled = t.step.lower(t.abstract_state, t.abstract_batch()).compile()
        sizes.append(compiled.memory_analysis().argument_size_in_bytes)
    moments = nbytes(trainer.abstract_state["opt_state"])
    saved = sizes[0] - sizes[1]
    assert abs(saved - moments * 7 / 8) <= 0.15 * moments * 7 / 8, (saved, moments)

