"""The Llama model's behaviour: packing isolation, KV-cache decoding, remat, RoPE scaling."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import tiny_config
from lmsys.config import from_dict
from lmsys.models import llama


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config().model
    return cfg, llama.init(jax.random.key(0), cfg)


def _tokens(n, T, vocab, seed=0):
    return jax.random.randint(jax.random.key(seed), (n, T), 0, vocab)


def test_packed_documents_do_not_see_each_other(model):
    cfg, params = model
    T = 16
    toks = _tokens(1, T, cfg.vocab_size)
    seg = jnp.array([[1] * 6 + [2] * 10])
    pos = jnp.array([list(range(6)) + list(range(10))])
    packed, _ = llama.forward(params, toks, pos, seg, cfg=cfg)
    alone, _ = llama.forward(params, toks[:, 6:], pos[:, 6:], cfg=cfg)
    np.testing.assert_allclose(packed[:, 6:], alone, atol=1e-5)
    # changing the first document changes nothing in the second
    other = toks.at[:, :6].set((toks[:, :6] + 1) % cfg.vocab_size)
    changed, _ = llama.forward(params, other, pos, seg, cfg=cfg)
    np.testing.assert_allclose(changed[:, 6:], packed[:, 6:], atol=1e-6)
    assert not np.allclose(changed[:, :6], packed[:, :6])


def test_kv_cache_decoding_equals_full_forward(model):
    cfg, params = model
    B, T = 2, 12
    toks = _tokens(B, T, cfg.vocab_size, seed=1)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    full, _ = llama.forward(params, toks, pos, cfg=cfg)
    cache = llama.init_cache(cfg, B, 16)
    prefill, aux = llama.forward(params, toks[:, :8], pos[:, :8], cfg=cfg, cache=cache)
    np.testing.assert_allclose(prefill, full[:, :8], atol=1e-5)
    cache = aux["cache"]
    for t in range(8, T):
        step, aux = llama.forward(params, toks[:, t:t + 1], pos[:, t:t + 1], cfg=cfg, cache=cache)
        cache = aux["cache"]
        np.testing.assert_allclose(step[:, 0], full[:, t], atol=1e-5)


@pytest.mark.parametrize("remat", ["full", "selective"])
def test_remat_gives_the_same_gradients(model, remat):
    cfg, params = model
    toks = _tokens(2, 16, cfg.vocab_size, seed=2)
    pos = jnp.broadcast_to(jnp.arange(16), (2, 16))

    def loss(p, policy):
        return jnp.mean(llama.forward(p, toks, pos, cfg=cfg, remat=policy)[0] ** 2)

    ref = jax.grad(loss)(params, "none")
    got = jax.grad(loss)(params, remat)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bfloat16_compute_stays_close_to_float32(model):
    cfg, params = model
    toks = _tokens(2, 16, cfg.vocab_size, seed=3)
    pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
    f32, _ = llama.forward(params, toks, pos, cfg=cfg)
    bf16, _ = llama.forward(params, toks, pos, cfg=cfg, dtype=jnp.bfloat16)
    assert bf16.dtype == jnp.float32  # logits stay float32 for the loss
    assert float(jnp.max(jnp.abs(bf16 - f32))) < 0.05


def test_llama3_rope_scaling():
    cfg = from_dict({"model": {"preset": "8b"}}).model
    plain = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim))
    scaled = np.asarray(llama.rope_frequencies(cfg))
    wavelen = 2 * math.pi / plain
    high = wavelen < cfg.rope_original_max_position / cfg.rope_high_freq_factor
    low = wavelen > cfg.rope_original_max_position / cfg.rope_low_freq_factor
    np.testing.assert_allclose(scaled[high], plain[high], rtol=1e-6)  # short wavelengths kept
    np.testing.assert_allclose(scaled[low], plain[low] / 8.0, rtol=1e-6)  # long ones / factor
    mid = ~high & ~low
    assert mid.any() and np.all(scaled[mid] < plain[mid]) and np.all(scaled[mid] > plain[mid] / 8)


def test_preset_sizes():
    sizes = {name: llama.count_params(from_dict({"model": {"preset": name}}).model)
             for name in ("1b", "8b", "70b")}
    assert abs(sizes["1b"] / 1.236e9 - 1) < 0.01  # Llama-3.2-1B: 1.24B
    assert abs(sizes["8b"] / 8.030e9 - 1) < 0.01  # Llama-3.1-8B: 8.03B
    assert abs(sizes["70b"] / 70.55e9 - 1) < 0.01  # Llama-3.1-70B: 70.6B
