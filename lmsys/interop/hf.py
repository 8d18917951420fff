"""Hugging Face interop: Llama / Mistral / Qwen2 / Qwen3 safetensors checkpoints in and out.

    cfg = config_from_hf(json.load(open("hf/config.json")))      # -> ModelConfig
    params, cfg = load_hf("hf/", shardings)                      # each device reads its slices
    save_hf(params, cfg, "out/", tokenizer_dir="hf/", dtype="bfloat16")

No PyTorch at run time: tensors are read with `safe_open(framework="numpy")` (bf16 arrives as
an ml_dtypes array) and written with `safetensors.numpy`. The lmsys layout is the HF one with
Linear weights transposed to [in, out], heads split out and layers stacked on axis 0; q/k need
no permutation because lmsys RoPE rotates halves like HF Llama.

Anything in an HF config that would change the math and lmsys cannot express (an o_proj bias, a
sliding window, another activation, another RoPE scaling) is refused with a message naming the
field; nothing is silently dropped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np

from lmsys.checkpoint import CheckpointError
from lmsys.config import ConfigError, ModelConfig

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Kept beside an lmsys checkpoint written by `lmsys convert from-hf`, so `to-hf` can restore the
# fields lmsys does not model (max_position_embeddings, bos/eos ids).
SOURCE_CONFIG = "hf_config.json"


class ConversionError(CheckpointError):
    """A Hugging Face checkpoint lmsys cannot read or write; the message says why."""


# ----------------------------------------------------------------------------- config


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


# ----------------------------------------------------------------------------- tensor mapping


def _hf_names(model: ModelConfig) -> dict:
    """lmsys leaf path -> (HF name pattern with {i} for the layer, kind). kind says how to
    turn the HF tensor into the lmsys one (see `_hf_block`, `_to_hf`)."""
    p = "model.layers.{i}."
    names = {
        ("embed",): ("model.embed_tokens.weight", "copy"),
        ("layers", "attn_norm"): (p + "input_layernorm.weight", "copy"),
        ("layers", "wq"): (p + "self_attn.q_proj.weight", "in_heads"),
        ("layers", "wk"): (p + "self_attn.k_proj.weight", "in_heads"),
        ("layers", "wv"): (p + "self_attn.v_proj.weight", "in_heads"),
        ("layers", "wo"): (p + "self_attn.o_proj.weight", "heads_out"),
        ("layers", "mlp_norm"): (p + "post_attention_layernorm.weight", "copy"),
        ("layers", "w_gate"): (p + "mlp.gate_proj.weight", "transpose"),
        ("layers", "w_up"): (p + "mlp.up_proj.weight", "transpose"),
        ("layers", "w_down"): (p + "mlp.down_proj.weight", "transpose"),
        ("final_norm",): ("model.norm.weight", "copy"),
    }
    if model.qkv_bias:
        names[("layers", "bq")] = (p + "self_attn.q_proj.bias", "bias")
        names[("layers", "bk")] = (p + "self_attn.k_proj.bias", "bias")
        names[("layers", "bv")] = (p + "self_attn.v_proj.bias", "bias")
    if model.qk_norm:
        names[("layers", "q_norm")] = (p + "self_attn.q_norm.weight", "copy")
        names[("layers", "k_norm")] = (p + "self_attn.k_norm.weight", "copy")
    if not model.tie_embeddings:
        names[("unembed",)] = ("lm_head.weight", "transpose")
    return names


def _hf_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
    """The HF tensor shape holding an lmsys (per-layer) leaf of `shape`."""
    if kind == "copy":
        return shape
    if kind == "transpose":
        return (shape[1], shape[0])
    if kind == "in_heads":  # [D, N, H] <- [N*H, D]
        return (shape[1] * shape[2], shape[0])
    if kind == "heads_out":  # [N, H, D] <- [D, N*H]
        return (shape[2], shape[0] * shape[1])
    if kind == "bias":  # [N, H] <- [N*H]
        return (shape[0] * shape[1],)
    raise AssertionError(kind)


def _hf_block(ranges: tuple[tuple[int, int], ...], shape: tuple[int, ...], kind: str):
    """For the block `ranges` ((start, stop) per axis) of an lmsys (per-layer) leaf of `shape`:
    the slices of the HF tensor that hold it, and the function turning what they read into the
    lmsys block. Heads are whole rows of N*H, so a block split over heads reads only its rows
    (head_dim is never split; were it, the block's heads are read whole and cut)."""
    def cut(r):
        return slice(*r)

    if kind == "copy":
        return tuple(map(cut, ranges)), lambda x: x
    if kind == "transpose":  # [in, out] <- [out, in]
        return (cut(ranges[1]), cut(ranges[0])), lambda x: x.T
    H = shape[1] if kind == "heads_out" else shape[-1]  # head_dim
    if kind == "in_heads":  # [D, N, H] <- [N*H, D]
        (d0, d1), (n0, n1), h = ranges
        return ((slice(n0 * H, n1 * H), slice(d0, d1)),
                lambda x: x.T.reshape(d1 - d0, n1 - n0, H)[:, :, cut(h)])
    if kind == "heads_out":  # [N, H, D] <- [D, N*H]
        (n0, n1), h, (d0, d1) = ranges
        return ((slice(d0, d1), slice(n0 * H, n1 * H)),
                lambda x: x.T.reshape(n1 - n0, H, d1 - d0)[:, cut(h), :])
    if kind == "bias":  # [N, H] <- [N*H]
        (n0, n1), h = ranges
        return (slice(n0 * H, n1 * H),), lambda x: x.reshape(n1 - n0, H)[:, cut(h)]
    raise AssertionError(kind)


def _to_hf(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "copy":
        return x
    if kind == "bias":
        return x.reshape(-1)
    if kind == "transpose":
        return x.T
    if kind == "in_heads":  # [D, N, H] -> [N*H, D]
        return x.reshape(x.shape[0], -1).T
    if kind == "heads_out":  # [N, H, D] -> [D, N*H]
        return x.reshape(-1, x.shape[-1]).T
    raise AssertionError(kind)


def _get(tree: dict, path: tuple[str, ...]):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


# ----------------------------------------------------------------------------- import


class _TensorReader:
    """Reads single tensors by name from one or many safetensors files (memory-mapped)."""

    def __init__(self, hf_dir: Path):
        from safetensors import safe_open

        index = hf_dir / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = sorted(set(weight_map.values()))
        else:
            files = [f.name for f in sorted(hf_dir.glob("*.safetensors"))]
            if not files:
                raise ConversionError(f"{hf_dir} has no *.safetensors files (nor {INDEX_FILE}); "
                                      "convert .bin checkpoints to safetensors first")
            weight_map = None
        self.handles = {}
        for name in files:
            path = hf_dir / name
            if not path.is_file():
                raise ConversionError(f"{hf_dir}: {INDEX_FILE} names {name}, which is missing")
            self.handles[name] = safe_open(str(path), framework="numpy")
        if weight_map is None:
            weight_map = {k: name for name, h in self.handles.items() for k in h.keys()}
        self.weight_map = weight_map

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.handles[self.weight_map[name]].get_slice(name).get_shape())

    def check(self, name: str, shape: tuple[int, ...], where: str) -> None:
        if name not in self.weight_map:
            raise ConversionError(f"{where}: tensor {name} is missing from the safetensors files")
        got = self.shape(name)
        if got != tuple(shape):
            raise ConversionError(f"{where}: tensor {name} has shape {list(got)}, expected "
                                  f"{list(shape)} from config.json")

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """The part `index` of tensor `name`; only those bytes are read from the file."""
        return self.handles[self.weight_map[name]].get_slice(name)[index]


def read_hf_config(hf_dir: str | Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConversionError(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from None


def is_hf_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and (
        (path / INDEX_FILE).is_file() or any(path.glob("*.safetensors")))


def _ignorable(name: str, model: ModelConfig) -> bool:
    """HF tensors lmsys may skip: RoPE tables some old checkpoints saved, and an lm_head that
    transformers itself ties to (replaces by) the embedding."""
    return name.endswith("rotary_emb.inv_freq") or (model.tie_embeddings and name == "lm_head.weight")


def load_hf(hf_dir: str | Path, shardings=None, dtype=np.float32):
    """(params, ModelConfig) from an HF model directory (config.json + one or sharded
    safetensors). Every tensor's name and shape is checked first (a missing, unexpected or
    misshapen tensor is a ConversionError naming it); then each leaf is built with
    `jax.make_array_from_callback` on its sharding (a pytree like the params; None: the default
    device): each device's block is read straight from the memory-mapped files as the slices
    of the HF tensors (per layer) that hold it, so no host or device ever holds a whole sharded
    tensor, and host memory holds about one leaf's shards at a time."""
    import jax

    hf_dir = Path(hf_dir)
    model = config_from_hf(read_hf_config(hf_dir))
    reader = _TensorReader(hf_dir)
    from lmsys.models import llama

    specs = llama.param_specs(model)
    leaves = []
    for path, (pattern, kind) in _hf_names(model).items():
        shape = _get(specs, path).shape
        stacked = path[0] == "layers"
        names = [pattern.format(i=i) for i in range(model.n_layers)] if stacked else [pattern]
        for name in names:
            reader.check(name, _hf_shape(shape[1:] if stacked else shape, kind), str(hf_dir))
        leaves.append((path, kind, shape, names))
    used = {name for *_, names in leaves for name in names}
    extra = sorted(n for n in reader.weight_map if n not in used and not _ignorable(n, model))
    if extra:
        raise ConversionError(
            f"{hf_dir}: tensors {', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''} have no "
            f"place in the lmsys model of this config.json ({model.n_layers} layers, "
            f"qkv_bias={model.qkv_bias}, qk_norm={model.qk_norm}, tie_embeddings="
            f"{model.tie_embeddings}); lmsys would drop them, so it refuses the checkpoint")

    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params: dict = {}
    for path, kind, shape, names in leaves:
        stacked = path[0] == "layers"
        blocks: dict = {}  # replicas of one block are read once

        def block(index, kind=kind, shape=shape, names=names, stacked=stacked, blocks=blocks):
            ranges = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
            if ranges not in blocks:
                layers = range(*ranges[0]) if stacked else [0]
                inner = ranges[1:] if stacked else ranges
                hf_index, to_lmsys = _hf_block(inner, shape[1:] if stacked else shape, kind)
                out = np.stack([np.asarray(to_lmsys(reader.read(names[i], hf_index)), dtype)
                                for i in layers])
                blocks[ranges] = out if stacked else out[0]
            return blocks[ranges]

        sharding = default if shardings is None else _get(shardings, path)
        _set(params, path, jax.make_array_from_callback(shape, sharding, block, dtype=dtype))
        blocks.clear()
    return params, model


# ----------------------------------------------------------------------------- export


def _host(x) -> np.ndarray:
    import jax

    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _np_dtype(dtype: str):
    if dtype == "float32":
        return np.float32
    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    if dtype == "float16":
        return np.float16
    raise ConversionError(f"export dtype {dtype!r} is not supported; use float32, bfloat16 or float16")


def copy_tokenizer_files(src_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Copies the tokenizer files found in `src_dir` into `out_dir`; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        src, dst = Path(src_dir) / name, Path(out_dir) / name
        if src.is_file() and not (dst.exists() and os.path.samefile(src, dst)):
            shutil.copyfile(src, dst)
        if src.is_file():
            copied.append(name)
    return copied


def save_hf(params: dict, model: ModelConfig, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
            dtype: str = "float32", max_shard_size: int = 5 * 2**30, base_config: dict | None = None) -> Path:
    """Writes an HF model directory loadable by `transformers.AutoModelForCausalLM`: config.json,
    model.safetensors (or model-0000i-of-0000n.safetensors + index when larger than
    `max_shard_size` bytes) and, from `tokenizer_dir`, the tokenizer files. Leaves are fetched
    from devices one at a time; one shard is held on the host while it is written. With several
    processes every one must call this (leaves are gathered); only process 0 writes."""
    import jax
    from safetensors.numpy import save_file

    writer = jax.process_index() == 0
    config_to_hf(model)  # refuses a model no HF architecture expresses, before writing anything

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np_dtype = _np_dtype(dtype)
    from lmsys.models import llama

    specs = llama.param_specs(model)
    shards: list[list[str]] = []  # tensor names per shard file
    pending: dict[str, np.ndarray] = {}
    pending_bytes = 0
    weight_map: dict[str, str] = {}
    total = 0

    def flush():
        nonlocal pending, pending_bytes
        if pending:
            tmp = f"model-tmp-{len(shards) + 1:05d}.safetensors"
            if writer:
                save_file(pending, str(out / tmp), metadata={"format": "pt"})
            shards.append(list(pending))
            pending, pending_bytes = {}, 0

    for path, (pattern, kind) in _hf_names(model).items():
        try:
            leaf = _get(params, path)
        except KeyError:
            raise ConversionError(f"params have no leaf {'.'.join(path)} required by the model config") from None
        expected = _get(specs, path).shape
        if tuple(leaf.shape) != tuple(expected):
            raise ConversionError(f"param {'.'.join(path)} has shape {list(leaf.shape)}, "
                                  f"expected {list(expected)} from the model config")
        host = _host(leaf)
        items = ([(pattern.format(i=i), host[i]) for i in range(model.n_layers)]
                 if path[0] == "layers" else [(pattern, host)])
        for name, x in items:
            t = np.ascontiguousarray(_to_hf(x, kind).astype(np_dtype))
            if pending and pending_bytes + t.nbytes > max_shard_size:
                flush()
            pending[name] = t
            pending_bytes += t.nbytes
            total += t.nbytes
        del host, items
    flush()
    if not writer:
        return out

    for old in list(out.glob("model*.safetensors")) + [out / INDEX_FILE]:
        if old.exists() and not old.name.startswith("model-tmp-"):
            old.unlink()
    n = len(shards)
    for k, names in enumerate(shards, 1):
        final = SINGLE_FILE if n == 1 else f"model-{k:05d}-of-{n:05d}.safetensors"
        os.replace(out / f"model-tmp-{k:05d}.safetensors", out / final)
        weight_map.update({name: final for name in names})
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    base = dict(base_config or {})
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, out)
        if "eos_token_id" not in base and (out / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            from lmsys.data.tokenizer import ENDOFTEXT, EOS_CANDIDATES, first_token_id

            tok = Tokenizer.from_file(str(out / "tokenizer.json"))
            eos = first_token_id(tok, EOS_CANDIDATES)
            if eos is not None:
                base.setdefault("eos_token_id", eos)
                base.setdefault("bos_token_id", eos if tok.token_to_id(ENDOFTEXT) == eos else None)
    (out / "config.json").write_text(json.dumps(config_to_hf(model, dtype, base), indent=2) + "\n")
    return out


# ----------------------------------------------------------------------------- lmsys checkpoints


def _tokenizer_dir(spec: str) -> Path | None:
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        return path
    if path.is_file():
        return path.parent
    return None


def hf_to_lmsys(hf_dir: str | Path, out_dir: str | Path, rules=None) -> Path:
    """`lmsys convert from-hf`: an lmsys checkpoint directory (config.yaml, checkpoints/ at step
    0, the tokenizer files, and the source config as hf_config.json) that `lmsys generate` and
    `lmsys serve` load like a training run."""
    from lmsys.checkpoint import Checkpointer, make_meta
    from lmsys.config import MeshConfig, from_dict, save_config
    from lmsys.models import llama
    from lmsys.parallel import Rules, build_mesh

    hf_dir, out = Path(hf_dir), Path(out_dir).absolute()
    hf_config = read_hf_config(hf_dir)
    model = config_from_hf(hf_config)
    if (out / "checkpoints").exists() and any((out / "checkpoints").iterdir()):
        raise ConversionError(f"{out} already holds checkpoints; choose a new output directory")
    rules = rules or Rules(build_mesh(MeshConfig()))
    shardings = rules.tree_shardings(llama.param_axes(model), llama.param_shapes(model))
    params, model = load_hf(hf_dir, shardings)
    out.mkdir(parents=True, exist_ok=True)
    copied = copy_tokenizer_files(hf_dir, out)
    if "tokenizer.json" not in copied:
        print(f"warning: {hf_dir} has no tokenizer.json; put one in {out} before generating")
    (out / SOURCE_CONFIG).write_text(json.dumps(hf_config, indent=2) + "\n")
    cfg = from_dict({"model": dataclasses.asdict(model),
                     "data": {"tokenizer": str(out / "tokenizer.json")},
                     "run_dir": str(out)})
    save_config(cfg, out / "config.yaml")
    ckpt = Checkpointer(out / "checkpoints", keep=1, async_save=False)
    try:
        ckpt.save(0, {"params": params}, make_meta(0, 0, model, rules.mesh))
    finally:
        ckpt.close()
    return out


def lmsys_to_hf(run_dir: str | Path, out_dir: str | Path, dtype: str = "float32", step: int | None = None,
                max_shard_size: int = 5 * 2**30, rules=None) -> Path:
    """`lmsys convert to-hf`: an HF directory from a training run directory or the output of
    `convert from-hf` (config.yaml + checkpoints/)."""
    from lmsys.checkpoint import load_run
    from lmsys.config import MeshConfig
    from lmsys.parallel import Rules, build_mesh

    run_dir = Path(run_dir)
    cfg, params, _ = load_run(run_dir, rules or Rules(build_mesh(MeshConfig())), step)
    base = None
    if (run_dir / SOURCE_CONFIG).is_file():
        base = json.loads((run_dir / SOURCE_CONFIG).read_text())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = _resolve_tokenizer_dir(cfg.data.tokenizer, run_dir)
    if tok_dir is None:  # the builtin BPE: write its tokenizer.json
        from lmsys.data import tokenizer_for

        tok = tokenizer_for(cfg.data, cfg.model.vocab_size)
        tok.save(str(out / "tokenizer.json"))
        _write_tokenizer_config(out)
        tok_dir = out
    save_hf(params, cfg.model, out, tokenizer_dir=tok_dir, dtype=dtype,
            max_shard_size=max_shard_size, base_config=base)
    if not (out / "tokenizer_config.json").is_file() and (out / "tokenizer.json").is_file():
        _write_tokenizer_config(out)
    return out


def _resolve_tokenizer_dir(spec: str, run_dir: Path) -> Path | None:
    """The directory holding the run's tokenizer.json, or None for the builtin tokenizer; a
    path that no longer exists falls back to a tokenizer.json inside the run directory."""
    from lmsys.data.tokenizer import BUILTIN

    if spec == BUILTIN:
        return None
    found = _tokenizer_dir(spec)
    if found is None and (run_dir / "tokenizer.json").is_file():
        return run_dir
    if found is None:
        raise ConversionError(f"tokenizer {spec!r} of {run_dir}/config.yaml does not exist; "
                              f"copy its tokenizer.json into {run_dir}")
    return found


def _write_tokenizer_config(out: Path) -> None:
    """A minimal tokenizer_config.json so `transformers.AutoTokenizer` loads tokenizer.json."""
    from tokenizers import Tokenizer

    from lmsys.data.tokenizer import EOS_CANDIDATES, PAD_CANDIDATES, first_token_id

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    conf = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30}
    eos = first_token_id(tok, EOS_CANDIDATES)
    if eos is not None:
        conf["eos_token"] = tok.id_to_token(eos)
    pad = first_token_id(tok, PAD_CANDIDATES)
    if pad is not None:
        conf["pad_token"] = tok.id_to_token(pad)
    (out / "tokenizer_config.json").write_text(json.dumps(conf, indent=2) + "\n")


__all__ = [
    "ConversionError",
    "config_from_hf",
    "config_to_hf",
    "hf_to_lmsys",
    "is_hf_dir",
    "lmsys_to_hf",
    "load_hf",
    "read_hf_config",
    "save_hf",
]
