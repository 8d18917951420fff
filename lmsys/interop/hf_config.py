"""Hugging Face `config.json` <-> lmsys ModelConfig for Llama / Mistral / Qwen2 / Qwen3.

    cfg = config_from_hf(read_hf_config("hf/"))                   # -> ModelConfig
    hf = config_to_hf(cfg, dtype="bfloat16")                      # -> a config.json dict

Anything in an HF config that would change the math and lmsys cannot express (an o_proj bias, a
sliding window, another activation, another RoPE scaling) is refused with a message naming the
field; nothing is silently dropped.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmsys.checkpoint import CheckpointError
from lmsys.config import ConfigError, ModelConfig

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class ConversionError(CheckpointError):
    """A Hugging Face checkpoint lmsys cannot read or write; the message says why."""


def _rope(hf: dict) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from a v4 (`rope_theta` + `rope_scaling`) or a v5
    (`rope_parameters`) config."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params and isinstance(params["full_attention"], dict):
        params = params["full_attention"]  # per-layer-type form
    scaling = hf.get("rope_scaling")
    theta = hf.get("rope_theta")
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        scaling = scaling or params
    if theta is None:
        theta = 10000.0
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            scaling = None
        elif kind != "llama3":
            raise ConversionError(
                f"HF config rope_scaling rope_type '{kind}' is not supported by lmsys (only "
                f"'llama3' and none); pick a checkpoint without it")
    return float(theta), scaling


def config_from_hf(hf: dict) -> ModelConfig:
    """The lmsys ModelConfig of an HF `config.json` (llama, mistral, qwen2 or qwen3), or a
    ConversionError naming the model_type or field lmsys cannot express."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(f"HF model_type {model_type!r} is unsupported; supported: "
                              + ", ".join(SUPPORTED_MODEL_TYPES))

    def refuse(field, value, why):
        raise ConversionError(f"HF config field {field}={value!r} ({model_type}) is not supported: {why}")

    act = hf.get("hidden_act", hf.get("hidden_activation", "silu"))
    if act != "silu":
        refuse("hidden_act", act, "lmsys uses SwiGLU with silu only")
    if hf.get("mlp_bias"):
        refuse("mlp_bias", True, "lmsys MLPs have no biases")
    qkv_bias = model_type == "qwen2"
    if hf.get("attention_bias"):
        if model_type == "llama":
            refuse("attention_bias", True, "it also adds an o_proj bias, which lmsys lacks")
        refuse("attention_bias", True, "lmsys has no attention output bias")
    max_pos = hf.get("max_position_embeddings")
    window = hf.get("sliding_window")
    if model_type in ("qwen2", "qwen3"):
        if hf.get("use_sliding_window"):
            refuse("use_sliding_window", True, "lmsys has no sliding-window attention")
    elif window is not None and (max_pos is None or window < max_pos):
        refuse("sliding_window", window, "lmsys has no sliding-window attention "
               "(accepted only when null or >= max_position_embeddings)")
    layer_types = hf.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        refuse("layer_types", sorted(set(layer_types)), "lmsys runs full attention in every layer")

    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads"):
        if not isinstance(hf.get(key), int):
            raise ConversionError(f"HF config has no integer {key} (got {hf.get(key)!r})")
    n_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
    theta, scaling = _rope(hf)
    fields = dict(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
                  n_layers=hf["num_hidden_layers"], n_heads=n_heads,
                  n_kv_heads=hf.get("num_key_value_heads") or n_heads, head_dim=head_dim,
                  d_ff=hf["intermediate_size"], rope_theta=theta,
                  norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                  tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=qkv_bias,
                  qk_norm=model_type == "qwen3")
    if scaling is not None:
        if not isinstance(scaling.get("factor"), (int, float)):
            refuse("rope_scaling", scaling, "a llama3 rope scaling needs a numeric factor")
        fields.update(rope_scaling_factor=float(scaling["factor"]),
                      rope_low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
                      rope_high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
                      rope_original_max_position=int(scaling.get("original_max_position_embeddings", 8192)))
    from lmsys.config import from_dict

    try:
        return from_dict({"model": fields}).model
    except ConfigError as e:
        raise ConversionError(f"HF config gives an invalid lmsys model: {e}") from None


def config_to_hf(model: ModelConfig, dtype: str = "float32", base: dict | None = None) -> dict:
    """An HF config.json for `model`: LlamaForCausalLM, Qwen2ForCausalLM with qkv_bias or
    Qwen3ForCausalLM with qk_norm. `base` (e.g. the config an import came from) supplies
    max_position_embeddings and token ids."""
    base = base or {}
    if model.n_experts:
        raise ConversionError(f"model.n_experts={model.n_experts}: mixture-of-experts models have no "
                              "Hugging Face export in lmsys (only dense Llama, Qwen2 and Qwen3 "
                              "layouts); keep the lmsys checkpoint to serve or fine-tune it")
    if model.qkv_bias and model.qk_norm:
        raise ConversionError("model.qkv_bias with model.qk_norm has no Hugging Face architecture "
                              "(Qwen3's attention_bias also adds an o_proj bias); export needs one "
                              "of them off")
    arch, model_type = (("Qwen3ForCausalLM", "qwen3") if model.qk_norm else
                        ("Qwen2ForCausalLM", "qwen2") if model.qkv_bias else
                        ("LlamaForCausalLM", "llama"))
    scaling = None
    max_pos = base.get("max_position_embeddings")
    if model.rope_scaling_factor:
        scaling = {"rope_type": "llama3", "factor": model.rope_scaling_factor,
                   "low_freq_factor": model.rope_low_freq_factor,
                   "high_freq_factor": model.rope_high_freq_factor,
                   "original_max_position_embeddings": model.rope_original_max_position}
        max_pos = max_pos or int(model.rope_original_max_position * model.rope_scaling_factor)
    cfg = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": model.vocab_size,
        "hidden_size": model.d_model,
        "intermediate_size": model.d_ff,
        "num_hidden_layers": model.n_layers,
        "num_attention_heads": model.n_heads,
        "num_key_value_heads": model.n_kv_heads,
        "head_dim": model.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_pos or 4096,
        "rms_norm_eps": model.norm_eps,
        "rope_theta": model.rope_theta,
        "rope_scaling": scaling,
        "tie_word_embeddings": model.tie_embeddings,
        "torch_dtype": dtype,
        "initializer_range": model.init_std,
        "use_cache": True,
    }
    if model_type == "llama":
        cfg.update(attention_bias=False, mlp_bias=False, attention_dropout=0.0)
    else:
        cfg.update(use_sliding_window=False, sliding_window=None, attention_dropout=0.0)
        if model_type == "qwen3":
            cfg.update(attention_bias=False)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if base.get(key) is not None:
            cfg[key] = base[key]
    return cfg


def read_hf_config(hf_dir: str | Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from None
