"""Interop with other ecosystems: Hugging Face configs (hf_config), safetensors checkpoints in and
out (hf), whole-directory conversions (convert), and the MLflow model registry (registry)."""

from lmsys.interop.convert import hf_to_lmsys, lmsys_to_hf
from lmsys.interop.hf import load_hf, save_hf
from lmsys.interop.hf_config import ConversionError, config_from_hf, config_to_hf

__all__ = ["ConversionError", "config_from_hf", "config_to_hf", "hf_to_lmsys", "lmsys_to_hf", "load_hf",
           "save_hf"]
