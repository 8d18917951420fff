"""Attention kernels behind one dispatch function, each with a plain-jnp reference."""

from lmsys.kernels.attention import attention, resolve_impl, xla_attention
from lmsys.kernels.flash_attention import flash_attention
from lmsys.kernels.paged_attention import paged_attention, paged_attention_reference

__all__ = ["attention", "flash_attention", "paged_attention", "paged_attention_reference",
           "resolve_impl", "xla_attention"]
