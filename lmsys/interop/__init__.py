"""Interop with other ecosystems: Hugging Face safetensors checkpoints in and out."""

from lmsys.interop.hf import (ConversionError, config_from_hf, config_to_hf, hf_to_lmsys, is_hf_dir,
                              lmsys_to_hf, load_hf, save_hf)

__all__ = ["ConversionError", "config_from_hf", "config_to_hf", "hf_to_lmsys", "is_hf_dir",
           "lmsys_to_hf", "load_hf", "save_hf"]
