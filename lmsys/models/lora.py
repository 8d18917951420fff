"""Low-rank adapters (LoRA, Hu et al. 2021): a target projection y = x @ W becomes

    y = x @ W + scale * (dropout(x) @ A) @ B,      scale = alpha / rank

with A [in..., rank] and B [rank, out...] (B starts at zero, so training starts from the base).
The adapters live in the params tree beside the layers they adapt, stacked on the layer axis:

    params["layers"]["lora"] = {"wq": {"a": [L, D, r], "b": [L, r, N, H]}, ...,
                                "scale": [L]}                      # alpha / rank, not trained

so the layer scan and the pipeline slice them with the base weights, and the model adds the
low-rank term in each target projection (`add`). A and B carry the logical axes of the base
matrix's input and output dims (the rank dim is unsplit), so the rule table shards them as it
shards the base. During training the Trainer may add "dropout_key" [L, 2] (uint32) and
"dropout_rate" [L]. `merge` folds the adapters into the base weights; `unmerge` takes them out.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# lora.targets name -> the base weight it adapts
TARGETS = {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "gate": "w_gate", "up": "w_up", "down": "w_down"}
# the base weight's input dims (after the layer axis); the rest are its output dims
IN_DIMS = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1}
# the lora subtree's leaves that are not adapters; "rows": a serving bank's slot per row
EXTRA = ("scale", "dropout_key", "dropout_rate", "rows")


def target_names(text: str) -> list[str]:
    """`lora.targets` as a list of names ("all": every target)."""
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    return list(TARGETS) if names == ["all"] else names


def param_specs(layer_specs: dict, lora_cfg) -> dict:
    """Shapes and logical axes of the adapters of `lora_cfg` over a model's stacked layer
    params (`layer_specs`: llama.param_specs(cfg)["layers"]), as ParamSpecs, plus the scale."""
    from lmsys.models.common import ParamSpec

    r = lora_cfg.rank
    out = {}
    for t in target_names(lora_cfg.targets):
        w = TARGETS[t]
        base = layer_specs[w]
        k = 1 + IN_DIMS[w]
        out[w] = {"a": ParamSpec((base.shape[0], *base.shape[1:k], r), (*base.axes[:k], None), "lora_a"),
                  "b": ParamSpec((base.shape[0], r, *base.shape[k:]), (base.axes[0], None, *base.axes[k:]),
                                 "zeros")}
    out["scale"] = ParamSpec((next(iter(layer_specs.values())).shape[0],), ("layers",), "scale")
    return out


def init(key: jax.Array, specs: dict, lora_cfg) -> dict:
    """Float32 adapters for `param_specs`: A uniform in +-1/sqrt(fan_in) (PEFT's default
    kaiming-uniform bound), B zeros, the scale alpha / rank."""
    leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
    keys = jax.random.split(key, len(leaves))
    out = []
    for k, s in zip(keys, leaves):
        if s.init == "lora_a":
            bound = 1.0 / math.sqrt(math.prod(s.shape[1:-1]))
            out.append(jax.random.uniform(k, s.shape, jnp.float32, -bound, bound))
        elif s.init == "scale":
            out.append(jnp.full(s.shape, lora_cfg.alpha / lora_cfg.rank, jnp.float32))
        else:
            out.append(jnp.zeros(s.shape, jnp.float32))
    return jax.tree.unflatten(treedef, out)


def _is_spec(x) -> bool:
    return hasattr(x, "axes") and hasattr(x, "init")


def split_layer(lp: dict):
    """One layer's params -> (the base params, its adapters or None)."""
    if "lora" not in lp:
        return lp, None
    lp = dict(lp)
    return lp, lp.pop("lora")


def prepare(adapters, dtype, base_axes: dict | None = None, rules=None):
    """One layer's adapters in the compute dtype; with `rules`, A and B all-gathered over fsdp
    once, as the layer's base weights are (`base_axes`: their logical axes without the layer
    axis, from which the adapters' follow)."""
    if adapters is None:
        return None
    out = dict(adapters)
    for w in adapters:
        if w in EXTRA:
            continue
        out[w] = {ab: adapters[w][ab].astype(dtype) for ab in ("a", "b")}
        if rules is not None:
            from lmsys.parallel.fsdp import fsdp_gather

            k = IN_DIMS[w]
            axes = {"a": (*base_axes[w][:k], None), "b": (None, *base_axes[w][k:])}
            out[w] = {ab: fsdp_gather(out[w][ab], rules, axes[ab]) for ab in ("a", "b")}
    return out


def add(y, adapters, name: str, x):
    """`y` (= x @ W for base weight `name`) plus the low-rank term of `name`'s adapter, if any.
    x: [..., in...] with the weight's input dims last; y: [..., out...]."""
    if adapters is None or name not in adapters:
        return y
    a, b = adapters[name]["a"], adapters[name]["b"]
    if "dropout_key" in adapters:
        rate = adapters["dropout_rate"]
        key = jax.random.fold_in(adapters["dropout_key"], list(IN_DIMS).index(name))
        keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
        x = jnp.where(keep, x / (1.0 - rate).astype(x.dtype), jnp.zeros((), x.dtype))
    k = IN_DIMS[name]
    if "rows" in adapters:  # a bank of adapters (lmsys.serve.lora): row b uses slot rows[b]
        rows = adapters["rows"]
        a, b, scale = a[rows], b[rows], adapters["scale"][rows]  # [B, in..., r], [B, r, out...], [B]
        ins, outs = "ijk"[:k], "mno"[:b.ndim - 2]
        z = jnp.einsum(f"bt{ins},b{ins}r->btr", x, a) * scale[:, None, None].astype(x.dtype)
        return y + jnp.einsum(f"btr,br{outs}->bt{outs}", z, b).astype(y.dtype)
    z = jnp.tensordot(x, a, axes=k)  # [..., r]
    z = z * adapters["scale"].astype(z.dtype)
    return y + jnp.tensordot(z, b, axes=1).astype(y.dtype)


def delta_weight(a, b, name: str, scale):
    """scale * A @ B in the base weight's shape (stacked layers: a [L, in..., r], b [L, r,
    out...], scale [L])."""
    k = IN_DIMS[name]
    ab = jnp.einsum("lir,lro->lio", a.reshape(a.shape[0], -1, a.shape[-1]),
                    b.reshape(b.shape[0], b.shape[1], -1), precision=jax.lax.Precision.HIGHEST)
    ab = ab * scale[:, None, None]
    return ab.reshape(a.shape[0], *a.shape[1:1 + k], *b.shape[2:])


def adapters_of(params: dict):
    """The lora subtree of a params tree (None without adapters)."""
    return params.get("layers", {}).get("lora")


def with_adapters(params: dict, adapters) -> dict:
    """`params` with the lora subtree set to `adapters` (None: removed)."""
    layers = {k: v for k, v in params["layers"].items() if k != "lora"}
    if adapters is not None:
        layers["lora"] = adapters
    return {**params, "layers": layers}


def merge(params: dict, sign: float = 1.0) -> dict:
    """The base params with each adapter folded in (W + scale * A @ B), without the lora
    subtree: a model with the same logits and no adapters (`sign=-1`: `unmerge`)."""
    adapters = adapters_of(params)
    out = with_adapters(params, None)
    if adapters is None:
        return out
    layers = dict(out["layers"])
    for w, ab in adapters.items():
        if w in EXTRA:
            continue
        d = delta_weight(ab["a"].astype(jnp.float32), ab["b"].astype(jnp.float32), w, adapters["scale"])
        layers[w] = (layers[w].astype(jnp.float32) + sign * d).astype(layers[w].dtype)
    return {**out, "layers": layers}


def unmerge(merged: dict, adapters: dict) -> dict:
    """The base params of `merged` (a `merge` of base + `adapters`), with the adapters attached
    again: `unmerge(merge(p), adapters_of(p))` equals `p` up to float rounding."""
    return with_adapters(merge(with_adapters(merged, adapters), sign=-1.0), adapters)
