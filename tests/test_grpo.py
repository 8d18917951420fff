"""GRPO: the clipped policy-ratio loss with the k3 KL term and its gradient equal the paper's
formula written here; group-normalized advantages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import synthetic_batch, tiny_config
from lmsys.models import llama, lora
from lmsys.parallel import Rules, build_mesh
from lmsys.train import adapters
from lmsys.train.grpo import GrpoTrainer, group_advantages

EPS, BETA, G = 0.2, 0.05, 4


def test_group_advantages_are_normalized_per_group():
    r = [1.0, 0.0, 0.0, 1.0, 5.0, 5.0, 5.0, 5.0]
    a = group_advantages(r, G)
    first = np.array([1, 0, 0, 1.0])
    np.testing.assert_allclose(a[:4], (first - 0.5) / (np.std(first, ddof=1) + 1e-4), rtol=1e-6)
    np.testing.assert_array_equal(a[4:], 0.0)  # all equal rewards: no signal


def _rl_batch(cfg, logp_fn, params):
    """synthetic rows with a completion mask, group advantages, and old/ref log-probs moved away
    from the current ones (so the clip and the KL terms are active)."""
    batch = synthetic_batch(cfg)
    rng = np.random.default_rng(3)
    mask = np.zeros_like(batch["loss_mask"])
    for i in range(cfg.batch_size):  # a completion of 4-12 tokens after a prompt of 5-12
        start = rng.integers(5, 12)
        mask[i, start:start + rng.integers(4, 12)] = 1
    batch["loss_mask"] = mask
    adv = group_advantages(rng.normal(size=cfg.batch_size), G)
    batch["advantages"] = np.repeat(adv[:, None], cfg.seq_len, 1).astype(np.float32)
    logp = np.asarray(logp_fn(params, batch))
    batch["old_logps"] = (logp + rng.normal(0, 0.3, logp.shape)).astype(np.float32)
    batch["ref_logps"] = (logp + rng.normal(0, 0.5, logp.shape)).astype(np.float32)
    return batch


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_grpo_loss_and_gradient_equal_the_papers_formula(mode):
    over = {"lora": {"rank": 4, "alpha": 8.0, "targets": "all"}} if mode == "lora" else {}
    cfg = tiny_config(data={"format": "prompts", "source": "arithmetic"},
                      rl={"clip_eps": EPS, "kl_beta": BETA, "group_size": G}, **over)
    trainer = GrpoTrainer(cfg, Rules(build_mesh(cfg.mesh, jax.devices()[:1])))
    params = trainer.init(cfg.seed)["params"]
    if mode == "lora":  # random B: the policy differs from the base
        ad = lora.adapters_of(params)
        keys = iter(jax.random.split(jax.random.key(1), 64))
        params = lora.with_adapters(params, {w: v if w in lora.EXTRA else {**v, "b": 0.1 * jax.random.normal(
            next(keys), v["b"].shape)} for w, v in ad.items()})
    else:
        assert "dpo_reference" in params  # kl_beta > 0: a frozen copy of the starting weights

    def policy_logps(p, batch):  # the model's log-probs of the targets, by hand
        model = lora.merge(p) if mode == "lora" else {k: v for k, v in p.items() if k != "dpo_reference"}
        logits = llama.forward(model, batch["tokens"], batch["positions"], batch["segment_ids"], cfg=cfg.model)[0]
        logp = logits - jax.scipy.special.logsumexp(logits, axis=-1, keepdims=True)
        return jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]

    with jax.default_matmul_precision("highest"):
        batch = _rl_batch(cfg, jax.jit(policy_logps), params)

        def papers_loss(trainable):  # DeepSeekMath eq. 3, token-level normalization
            logp = policy_logps(adapters.join(trainable, frozen), batch)
            ratio = jnp.exp(logp - batch["old_logps"])
            A, m = batch["advantages"], batch["loss_mask"]
            surrogate = jnp.minimum(ratio * A, jnp.clip(ratio, 1 - EPS, 1 + EPS) * A)
            d = batch["ref_logps"] - logp
            kl = jnp.exp(d) - d - 1
            return jnp.sum((-surrogate + BETA * kl) * m) / jnp.sum(m), (ratio, kl)

        trainable, frozen = adapters.split(params)
        (want, (ratio, kl)), want_grad = jax.jit(jax.value_and_grad(papers_loss, has_aux=True))(trainable)
        loss, grad, n, metrics = jax.jit(trainer.grads_and_metrics)(params, batch)

    m, A = batch["loss_mask"], batch["advantages"]
    ratio = np.asarray(ratio)
    clipped = m * (((ratio < 1 - EPS) & (A < 0)) | ((ratio > 1 + EPS) & (A > 0)))
    assert 0.05 < clipped.sum() / m.sum() < 0.95  # both terms of the min are exercised
    assert int(n) == int(m.sum())
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["clip_fraction"]), clipped.sum() / m.sum(), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["kl"]), float((np.asarray(kl) * m).sum() / m.sum()), rtol=1e-5)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grad), jax.tree.leaves(want_grad)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))
    if mode == "full":
        assert set(grad) == set(llama.param_specs(cfg.model))  # the reference copy gets no gradient
