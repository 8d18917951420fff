"""Pieces every model module shares: the parameter spec, the optional activation-sharding pin and
the SwiGLU MLP (a dense layer's MLP, and an MoE layer's shared experts)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class ParamSpec(NamedTuple):
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    init: str  # "normal" | "ones" | "zeros"


def constrain(rules, x, axes):
    """`x` pinned to the layout the rule table gives logical `axes`; as is without rules."""
    return x if rules is None else rules.constrain(x, axes)


# the gated MLP's activations (model.mlp_act): SwiGLU's silu, GeGLU's tanh-approximated gelu
# (Hugging Face's gelu_pytorch_tanh)
ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


def swiglu(h_BTD, w_gate_DF, w_up_DF, w_down_FD, rules, adapters=None, act: str = "silu"):
    """The gated MLP: act(h @ w_gate) * (h @ w_up) @ w_down (SwiGLU; GeGLU with gelu_tanh).
    adapters: a layer's LoRA adapters (lmsys.models.lora), whose w_gate/w_up/w_down terms are
    added; None: none."""
    from lmsys.models.lora import add

    gate_BTF = add(jnp.einsum("btd,df->btf", h_BTD, w_gate_DF), adapters, "w_gate", h_BTD)
    up_BTF = add(jnp.einsum("btd,df->btf", h_BTD, w_up_DF), adapters, "w_up", h_BTD)
    hidden_BTF = constrain(rules, ACTIVATIONS[act](gate_BTF) * up_BTF, ("batch", "seq", "mlp"))
    return add(jnp.einsum("btf,fd->btd", hidden_BTF, w_down_FD), adapters, "w_down", hidden_BTF)
