"""Attention kernels behind one dispatch function, each with a plain-jnp reference."""

from lmsys.kernels.attention import attention, xla_attention

__all__ = ["attention", "xla_attention"]
