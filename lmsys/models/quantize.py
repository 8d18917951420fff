"""Weight-only quantization with qwix, for serving (lmsys.serve) and for LoRA training's frozen
base (lora.base_quantize): matrices stored as int8 or fp8 with one scale per output channel,
dequantized to the compute dtype where a layer uses them (lmsys.models.llama.materialize).

Embeddings stay in float (a tied embedding is also the output projection; both stay exact).
"""

from __future__ import annotations

import jax.numpy as jnp

QUANT_TYPES = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}

# The contracting (input) axes of each matrix, counting the leading `layers` axis; every other
# axis gets its own scale.
CONTRACTING_AXES = {"wq": (1,), "wk": (1,), "wv": (1,), "wo": (1, 2), "w_gate": (1,), "w_up": (1,),
                    "w_down": (1,), "unembed": (0,)}


def quantize_params(params: dict, mode: str) -> dict:
    """A copy of `params` with every matrix in CONTRACTING_AXES as a qwix QArray of `mode`."""
    import qwix

    if mode not in QUANT_TYPES:
        raise ValueError(f"quantize mode '{mode}' is unknown; use one of {', '.join(QUANT_TYPES)}")

    def q(name, w):
        if name not in CONTRACTING_AXES:
            return w
        channels = tuple(a for a in range(w.ndim) if a not in CONTRACTING_AXES[name])
        return qwix.quantize(w, QUANT_TYPES[mode], channelwise_axes=channels)

    out = {k: q(k, v) for k, v in params.items() if k != "layers"}
    out["layers"] = {k: q(k, v) for k, v in params["layers"].items()}
    return out
