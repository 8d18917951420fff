"""Hugging Face `config.json` <-> lmsys ModelConfig for Llama / Mistral / Qwen2 / Qwen3, Gemma 2 /
Gemma 3 (text) and the mixtures of experts Mixtral / Qwen2-MoE / Qwen3-MoE.

    cfg = config_from_hf(read_hf_config("hf/"))                   # -> ModelConfig
    cfg, hf = hf_model_config("hf/")           # the same, + model.embed_pooling from sentence-transformers
    hf = config_to_hf(cfg, dtype="bfloat16")                      # -> a config.json dict

Anything in an HF config that would change the math and lmsys cannot express (an o_proj bias, a
window pattern other than "every n-th layer global", another activation, another RoPE scaling)
is refused with a message naming the field; nothing is silently dropped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from lmsys.checkpoint import CheckpointError
from lmsys.config import ConfigError, ModelConfig

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "mixtral",
                         "qwen2_moe", "qwen3_moe")
GEMMA = ("gemma2", "gemma3_text")
QWEN = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}  # HF name -> model.mlp_act
# a sentence-transformers Pooling module's mode -> model.embed_pooling
ST_POOLINGS = {"pooling_mode_lasttoken": "last", "pooling_mode_mean_tokens": "mean"}
log = logging.getLogger(__name__)


class ConversionError(CheckpointError):
    """A Hugging Face checkpoint lmsys cannot read or write; the message says why."""


def _rope(hf: dict, layer_type: str = "full_attention") -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) of `layer_type`'s layers from a v4 (`rope_theta` +
    `rope_scaling`, Gemma 3's `rope_local_base_freq`) or a v5 (`rope_parameters`, maybe per
    layer type) config."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get(layer_type), dict):
        params = params[layer_type]  # per-layer-type form
    elif layer_type == "sliding_attention" and hf.get("rope_local_base_freq") is not None:
        return float(hf["rope_local_base_freq"]), None
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
        elif kind not in ("llama3", "linear"):
            raise ConversionError(
                f"HF config rope_scaling rope_type '{kind}' is not supported by lmsys (only "
                f"'llama3', 'linear' and none); pick a checkpoint without it")
    return float(theta), scaling


def _windows(hf: dict, model_type: str, refuse) -> dict:
    """sliding_window / global_every / rope_local_theta of the config's layer types: all layers
    windowed, all global, or every n-th global (Gemma 2: alternating; Gemma 3: 5 local to 1)."""
    n, window = hf["num_hidden_layers"], hf.get("sliding_window")
    if model_type in QWEN:
        if hf.get("use_sliding_window"):  # windowed from layer max_window_layers on
            refuse("use_sliding_window", True, "lmsys windows every layer or every layer but each "
                   "n-th, not the layers from max_window_layers on")
        return {}
    types = hf.get("layer_types")
    if types is None:
        if model_type == "gemma2":
            types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
        elif model_type == "gemma3_text":
            p = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
            types = ["sliding_attention" if (i + 1) % p else "full_attention" for i in range(n)]
        else:
            types = ["sliding_attention" if window else "full_attention"] * n
    if len(types) != n or set(types) - {"sliding_attention", "full_attention"}:
        refuse("layer_types", types, f"expected {n} of sliding_attention / full_attention")
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    if len(full) == n:
        return {}
    if not isinstance(window, int) or window < 1:
        refuse("sliding_window", window, "sliding_attention layers need a positive window")
    max_pos = hf.get("max_position_embeddings")
    if not full and model_type not in GEMMA and max_pos is not None and window >= max_pos:
        return {}  # never narrower than the context: full attention
    every = full[0] + 1 if full else 0
    if full and [i for i in range(n) if (i + 1) % every == 0] != full:
        refuse("layer_types", types, "lmsys runs every n-th layer globally and the others "
               "windowed, not this pattern")
    out = {"sliding_window": window, "global_every": every}
    if full:  # mixed: the windowed layers' RoPE
        local_theta, local_scaling = _rope(hf, "sliding_attention")
        if local_scaling is not None:
            refuse("rope_parameters", local_scaling, "the windowed layers' RoPE has no scaling in "
                   "lmsys when global layers are mixed in")
        if local_theta != _rope(hf)[0]:
            out["rope_local_theta"] = local_theta
    return out


def _family_fields(hf: dict, model_type: str, refuse) -> dict:
    """The ModelConfig fields of Gemma's block and of the mixture-of-experts formats."""
    out: dict = {}
    if model_type in GEMMA:
        if hf.get("use_bidirectional_attention"):
            refuse("use_bidirectional_attention", True, "lmsys attention is causal")
        out.update(embed_scale=True, post_norms=True, norm_plus_one=True,
                   query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar") or 0.0),
                   attn_soft_cap=float(hf.get("attn_logit_softcapping") or 0.0),
                   final_soft_cap=float(hf.get("final_logit_softcapping") or 0.0),
                   qk_norm=model_type == "gemma3_text")
    if model_type in ("mixtral", "qwen2_moe", "qwen3_moe"):
        if hf.get("router_jitter_noise"):
            refuse("router_jitter_noise", hf["router_jitter_noise"], "lmsys routers have no jitter")
        if hf.get("decoder_sparse_step", 1) != 1 or hf.get("mlp_only_layers"):
            refuse("mlp_only_layers", hf.get("mlp_only_layers"), "lmsys makes every layer's MLP "
                   "a mixture of experts (decoder_sparse_step 1, no mlp_only_layers)")
        experts = hf.get("num_local_experts", hf.get("num_experts"))
        out.update(n_experts=experts, experts_per_token=hf.get("num_experts_per_tok", 2),
                   moe_d_ff=hf["intermediate_size"] if model_type == "mixtral"
                   else hf.get("moe_intermediate_size"),
                   router_norm_topk=model_type == "mixtral" or bool(hf.get("norm_topk_prob")))
        if model_type == "qwen2_moe" and hf.get("shared_expert_intermediate_size"):
            out.update(n_shared_experts=1, shared_expert_gate=True,
                       shared_d_ff=hf["shared_expert_intermediate_size"])
    return out


def config_from_hf(hf: dict) -> ModelConfig:
    """The lmsys ModelConfig of an HF `config.json` (one of SUPPORTED_MODEL_TYPES), or a
    ConversionError naming the model_type or field lmsys cannot express."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(f"HF model_type {model_type!r} is unsupported; supported: "
                              + ", ".join(SUPPORTED_MODEL_TYPES))

    def refuse(field, value, why):
        raise ConversionError(f"HF config field {field}={value!r} ({model_type}) is not supported: {why}")

    act = hf.get("hidden_act") or hf.get("hidden_activation") or "silu"
    if act not in ACTIVATIONS:
        refuse("hidden_act", act, "lmsys's gated MLPs use silu (SwiGLU) or gelu_pytorch_tanh (GeGLU)")
    if hf.get("mlp_bias"):
        refuse("mlp_bias", True, "lmsys MLPs have no biases")
    qkv_bias = model_type in ("qwen2", "qwen2_moe")
    if hf.get("attention_bias"):
        if model_type == "llama":
            refuse("attention_bias", True, "it also adds an o_proj bias, which lmsys lacks")
        refuse("attention_bias", True, "lmsys has no attention output bias")

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
                  tie_embeddings=bool(hf.get("tie_word_embeddings", model_type in GEMMA)),
                  qkv_bias=qkv_bias, qk_norm=model_type in ("qwen3", "qwen3_moe"),
                  mlp_act=ACTIVATIONS[act])
    fields.update(_windows(hf, model_type, refuse))
    fields.update(_family_fields(hf, model_type, refuse))
    if scaling is not None and not isinstance(scaling.get("factor"), (int, float)):
        refuse("rope_scaling", scaling, "a rope scaling needs a numeric factor")
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "linear":
        fields.update(rope_linear_factor=float(scaling["factor"]))
    elif scaling is not None:
        fields.update(rope_scaling_factor=float(scaling["factor"]),
                      rope_low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
                      rope_high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
                      rope_original_max_position=int(scaling.get("original_max_position_embeddings", 8192)))
    from lmsys.config import from_dict

    try:
        return from_dict({"model": fields}).model
    except ConfigError as e:
        raise ConversionError(f"HF config gives an invalid lmsys model: {e}") from None


def _architecture(model: ModelConfig) -> tuple[str, str]:
    """(architecture, model_type) of the HF family that expresses `model`, or a ConversionError
    naming what none does."""
    gemma = (model.embed_scale, model.post_norms, model.norm_plus_one, model.mlp_act == "gelu_tanh")
    if any(gemma) and not all(gemma):
        raise ConversionError("model.embed_scale, post_norms, norm_plus_one and mlp_act=gelu_tanh "
                              "are Gemma's block together; a model with only some of them has no "
                              "Hugging Face architecture")
    gemma_only = (model.query_pre_attn_scalar, model.attn_soft_cap, model.final_soft_cap,
                  model.rope_local_theta, model.global_every)
    if any(gemma_only) and not all(gemma):
        raise ConversionError("model.query_pre_attn_scalar, soft caps, rope_local_theta and "
                              "global_every export only as Gemma (embed_scale, post_norms, "
                              "norm_plus_one, mlp_act=gelu_tanh)")
    if model.qkv_bias and model.qk_norm:
        raise ConversionError("model.qkv_bias with model.qk_norm has no Hugging Face architecture "
                              "(Qwen3's attention_bias also adds an o_proj bias); export needs one "
                              "of them off")
    if all(gemma):
        if model.n_experts or model.qkv_bias:
            raise ConversionError("Gemma has no mixture-of-experts or qkv-bias variant to export to")
        return ("Gemma3ForCausalLM", "gemma3_text") if model.qk_norm else ("Gemma2ForCausalLM", "gemma2")
    if model.n_experts:
        shared = (model.n_shared_experts, model.shared_expert_gate)
        if model.sliding_window:
            raise ConversionError("model.sliding_window with model.n_experts: lmsys exports windowed "
                                  "MoE models only as Mixtral, which this model is not")
        if model.qkv_bias and model.n_shared_experts == 1 and model.shared_expert_gate:
            return "Qwen2MoeForCausalLM", "qwen2_moe"
        if not any(shared) and model.qk_norm:
            return "Qwen3MoeForCausalLM", "qwen3_moe"
        if not any(shared) and not model.qkv_bias and model.router_norm_topk:
            return "MixtralForCausalLM", "mixtral"
        raise ConversionError(
            f"model.n_experts={model.n_experts} with n_shared_experts={model.n_shared_experts}, "
            f"shared_expert_gate={model.shared_expert_gate}, qkv_bias={model.qkv_bias}, qk_norm="
            f"{model.qk_norm}, router_norm_topk={model.router_norm_topk}: no Hugging Face MoE layout "
            "(Mixtral: none of them but router_norm_topk; Qwen2-MoE: qkv_bias and one gated shared "
            "expert; Qwen3-MoE: qk_norm, no shared expert)")
    if model.sliding_window:
        if model.qkv_bias or model.qk_norm:
            raise ConversionError("model.sliding_window exports as Mistral, which has no qkv_bias "
                                  "or qk_norm")
        return "MistralForCausalLM", "mistral"
    return (("Qwen3ForCausalLM", "qwen3") if model.qk_norm else
            ("Qwen2ForCausalLM", "qwen2") if model.qkv_bias else
            ("LlamaForCausalLM", "llama"))


def config_to_hf(model: ModelConfig, dtype: str = "float32", base: dict | None = None) -> dict:
    """An HF config.json for `model` in the family `_architecture` picks (Llama, Mistral with a
    window, Qwen2 with qkv_bias, Qwen3 with qk_norm, Gemma 2/3, Mixtral, Qwen2-MoE, Qwen3-MoE).
    `base` (e.g. the config an import came from) supplies max_position_embeddings and token ids."""
    base = base or {}
    arch, model_type = _architecture(model)
    scaling = None
    max_pos = base.get("max_position_embeddings")
    if model.rope_scaling_factor:
        scaling = {"rope_type": "llama3", "factor": model.rope_scaling_factor,
                   "low_freq_factor": model.rope_low_freq_factor,
                   "high_freq_factor": model.rope_high_freq_factor,
                   "original_max_position_embeddings": model.rope_original_max_position}
        max_pos = max_pos or int(model.rope_original_max_position * model.rope_scaling_factor)
    if model.rope_linear_factor:
        scaling = {"rope_type": "linear", "factor": model.rope_linear_factor}
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
        "hidden_act": "gelu_pytorch_tanh" if model.mlp_act == "gelu_tanh" else "silu",
        "max_position_embeddings": max_pos or 4096,
        "rms_norm_eps": model.norm_eps,
        "rope_theta": model.rope_theta,
        "rope_scaling": scaling,
        "tie_word_embeddings": model.tie_embeddings,
        "torch_dtype": dtype,
        "initializer_range": model.init_std,
        "use_cache": True,
        "attention_dropout": 0.0,
    }
    if model_type == "llama":
        cfg.update(attention_bias=False, mlp_bias=False)
    elif model_type in QWEN:
        cfg.update(use_sliding_window=False, sliding_window=None)
    if model_type in ("qwen3", "qwen3_moe", "gemma2", "gemma3_text"):
        cfg.update(attention_bias=False)
    if model.sliding_window:
        full = [(i + 1) % model.global_every == 0 if model.global_every else False
                for i in range(model.n_layers)]
        cfg.update(sliding_window=model.sliding_window,
                   layer_types=["full_attention" if f else "sliding_attention" for f in full])
    elif model_type == "mistral" or model_type in GEMMA:
        cfg.update(sliding_window=None, layer_types=["full_attention"] * model.n_layers)
    if model_type in GEMMA:
        scalar = model.query_pre_attn_scalar or model.head_dim
        cfg.update(hidden_activation="gelu_pytorch_tanh",
                   query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,
                   attn_logit_softcapping=model.attn_soft_cap or None,
                   final_logit_softcapping=model.final_soft_cap or None)
        if model_type == "gemma3_text":
            cfg.update(rope_local_base_freq=model.rope_local_theta or model.rope_theta,
                       use_bidirectional_attention=False)
    if model.n_experts:
        cfg.update(num_experts_per_tok=model.experts_per_token, router_jitter_noise=0.0,
                   output_router_logits=False)
        if model_type == "mixtral":
            cfg.update(num_local_experts=model.n_experts, intermediate_size=model.moe_d_ff or model.d_ff)
        else:
            cfg.update(num_experts=model.n_experts, moe_intermediate_size=model.moe_d_ff or model.d_ff,
                       norm_topk_prob=model.router_norm_topk, decoder_sparse_step=1, mlp_only_layers=[])
        if model_type == "qwen2_moe":
            cfg.update(shared_expert_intermediate_size=model.shared_d_ff or model.moe_d_ff or model.d_ff)
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


def sentence_transformers_pooling(hf_dir: str | Path) -> str:
    """model.embed_pooling of a sentence-transformers model (an HF model directory with its
    modules.json and Pooling module, e.g. e5-mistral, gte-Qwen2, Qwen3-Embedding): "last"
    (pooling_mode_lasttoken) or "mean" (pooling_mode_mean_tokens), read from the config.json of
    the Pooling module modules.json names (else 1_Pooling/); "" without one. A pooling lmsys does
    not implement (CLS, max, weighted mean, several modes concatenated) is kept as
    "unsupported:<modes>" and logged: /v1/embeddings then refuses until the server's
    --embed-pooling chooses one, rather than serve vectors the model was not trained to give."""
    hf_dir = Path(hf_dir)
    pooling_dir = hf_dir / "1_Pooling"
    modules = hf_dir / "modules.json"
    try:
        if modules.is_file():
            found = [m for m in json.loads(modules.read_text()) if str(m.get("type", "")).endswith(".Pooling")]
            if not found:
                return ""
            pooling_dir = hf_dir / found[0].get("path", "")
        if not (pooling_dir / "config.json").is_file():
            return ""
        config = json.loads((pooling_dir / "config.json").read_text())
    except (json.JSONDecodeError, AttributeError, TypeError) as e:
        raise ConversionError(f"{hf_dir}: the sentence-transformers configuration (modules.json, "
                              f"{pooling_dir.name}/config.json) is not valid: {e}") from None
    modes = sorted(k for k, v in config.items() if k.startswith("pooling_mode_") and v is True)
    if len(modes) == 1 and modes[0] in ST_POOLINGS:
        return ST_POOLINGS[modes[0]]
    found = " + ".join(modes) or "(none)"
    log.warning("%s: sentence-transformers pooling %s is not one lmsys implements (pooling_mode_lasttoken, "
                "pooling_mode_mean_tokens); /v1/embeddings refuses unless the server's --embed-pooling "
                "chooses one", pooling_dir / "config.json", found)
    return f"unsupported:{found}"


def hf_model_config(hf_dir: str | Path) -> tuple[ModelConfig, dict]:
    """(ModelConfig, config.json) of an HF model directory, model.embed_pooling from its
    sentence-transformers configuration (`sentence_transformers_pooling`)."""
    hf = read_hf_config(hf_dir)
    return dataclasses.replace(config_from_hf(hf), embed_pooling=sentence_transformers_pooling(hf_dir)), hf
