"""Weight-only quantization for serving: lmsys.models.quantize (the one int8/fp8 scheme, which
LoRA training's frozen base uses too), re-exported where the engine and benchmarks look."""

from lmsys.models.quantize import CONTRACTING_AXES, QUANT_TYPES, quantize_params

__all__ = ["CONTRACTING_AXES", "QUANT_TYPES", "quantize_params"]
