"""The Pallas paged decode-attention kernel (CPU interpret mode) against a float64 reference over a
contiguous cache."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from common import tiny_config
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P
from pairwise import pairwise, uncovered_pairs

from lmsys.kernels import paged_attention, paged_attention_reference
from lmsys.kernels.paged_attention import combine_blocks, supported
from lmsys.models import llama
from lmsys.parallel import Rules, build_mesh
from lmsys.parallel.sharded_kernels import POOL_AXES, sharded_paged_attention

# ----------------------------------------------------------------------------- the case grid
# Each row's table has PAGES entries; `lengths` profiles: "edge" cycles 1, 0 (a padding row:
# output zeros), one page exactly, one page + 1, every page; "ragged" draws non-multiples of the
# page size; "full" uses every page of the table. pages_per_block None is the default (here one
# block per row); 4 leaves a ragged last block.
PAGES = 6
PAGED_FACTORS = {
    "batch": (1, 2, 5),
    "lengths": ("edge", "ragged", "full"),
    "page_size": (8, 16),
    "heads": (1, 4, 8),
    "kv_heads": (1, 2, 8),
    "head_dim": (32, 64, 128),
    "pages_per_block": (1, 4, None),
    "dtype": ("float32", "bfloat16"),
}
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}  # norm-wise, vs the float64 reference
CASES = pairwise(PAGED_FACTORS, _valid := lambda case: case["heads"] % case["kv_heads"] == 0)
UNUSED_PAGES = 5


def _case_id(case):
    return (f"b{case['batch']}-{case['lengths']}-ps{case['page_size']}-n{case['heads']}"
            f"k{case['kv_heads']}h{case['head_dim']}-ppb{case['pages_per_block']}-{case['dtype']}")


def _paged_case(case, seed, poison=np.nan):
    """(q, k_pages, v_pages, lengths, page_table) and the same keys/values as a contiguous
    cache [B, PAGES * page_size, K, H]. Rows own shuffled pages of a pool that also has unused
    pages; every pool slot no row may see (unused pages, slots past a row's length) holds
    `poison`, and table entries past a row's pages point at unused pages."""
    rng = np.random.default_rng(seed)
    B, ps, N, K, H = (case[n] for n in ("batch", "page_size", "heads", "kv_heads", "head_dim"))
    S = PAGES * ps
    lengths = {"edge": [(1, 0, ps, ps + 1, S)[b % 5] for b in range(B)],
               "ragged": [ps * rng.integers(0, PAGES) + rng.integers(1, ps) for _ in range(B)],
               "full": [S] * B}[case["lengths"]]
    q = rng.standard_normal((B, N, H))
    k_BSKH, v_BSKH = (rng.standard_normal((B, S, K, H)) for _ in range(2))
    used = [-(-n // ps) for n in lengths]
    n_pool = sum(used) + UNUSED_PAGES
    ids = rng.permutation(n_pool)
    unused = ids[sum(used):]
    pt = rng.choice(unused, (B, PAGES))  # past a row's pages: unused (poisoned) pages
    k_pages, v_pages = (rng.standard_normal((n_pool, ps, K, H)) if poison is None
                        else np.full((n_pool, ps, K, H), poison) for _ in range(2))
    start = 0
    for b, n in enumerate(lengths):
        pt[b, :used[b]] = ids[start:start + used[b]]
        start += used[b]
        for t in range(n):
            k_pages[pt[b, t // ps], t % ps] = k_BSKH[b, t]
            v_pages[pt[b, t // ps], t % ps] = v_BSKH[b, t]
    dtype = jnp.dtype(case["dtype"])
    paged = (*(jnp.asarray(x, dtype) for x in (q, k_pages, v_pages)),
             jnp.asarray(lengths, jnp.int32), jnp.asarray(pt, jnp.int32))
    return paged, tuple(jnp.asarray(x, dtype) for x in (k_BSKH, v_BSKH))


def _reference_f64(q_BNH, k_BSKH, v_BSKH, lengths_B, window=None, soft_cap=None):
    """Decode attention over a contiguous cache in float64: row b's query sees its first
    lengths[b] keys (with a window: the last `window` of them); a row of length 0 gives zeros."""
    with jax.enable_x64(True):
        q, k, v = (jnp.asarray(np.asarray(x, np.float64)) for x in (q_BNH, k_BSKH, v_BSKH))
        N, H = q.shape[1:]
        G = N // k.shape[2]
        k, v = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
        s_BNS = jnp.einsum("bnh,bsnh->bns", q, k) * H ** -0.5
        if soft_cap is not None:
            s_BNS = soft_cap * jnp.tanh(s_BNS / soft_cap)
        visible_BS = jnp.arange(k.shape[1])[None, :] < jnp.asarray(lengths_B)[:, None]
        if window is not None:
            visible_BS &= jnp.arange(k.shape[1])[None, :] >= jnp.asarray(lengths_B)[:, None] - window
        s_BNS = jnp.where(visible_BS[:, None], s_BNS, -jnp.inf)
        p_BNS = jnp.exp(s_BNS - jnp.max(s_BNS, axis=-1, keepdims=True))
        out = jnp.einsum("bns,bsnh->bnh", p_BNS / p_BNS.sum(-1, keepdims=True), v)
        return np.asarray(jnp.where(visible_BS.any(-1)[:, None, None], out, 0.0))


def _rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / np.linalg.norm(want)


@functools.partial(jax.jit, static_argnames=("ppb",))
def _kernel(q, k, v, lengths, pt, ppb=None, **kw):
    return paged_attention(q, k, v, lengths, pt, pages_per_block=ppb, **kw)


def _close(got, want, atol):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=0, atol=atol)


@pytest.mark.parametrize("case", CASES, ids=map(_case_id, CASES))
def test_matches_contiguous_float64_reference(case):
    """NaN in every slot the rows may not see catches a read outside the page table or past a
    length; interpret mode fills the kernel's output buffers with NaN first, so an unwritten
    element (a skipped block's partial result) shows up as NaN too."""
    (q, k_pages, v_pages, lengths, pt), (k, v) = _paged_case(case, seed=CASES.index(case))
    got = _kernel(q, k_pages, v_pages, lengths, pt, ppb=case["pages_per_block"])
    assert got.dtype == q.dtype and got.shape == q.shape
    got = np.asarray(got, np.float32)
    assert np.isfinite(got).all()
    assert (got[np.asarray(lengths) == 0] == 0).all()
    assert _rel_err(got, _reference_f64(q, k, v, lengths)) <= TOLERANCE[case["dtype"]]


def test_pairwise_cases_cover_every_pair():
    assert len(CASES) <= 24 and all(map(_valid, CASES))
    assert not uncovered_pairs(CASES, PAGED_FACTORS, _valid)


# A fixed case for the tests below: 8 q heads over 2 kv heads, page size 8, rows of length 1,
# 0, one page, one page + 1 and every page.
FIXED = {"batch": 5, "lengths": "edge", "page_size": 8, "heads": 8, "kv_heads": 2,
         "head_dim": 32, "pages_per_block": None, "dtype": "float32"}


def test_split_k_combine():
    """The long row's result is a merge of several blocks; merging equal-weight halves by
    hand checks the combine rule itself, and a wrong (e.g. unweighted) merge would differ."""
    args, _ = _paged_case(FIXED, seed=0)
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
    (q, k, v, lengths, pt), contiguous = _paged_case(FIXED, seed=1)
    junk = jnp.full_like(k, jnp.nan)
    k_L, v_L = jnp.stack([junk, k, junk]), jnp.stack([junk, v, junk])
    got = jax.jit(functools.partial(paged_attention, pages_per_block=4))(
        q, k_L, v_L, lengths, pt, layer=jnp.int32(1))
    assert _rel_err(got, _reference_f64(q, *contiguous, lengths)) <= 1e-5
    with pytest.raises(ValueError, match="with `layer`"):
        paged_attention(q, k_L, v_L, lengths, pt)


def _int8(pages, scale):
    """int8 pages and their dequantized values for scales broadcasting to [pages, slots, K]."""
    pages8 = jnp.round(pages / scale[..., None]).astype(jnp.int8)
    return pages8, pages8 * scale[..., None]


def _gathered(pages, pt):
    """A row's pages in table order: the contiguous cache [B, PAGES * page_size, K, H]."""
    return pages[pt].reshape(pt.shape[0], -1, *pages.shape[2:])


def test_int8_pages_match_dequantized_reference():
    (q, k, v, lengths, pt), _ = _paged_case(FIXED, seed=2, poison=None)
    # per-(page, slot, kv head) scales for k; per-page scales for v
    k_scale = jnp.max(jnp.abs(k), axis=-1) / 127.0
    v_scale = jnp.max(jnp.abs(v), axis=(1, 2, 3))[:, None, None] / 127.0
    (k8, k_deq), (v8, v_deq) = _int8(k, k_scale), _int8(v, v_scale)
    want = _reference_f64(q, _gathered(k_deq, pt), _gathered(v_deq, pt), lengths)
    got = jax.jit(functools.partial(paged_attention, pages_per_block=3))(
        q, k8, v8, lengths, pt, k_scales=k_scale, v_scales=v_scale)
    assert _rel_err(got, want) <= 1e-5
    ref = paged_attention_reference(q, k8, v8, lengths, pt, k_scales=k_scale, v_scales=v_scale)
    assert _rel_err(ref, want) <= 1e-5


def test_tpu_flavour_scalar_prefetch():
    """The TPU (Mosaic) variant in TPU interpret mode (output buffers start as NaN): page ids
    through scalar prefetch, split over ragged blocks, NaN in unread slots, and int8 pages with
    per-page scales."""
    (q, k, v, lengths, pt), contiguous = _paged_case(FIXED, seed=3)
    tpu = jax.jit(functools.partial(paged_attention, pages_per_block=4, backend="tpu"))
    with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams(uninitialized_memory="nan")):
        got = tpu(q, k, v, lengths, pt)
    assert np.isfinite(got).all() and _rel_err(got, _reference_f64(q, *contiguous, lengths)) <= 1e-5
    (q, k, v, lengths, pt), _ = _paged_case(FIXED, seed=4, poison=None)
    scale = jnp.max(jnp.abs(k), axis=(1, 2, 3))[:, None, None] / 127.0
    (k8, k_deq), (v8, v_deq) = _int8(k, scale), _int8(v, scale)
    with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams(uninitialized_memory="nan")):
        got = tpu(q, k8[None], v8[None], lengths, pt, layer=0, k_scales=scale[None],
                  v_scales=scale[None])
    want = _reference_f64(q, _gathered(k_deq, pt), _gathered(v_deq, pt), lengths)
    assert np.isfinite(got).all() and _rel_err(got, want) <= 1e-5


def test_sliding_window_skips_pages_before_it():
    """A window of 10 with a logits soft cap: every page wholly before a row's window holds NaN
    (a recycled page), which only a read would show; slots before the window inside its first
    page are masked. GPU/CPU flavour over split-K blocks, and the TPU flavour."""
    (q, k, v, lengths, pt), contiguous = _paged_case(FIXED, seed=5)
    window, ps = 10, FIXED["page_size"]
    k, v = np.array(k), np.array(v)
    for b, n in enumerate(np.asarray(lengths)):
        for page in np.asarray(pt)[b, :max(n - window, 0) // ps]:
            k[page], v[page] = np.nan, np.nan
    want = _reference_f64(q, *contiguous, lengths, window=window, soft_cap=2.0)
    options = dict(sliding_window=window, logits_soft_cap=2.0)
    got = jax.jit(functools.partial(paged_attention, pages_per_block=2, **options))(q, k, v, lengths, pt)
    assert np.isfinite(got).all() and _rel_err(got, want) <= 1e-5
    tpu = jax.jit(functools.partial(paged_attention, pages_per_block=4, backend="tpu", **options))
    with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams(uninitialized_memory="nan")):
        got = tpu(q, k, v, lengths, pt)
    assert np.isfinite(got).all() and _rel_err(got, want) <= 1e-5
    ref = paged_attention_reference(q, jnp.nan_to_num(k), jnp.nan_to_num(v), lengths, pt, **options)
    assert _rel_err(ref, want) <= 1e-5
    with pytest.raises(ValueError, match="sliding_window=0 must be >= 1"):
        paged_attention(q, k, v, lengths, pt, sliding_window=0)


def test_gpu_takes_only_head_dims_it_reads_in_place():
    """On GPU a head_dim that Triton's tiles would pad copies the whole pool on every call (and
    can double the decode step's memory): the model's decode takes the gather + XLA path there."""
    assert all(supported(h, "gpu") for h in (16, 64, 128, 256))
    assert not any(supported(h, "gpu") for h in (8, 48, 80, 96))
    assert supported(48, "tpu") and supported(48, "cpu") and not supported(64, "metal")


def test_bad_shapes_say_what_is_expected():
    (q, k, v, lengths, pt), _ = _paged_case(FIXED, seed=0)
    with pytest.raises(ValueError, match="multiple of K"):
        paged_attention(q[:, :3], k, v, lengths, pt)
    with pytest.raises(ValueError, match="backend 'metal'"):
        paged_attention(q, k, v, lengths, pt, backend="metal")
    rules = Rules(build_mesh(tiny_config({"data": 2, "fsdp": 1, "tensor": 4}).mesh))
    with pytest.raises(ValueError, match="batch 5 does not split over the 2 shards"):
        sharded_paged_attention(q, k[None], v[None], lengths, pt, layer=0, rules=rules,
                                pool_spec=P(None, "data"))


# Gemma-style layers: a window of 4 in layer 0, global layer 1, soft-capped logits
WINDOWED = {"sliding_window": 4, "global_every": 2, "attn_soft_cap": 5.0, "query_pre_attn_scalar": 8.0}


@pytest.mark.parametrize("mesh, specs, model", [
    (None, None, {}),
    ({"data": 1, "fsdp": 2, "tensor": 4}, "P('fsdp', 'tensor'), P(None, None, None, 'tensor')", {}),
    ({"data": 2, "fsdp": 1, "tensor": 4}, "P('data', 'tensor'), P(None, 'data', None, 'tensor')", {}),
    (None, None, WINDOWED),
], ids=["one-device", "fsdp2-tensor4", "data2-tensor4", "windowed"])
def test_model_decode_step_pallas_equals_xla(mesh, specs, model):
    """A paged cache with shuffled pages: prefill 5 / 12 / 0 / 9 tokens (xla), then decode one
    token with each impl; padding rows (position -1) are ignored. On a mesh the pool is laid
    out as the engine lays it out (KV heads over tensor, pages over data: rows 0-1 own pages
    0-7, rows 2-3 pages 8-15) and the kernel runs per shard of it under shard_map. "windowed":
    local and global layers, the decode step of a local layer sees its window only."""
    cfgs = {impl: tiny_config(mesh, model={"attention_impl": impl, **model})
            for impl in ("xla", "pallas")}
    cfg = cfgs["xla"].model
    rules = Rules(build_mesh(cfgs["xla"].mesh)) if mesh else None
    params = llama.init(jax.random.key(0), cfg)
    ps, n_pages, B = 4, 16, 4
    rng = np.random.default_rng(0)
    pt = jnp.asarray(np.concatenate([rng.permutation(8), 8 + rng.permutation(8)]).reshape(B, 4),
                     jnp.int32)
    shape = (cfg.n_layers, n_pages, ps, cfg.n_kv_heads, cfg.head_dim)
    pool = jnp.zeros(shape) if rules is None else jax.device_put(
        jnp.zeros(shape), rules.sharding(POOL_AXES, shape))
    cache = {"k": pool, "v": pool, "page_table": pt}
    lens = np.array([5, 12, 0, 9])
    T = 12
    toks = jax.random.randint(jax.random.key(1), (B, T + 1), 0, cfg.vocab_size)
    pos = np.where(np.arange(T)[None] < lens[:, None], np.arange(T)[None], -1)
    forward = lambda c: jax.jit(functools.partial(llama.forward, cfg=c.model, rules=rules))
    _, aux = forward(cfgs["xla"])(params, toks[:, :T], jnp.asarray(pos, jnp.int32), cache=cache)
    step_pos = jnp.asarray(np.where(lens > 0, lens, -1)[:, None], jnp.int32)
    step_tok = toks[jnp.arange(B), jnp.asarray(lens)][:, None]
    out = {impl: forward(c)(params, step_tok, step_pos, cache=aux["cache"])
           for impl, c in cfgs.items()}
    if rules is not None:  # the kernel runs per shard of the pool
        jaxpr = str(jax.make_jaxpr(forward(cfgs["pallas"]))(params, step_tok, step_pos,
                                                             cache=aux["cache"]))
        assert "pallas_call" in jaxpr and f"in_specs=({specs}, " in jaxpr  # q, k pool
    valid = lens > 0
    np.testing.assert_allclose(out["pallas"][0][valid], out["xla"][0][valid], atol=1e-5)
    for name in ("k", "v"):  # same writes (layer > 0 sees layer 0's rounding)
        np.testing.assert_allclose(out["pallas"][1]["cache"][name],
                                   out["xla"][1]["cache"][name], atol=1e-6)
    # and the decode step equals the full forward over the row's tokens
    full, _ = llama.forward(params, toks[1:2, :13], jnp.arange(13)[None], cfg=cfg)
    np.testing.assert_allclose(out["pallas"][0][1, 0], full[0, 12], atol=1e-5)
