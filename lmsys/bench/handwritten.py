"""A minimal Llama training step in plain JAX + optax: the baseline lmsys.bench.train times
lmsys's train step against. Self-contained on purpose: it does not import lmsys.

    optimizer = make_optimizer(lr=3e-4, warmup_steps=10, total_steps=100, min_lr_ratio=0.1,
                               b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, clip_norm=1.0)
    step = make_train_step(optimizer, rope_theta=1e4, norm_eps=1e-6)
    params, opt_state, loss = step(params, optimizer.init(params), batch)   # donates both

`params` has the layout of lmsys.models.llama.init: {"embed" [V, D], "layers": {per-layer
arrays stacked on a leading layer axis}, "final_norm" [D], and "unembed" [D, V] when the
embeddings are untied}. Head counts, head size, tying and qkv bias are read off the arrays.
`batch` holds int32 tokens/targets/positions/segment_ids and a float32 loss_mask, all [B, T].
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from jax.ad_checkpoint import checkpoint_name

NO_WEIGHT_DECAY = ("attn_norm", "mlp_norm", "final_norm", "bq", "bk", "bv")
REMAT = {
    "full": None,  # recompute the whole layer in the backward pass
    "selective": jax.checkpoint_policies.save_only_these_names(
        "q_proj", "k_proj", "v_proj", "attn_out", "mlp_out"),
}


# ----------------------------------------------------------------------------- the model


def rms_norm(x, w, eps):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * w.astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(head_dim, theta, scaling=None):
    """RoPE inverse frequencies; `scaling` = dict(factor, low_freq_factor, high_freq_factor,
    original_max_position) applies Llama-3 frequency scaling."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if not scaling:
        return inv_freq
    f, lo, hi, orig = (scaling[k] for k in
                       ("factor", "low_freq_factor", "high_freq_factor", "original_max_position"))
    wavelen = 2 * math.pi / inv_freq
    smooth = (orig / wavelen - lo) / (hi - lo)
    out = jnp.where(wavelen > orig / lo, inv_freq / f, inv_freq)
    medium = (wavelen >= orig / hi) & (wavelen <= orig / lo)
    return jnp.where(medium, (1 - smooth) * inv_freq / f + smooth * inv_freq, out)


def rope(x, positions, inv_freq):
    """Rotates the two halves of each head (Hugging Face layout), in float32."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
    sin, cos = jnp.sin(angles)[:, :, None], jnp.cos(angles)[:, :, None]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention(q, k, v, segment_ids):
    """Causal grouped-query attention within each segment; float32 scores and softmax."""
    B, T, N, H = q.shape
    K = k.shape[2]
    q = q.reshape(B, T, K, N // K, H)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) * H ** -0.5
    t = jnp.arange(T)
    mask = (t[None, :] <= t[:, None]) & (segment_ids[:, :, None] == segment_ids[:, None, :])
    scores = jnp.where(mask[:, None, None], scores, -1e30)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(B, T, N, H).astype(q.dtype)


def layer(x, lp, positions, segment_ids, inv_freq, eps):
    lp = jax.tree.map(lambda w: w.astype(x.dtype), lp)
    h = rms_norm(x, lp["attn_norm"], eps)
    q = jnp.einsum("btd,dnh->btnh", h, lp["wq"])
    k = jnp.einsum("btd,dkh->btkh", h, lp["wk"])
    v = jnp.einsum("btd,dkh->btkh", h, lp["wv"])
    if "bq" in lp:
        q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
    q = checkpoint_name(rope(q, positions, inv_freq), "q_proj")
    k = checkpoint_name(rope(k, positions, inv_freq), "k_proj")
    v = checkpoint_name(v, "v_proj")
    o = attention(q, k, v, segment_ids)
    x = x + checkpoint_name(jnp.einsum("btnh,nhd->btd", o, lp["wo"]), "attn_out")

    h = rms_norm(x, lp["mlp_norm"], eps)
    hidden = jax.nn.silu(h @ lp["w_gate"]) * (h @ lp["w_up"])
    return x + checkpoint_name(hidden @ lp["w_down"], "mlp_out")


def loss_fn(params, batch, *, rope_theta, norm_eps, rope_scaling=None, dtype=jnp.float32,
            remat="none"):
    """Mean next-token cross-entropy over the tokens where loss_mask is 1."""
    inv_freq = rope_inv_freq(params["layers"]["wq"].shape[-1], rope_theta, rope_scaling)
    x = params["embed"].astype(dtype)[batch["tokens"]]

    def body(x, lp):
        return layer(x, lp, batch["positions"], batch["segment_ids"], inv_freq, norm_eps), None

    if remat != "none":
        body = jax.checkpoint(body, policy=REMAT[remat], prevent_cse=False)
    x, _ = jax.lax.scan(body, x, params["layers"])
    x = rms_norm(x, params["final_norm"].astype(dtype), norm_eps)
    unembed = params["unembed"] if "unembed" in params else params["embed"].T
    logits = jnp.einsum("btd,dv->btv", x, unembed.astype(dtype), preferred_element_type=jnp.float32)
    target_logit = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
    mask = batch["loss_mask"]
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


# ----------------------------------------------------------------------------- the step


def make_optimizer(*, lr, warmup_steps, total_steps, min_lr_ratio, b1, b2, eps, weight_decay,
                   clip_norm):
    """AdamW (decay on weight matrices only) after global-norm clipping; linear warmup then
    cosine decay, where step i (from 0) trains with the schedule's value at i + 1."""
    warmup = min(warmup_steps, total_steps)
    base = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=lr * min_lr_ratio)

    def decay_mask(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: path[-1].key not in NO_WEIGHT_DECAY, params)

    adamw = optax.adamw(lambda step: base(step + 1), b1=b1, b2=b2, eps=eps,
                        weight_decay=weight_decay, mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(clip_norm), adamw) if clip_norm > 0 else adamw


def make_train_step(optimizer, **model_hparams):
    """A jitted `(params, opt_state, batch) -> (params, opt_state, loss)` that donates its state.
    model_hparams: rope_theta, norm_eps, and optionally rope_scaling, dtype, remat."""

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, **model_hparams)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))
