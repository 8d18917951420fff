"""The Pallas flash-attention kernel (CPU interpret mode) against the plain-jnp reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from common import TINY_MODEL
from jax.experimental.pallas import tpu as pltpu

from lmsys.config import from_dict
from lmsys.kernels import attention, flash_attention, xla_attention
from lmsys.models import llama

B, N, H = 2, 4, 32


def _inputs(T, K=2, dtype=jnp.float32, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, T, N, H), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, T, K, H), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, T, K, H), jnp.float32).astype(dtype)
    w = jax.random.normal(ks[3], (B, T, N, H), jnp.float32)  # cotangent: a random-weighted sum
    return q, k, v, w


def _packed(T):
    """Three documents per row, boundaries differing between rows."""
    cuts = np.array([[T // 3, 2 * T // 3], [T // 4, T // 2 + 5]])
    return jnp.asarray((np.arange(T)[None, :, None] >= cuts[:, None, :]).sum(-1) + 1, jnp.int32)


def _out_and_grads(fn, q, k, v, w):
    """(out, dq, dk, dv) of sum(fn(q, k, v) * w), one jitted call."""
    def run(q, k, v, w):
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(w.astype(out.dtype)))
    return jax.jit(run)(q, k, v, w)


def _flash(causal=True, seg=None, window=None, cap=None, bq=32, bk=32, **kw):
    return lambda q, k, v: flash_attention(q, k, v, causal=causal, segment_ids=seg,
                                           sliding_window=window, logits_soft_cap=cap,
                                           block_q=bq, block_k=bk, **kw)


def _ref(causal=True, seg=None, window=None, cap=None, **_):
    return lambda q, k, v: xla_attention(q, k, v, q_segment_ids_BT=seg, causal=causal,
                                         sliding_window=window, logits_soft_cap=cap)


def _assert_close(got, want, rtol):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    scale = max(float(np.abs(want).max()), 1.0)
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale)


CASES = {
    "causal_gqa": {"T": 64},
    "noncausal_mha": {"T": 64, "K": 4, "causal": False},
    "segments": {"T": 64, "seg": True},
    "window": {"T": 64, "window": 20},
    "softcap": {"T": 64, "cap": 5.0},
    "ragged_len_segments": {"T": 100, "seg": True},
    "ragged_len_mqa_all": {"T": 100, "K": 1, "seg": True, "window": 17, "cap": 3.0, "bk": 64},
}


@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_grads_match_reference_fp32(name):
    case = dict(CASES[name])
    T, K = case.pop("T"), case.pop("K", 2)
    if case.pop("seg", False):
        case["seg"] = _packed(T)
    q, k, v, w = _inputs(T, K)
    got = _out_and_grads(_flash(**case), q, k, v, w)
    want = _out_and_grads(_ref(**case), q, k, v, w)
    for g, r in zip(got, want):
        assert g.shape == r.shape and g.dtype == r.dtype
        _assert_close(g, r, 1e-5)


def test_bf16_matches_fp32_reference():
    T, seg = 100, _packed(100)
    q, k, v, w = _inputs(T, dtype=jnp.bfloat16)
    got = _out_and_grads(_flash(seg=seg, cap=20.0), q, k, v, w)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want = _out_and_grads(_ref(seg=seg, cap=20.0), *f32, w)
    assert all(g.dtype == jnp.bfloat16 for g in got)
    for g, r in zip(got, want):
        _assert_close(g, r, 2e-2)


def test_blocks_outside_causal_and_window_band_are_never_computed():
    """NaN-poisoned blocks that a q block must skip: any computed skipped block turns 0 * NaN
    into NaN (probabilities there are 0, but p @ v and dO @ v.T still touch the values)."""
    T, bs = 128, 32
    q, k, v, w = _inputs(T)
    nan = jnp.float32(jnp.nan)
    for window, bad_kv, good_rows in ((None, [3], slice(0, 96)), (32, [0, 3], slice(64, 96))):
        kw = {"window": window, "bq": bs, "bk": bs}
        v_bad = v
        for blk in bad_kv:
            v_bad = v_bad.at[:, blk * bs:(blk + 1) * bs].set(nan)
        out, dq, _, _ = _out_and_grads(_flash(**kw), q, k, v_bad, w)
        r_out, r_dq, _, _ = _out_and_grads(_ref(**kw), q, k, v, w)
        _assert_close(out[:, good_rows], r_out[:, good_rows], 1e-5)
        _assert_close(dq[:, good_rows], r_dq[:, good_rows], 1e-5)
        # dk/dv kernel: poison the cotangent of q blocks that k block 1 (keys 32..63) cannot see
        # (block 0; with the window also block 3); the reference gets zeros there instead.
        w_bad = w.at[:, :bs].set(nan)
        if window is not None:
            w_bad = w_bad.at[:, 3 * bs:].set(nan)
        _, _, dk, dv = _out_and_grads(_flash(**kw), q, k, v, w_bad)
        r_dk, r_dv = _out_and_grads(_ref(**kw), q, k, v, jnp.nan_to_num(w_bad, nan=0.0))[2:]
        good_keys = slice(bs, T) if window is None else slice(bs, 2 * bs)
        _assert_close(dk[:, good_keys], r_dk[:, good_keys], 1e-5)
        _assert_close(dv[:, good_keys], r_dv[:, good_keys], 1e-5)


def _has_pallas(fn, *args):
    return "pallas_call" in str(jax.make_jaxpr(fn)(*args))


def test_dispatch():
    T = 64
    q, k, v, _ = _inputs(T)
    seg = _packed(T)
    call = lambda impl, **kw: (lambda q, k, v: attention(q, k, v, q_segment_ids_BT=seg,
                                                         impl=impl, **kw))
    out_xla = jax.jit(call("xla"))(q, k, v)
    _assert_close(jax.jit(call("pallas"))(q, k, v), out_xla, 1e-5)
    assert _has_pallas(call("pallas"), q, k, v)
    assert not _has_pallas(call("xla"), q, k, v)
    assert not _has_pallas(call("auto"), q, k, v)  # CPU: interpret mode is slow, auto is xla
    # explicit positions (the KV-cache path) fall back to xla under impl="pallas"
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    assert not _has_pallas(call("pallas", q_positions_BT=pos, kv_positions_BS=pos), q, k, v)
    with pytest.raises(ValueError, match="impl"):
        attention(q, k, v, impl="cudnn")


def test_model_forward_pallas_equals_xla():
    cfgs = {impl: from_dict({"model": dict(TINY_MODEL, attention_impl=impl)}).model
            for impl in ("xla", "pallas")}
    params = llama.init(jax.random.key(0), cfgs["xla"])
    T = 40
    tokens = jax.random.randint(jax.random.key(1), (2, T), 0, cfgs["xla"].vocab_size)
    seg = _packed(T)
    pos = jnp.broadcast_to(jnp.arange(T), (2, T))
    logits = {impl: jax.jit(lambda p, t, s, c=cfg: llama.forward(p, t, pos, s, cfg=c)[0])(
        params, tokens, seg) for impl, cfg in cfgs.items()}
    _assert_close(logits["pallas"], logits["xla"], 1e-5)


def test_tpu_flavour_in_tpu_interpret_mode():
    """The TPU wrapper ([B, N, T, H] layout, Mosaic compiler params) under TPU interpret mode."""
    T = 64
    q, k, v, w = _inputs(T)
    seg = _packed(T)
    with pltpu.force_tpu_interpret_mode():
        got = _out_and_grads(_flash(seg=seg, cap=5.0, backend="tpu"), q, k, v, w)
    want = _out_and_grads(_ref(seg=seg, cap=5.0), q, k, v, w)
    for g, r in zip(got, want):
        _assert_close(g, r, 1e-5)


def test_gpu_flavour_pads_head_dim():
    """The GPU wrapper pads head_dim to a power of two (Triton tiles); interpret mode here."""
    q, k, v, w = _inputs(40)
    q, k, v, w = q[..., :24], k[..., :24], v[..., :24], w[..., :24]
    got = _out_and_grads(_flash(backend="gpu", bq=16, bk=16), q, k, v, w)
    want = _out_and_grads(_ref(), q, k, v, w)
    for g, r in zip(got, want):
        _assert_close(g, r, 1e-5)


@pytest.mark.parametrize("mesh", [dict(data=2, fsdp=1, tensor=4), dict(data=1, fsdp=1, tensor=8)],
                         ids=["data2-tensor4", "tensor8-kv-replicated"])
def test_train_step_with_pallas_on_a_mesh_matches_xla(mesh):
    """The kernel runs per shard under shard_map (batch over data, heads over tensor; with 4 KV
    heads on tensor=8 each device narrows to its one KV head): same loss and grads as xla."""
    from common import synthetic_batch, tiny_config

    from lmsys.parallel import Rules, build_mesh
    from lmsys.train import Trainer

    out = {}
    for impl in ("xla", "pallas"):
        cfg = tiny_config(mesh, model={"attention_impl": impl})
        trainer = Trainer(cfg, Rules(build_mesh(cfg.mesh)))
        params = trainer.init(0)["params"]
        batch = synthetic_batch(cfg, sharding=trainer.batch_sharding)
        jaxpr = str(jax.make_jaxpr(trainer.grads)(params, batch))
        assert ("pallas_call" in jaxpr and "shard_map" in jaxpr) == (impl == "pallas")
        loss, grads, _ = jax.jit(trainer.grads)(params, batch)
        out[impl] = (float(loss), jax.device_get(grads))
    assert out["pallas"][0] == pytest.approx(out["xla"][0], rel=1e-5)
    for a, b in zip(jax.tree.leaves(out["pallas"][1]), jax.tree.leaves(out["xla"][1])):
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b)
