"""Attention kernels behind one dispatch function, each with a plain-jnp reference."""

from lmsys.kernels.attention import attention, xla_attention
from lmsys.kernels.flash_attention import flash_attention

__all__ = ["attention", "flash_attention", "xla_attention"]
