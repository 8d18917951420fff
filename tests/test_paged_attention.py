"""The Pallas paged decode-attention kernel (CPU interpret mode) against dense references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from common import TINY_MODEL
from jax.experimental.pallas import tpu as pltpu

from lmsys.config import from_dict
from lmsys.kernels import paged_attention, paged_attention_reference, xla_attention
from lmsys.kernels.paged_attention import combine_blocks
from lmsys.models import llama

N, K, H, PS = 8, 2, 32, 8  # 8 q heads over 2 kv heads (GQA), page size 8
POOL = 48
# rows: empty, one token, exactly one page, a page boundary + 1, long (many pages)
LENGTHS = (0, 1, PS, 2 * PS + 1, 11 * PS + 3)
PAGES = 12  # page table width


def _pool(dtype=jnp.float32, seed=0, poison=None):
    """Random q, pools and shuffled page tables (distinct pages per row). With `poison`, every
    pool slot that no row may see (unused pages, slots past a length) holds that value."""
    rng = np.random.default_rng(seed)
    B = len(LENGTHS)
    q = rng.normal(size=(B, N, H)).astype(np.float32)
    k = rng.normal(size=(POOL, PS, K, H)).astype(np.float32)
    v = rng.normal(size=(POOL, PS, K, H)).astype(np.float32)
    perm = rng.permutation(POOL)
    pt = np.zeros((B, PAGES), np.int32)
    used = 0
    visible = np.zeros((POOL, PS), bool)
    for b, n in enumerate(LENGTHS):
        n_pages = -(-n // PS)
        pt[b, :n_pages] = perm[used:used + n_pages]
        used += n_pages
        for t in range(n):
            visible[pt[b, t // PS], t % PS] = True
        # entries past the row's last page: whatever, here a page of another row
        pt[b, n_pages:] = perm[rng.integers(0, POOL, PAGES - n_pages)]
    if poison is not None:
        k[~visible], v[~visible] = poison, poison
    arrs = [jnp.asarray(x, dtype) for x in (q, k, v)]
    return (*arrs, jnp.asarray(LENGTHS, jnp.int32), jnp.asarray(pt))


def _dense(q, k, v, lengths, pt):
    """Independent reference: gather pages into [B, S, K, H], the repo's xla_attention with a
    query at position length - 1 (rows of length 0 -> zeros)."""
    B, P = pt.shape
    k_BSKH = k[pt].reshape(B, P * PS, K, H).astype(jnp.float32)
    v_BSKH = v[pt].reshape(B, P * PS, K, H).astype(jnp.float32)
    valid = (jnp.arange(P * PS)[None, :] < lengths[:, None])[:, :, None, None]
    k_BSKH, v_BSKH = jnp.where(valid, k_BSKH, 0.0), jnp.where(valid, v_BSKH, 0.0)
    out = xla_attention(q[:, None].astype(jnp.float32), k_BSKH, v_BSKH,
                        q_positions_BT=(lengths - 1)[:, None],
                        kv_positions_BS=jnp.arange(P * PS)[None, :])[:, 0]
    return jnp.where((lengths > 0)[:, None, None], out, 0.0)


@functools.partial(jax.jit, static_argnames=("ppb",))
def _kernel(q, k, v, lengths, pt, ppb=None, **kw):
    return paged_attention(q, k, v, lengths, pt, pages_per_block=ppb, **kw)


def _close(got, want, atol):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=0, atol=atol)


@pytest.mark.parametrize("ppb", [1, 3, None])  # 12, 4 blocks (one ragged), one block
def test_matches_dense_reference_fp32(ppb):
    args = _pool()
    want = _dense(*args)
    _close(_kernel(*args, ppb=ppb), want, 1e-5)
    _close(paged_attention_reference(*args), want, 1e-5)
    assert np.all(np.asarray(want[0]) == 0)  # the empty row


def test_bf16_inputs():
    args = _pool(jnp.bfloat16)
    got = _kernel(*args, ppb=2)
    assert got.dtype == jnp.bfloat16
    _close(got, _dense(*args), 2e-2)


@pytest.mark.parametrize("poison", [1e4, np.nan])
def test_garbage_outside_lengths_does_not_leak(poison):
    clean, dirty = _pool(), _pool(poison=poison)
    want = _dense(*clean)
    _close(_kernel(*dirty, ppb=2), want, 1e-5)
    _close(paged_attention_reference(*dirty), want, 1e-5)


def test_split_k_combine():
    """The long row's result is a merge of several blocks; merging equal-weight halves by
    hand checks the combine rule itself, and a wrong (e.g. unweighted) merge would differ."""
    args = _pool()
    one_block = _kernel(*args, ppb=PAGES)
    split = _kernel(*args, ppb=2)
    _close(split, one_block, 1e-5)
    # combine rule: two blocks with different maxima
    rng = np.random.default_rng(1)
    acc = jnp.asarray(rng.normal(size=(2, 1, 4)), jnp.float32)
    m = jnp.asarray([[0.0], [3.0]], jnp.float32)
    l = jnp.asarray([[2.0], [5.0]], jnp.float32)
    want = (acc[0] * np.exp(-3.0) + acc[1]) / (2.0 * np.exp(-3.0) + 5.0)
    _close(combine_blocks(acc, m, l), want, 1e-6)
    # an empty block (l = 0, m = mask value) changes nothing; all empty gives zeros
    empty = jnp.asarray(-0.7 * np.finfo(np.float32).max, jnp.float32)
    _close(combine_blocks(jnp.stack([acc[1], jnp.zeros_like(acc[1])]),
                          jnp.stack([m[1], empty[None]]), jnp.stack([l[1], jnp.zeros(1)])),
           acc[1] / 5.0, 1e-6)
    _close(combine_blocks(jnp.zeros_like(acc), jnp.full_like(m, empty), jnp.zeros_like(l)),
           np.zeros((1, 4)), 0)


def test_layer_axis_of_the_full_pool():
    """All layers' pools plus a traced layer index: only that layer is read."""
    q, k, v, lengths, pt = _pool()
    junk = jnp.full_like(k, jnp.nan)
    k_L, v_L = jnp.stack([junk, k, junk]), jnp.stack([junk, v, junk])
    got = jax.jit(functools.partial(paged_attention, pages_per_block=4))(
        q, k_L, v_L, lengths, pt, layer=jnp.int32(1))
    _close(got, _dense(q, k, v, lengths, pt), 1e-5)
    with pytest.raises(ValueError, match="with `layer`"):
        paged_attention(q, k_L, v_L, lengths, pt)


def test_int8_pages_match_dequantized_reference():
    q, k, v, lengths, pt = _pool()
    # per-(page, slot, kv head) scales for k; per-page scales for v
    k_scale = jnp.max(jnp.abs(k), axis=-1) / 127.0
    v_scale = jnp.max(jnp.abs(v), axis=(1, 2, 3))[:, None, None] / 127.0
    k8 = jnp.round(k / k_scale[..., None]).astype(jnp.int8)
    v8 = jnp.round(v / v_scale[..., None]).astype(jnp.int8)
    k_deq, v_deq = k8 * k_scale[..., None], v8 * v_scale[..., None]
    want = _dense(q, k_deq, v_deq, lengths, pt)
    got = jax.jit(functools.partial(paged_attention, pages_per_block=3))(
        q, k8, v8, lengths, pt, k_scales=k_scale, v_scales=v_scale)
    _close(got, want, 1e-5)
    _close(paged_attention_reference(q, k8, v8, lengths, pt, k_scales=k_scale,
                                     v_scales=v_scale), want, 1e-5)


def test_tpu_flavour_scalar_prefetch():
    """The TPU (Mosaic) variant in TPU interpret mode: page ids through scalar prefetch, split
    over ragged blocks, NaN in unread slots, and int8 pages with per-page scales."""
    want = _dense(*_pool())
    q, k, v, lengths, pt = _pool(poison=np.nan)
    tpu = functools.partial(paged_attention, pages_per_block=5, backend="tpu")
    with pltpu.force_tpu_interpret_mode():
        got = jax.jit(tpu)(q, k, v, lengths, pt)
    _close(got, want, 1e-5)
    q, k, v, lengths, pt = _pool()
    k_scale = jnp.max(jnp.abs(k), axis=(1, 2, 3))[:, None, None] / 127.0
    k8, v8 = (jnp.round(x / k_scale[..., None]).astype(jnp.int8) for x in (k, v))
    deq = [x * k_scale[..., None] for x in (k8, v8)]
    with pltpu.force_tpu_interpret_mode():
        got = jax.jit(tpu)(q, k8[None], v8[None], lengths, pt, layer=0, k_scales=k_scale[None],
                           v_scales=k_scale[None])
    _close(got, _dense(q, *deq, lengths, pt), 1e-5)


def test_bad_shapes_say_what_is_expected():
    q, k, v, lengths, pt = _pool()
    with pytest.raises(ValueError, match="multiple of K"):
        paged_attention(q[:, :3], k, v, lengths, pt)
    with pytest.raises(ValueError, match="backend 'metal'"):
        paged_attention(q, k, v, lengths, pt, backend="metal")


def test_model_decode_step_pallas_equals_xla():
    """A paged cache with shuffled pages: prefill 5 / 12 tokens (xla), then decode one token
    with each impl; padding rows (position -1) are ignored."""
    cfgs = {impl: from_dict({"model": dict(TINY_MODEL, attention_impl=impl)}).model
            for impl in ("xla", "pallas")}
    cfg = cfgs["xla"]
    params = llama.init(jax.random.key(0), cfg)
    ps, n_pages, B = 4, 16, 3
    pt = jnp.asarray(np.random.default_rng(0).permutation(n_pages)[:B * 4].reshape(B, 4),
                     jnp.int32)
    shape = (cfg.n_layers, n_pages, ps, cfg.n_kv_heads, cfg.head_dim)
    cache = {"k": jnp.zeros(shape), "v": jnp.zeros(shape), "page_table": pt}
    lens = np.array([5, 12, 0])
    T = 12
    toks = jax.random.randint(jax.random.key(1), (B, T + 1), 0, cfg.vocab_size)
    pos = np.where(np.arange(T)[None] < lens[:, None], np.arange(T)[None], -1)
    _, aux = llama.forward(params, toks[:, :T], jnp.asarray(pos, jnp.int32), cfg=cfg, cache=cache)
    step_pos = jnp.asarray(np.where(lens > 0, lens, -1)[:, None], jnp.int32)
    step_tok = toks[jnp.arange(B), jnp.asarray(lens)][:, None]
    out = {impl: jax.jit(functools.partial(llama.forward, cfg=c))(
        params, step_tok, step_pos, cache=aux["cache"]) for impl, c in cfgs.items()}
    np.testing.assert_allclose(out["pallas"][0][:2], out["xla"][0][:2], atol=1e-5)
    for name in ("k", "v"):  # same writes (layer > 0 sees layer 0's rounding)
        np.testing.assert_allclose(out["pallas"][1]["cache"][name],
                                   out["xla"][1]["cache"][name], atol=1e-6)
    # and the decode step equals the full forward over the row's tokens
    full, _ = llama.forward(params, toks[1:2, :13], jnp.arange(13)[None], cfg=cfg)
    np.testing.assert_allclose(out["pallas"][0][1, 0], full[0, 12], atol=1e-5)
