"""Hugging Face safetensors checkpoints in and out (Llama / Mistral / Qwen2 / Qwen3, Gemma 2 / 3,
Mixtral / Qwen2-MoE / Qwen3-MoE); the config.json mapping is lmsys.interop.hf_config, whole-directory
conversions lmsys.interop.convert.

    params, cfg = load_hf("hf/", shardings)                      # each device reads its slices
    save_hf(params, cfg, "out/", tokenizer_dir="hf/", dtype="bfloat16")

No PyTorch at run time: tensors are read with `safe_open(framework="numpy")` (bf16 arrives as
an ml_dtypes array) and written with `safetensors.numpy`. The lmsys layout is the HF one with
Linear weights transposed to [in, out], heads split out and layers stacked on axis 0; q/k need
no permutation because lmsys RoPE rotates halves like HF Llama. MoE experts are one HF tensor
per (layer, expert), stacked on lmsys's `experts` axis: a device split over `expert` reads only
its experts' tensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from lmsys.config import ModelConfig
from lmsys.data.tokenizer import copy_tokenizer_files
from lmsys.interop.hf_config import ConversionError, config_to_hf, hf_model_config

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


# ----------------------------------------------------------------------------- tensor mapping


def _hf_names(model: ModelConfig) -> dict:
    """lmsys leaf path -> (HF name pattern with {i} for the layer and {e} for the expert, kind).
    kind says how to turn the HF tensor into the lmsys one (see `_hf_block`, `_to_hf`)."""
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
    if model.post_norms:  # Gemma: post_attention_layernorm is on the attention's output
        names[("layers", "post_attn_norm")] = (p + "post_attention_layernorm.weight", "copy")
        names[("layers", "mlp_norm")] = (p + "pre_feedforward_layernorm.weight", "copy")
        names[("layers", "post_mlp_norm")] = (p + "post_feedforward_layernorm.weight", "copy")
    if model.n_experts:
        names.update(_moe_names(model, p))
    return names


def _moe_names(model: ModelConfig, p: str) -> dict:
    """The MoE layer's tensors: Mixtral's block_sparse_moe (w1 gate, w3 up, w2 down) or Qwen's
    mlp.experts.{e}.*_proj, the router, Qwen2-MoE's gated shared expert."""
    if model.qkv_bias or model.qk_norm:  # Qwen2-MoE / Qwen3-MoE
        moe, gate, up, down = p + "mlp.", "gate_proj", "up_proj", "down_proj"
    else:  # Mixtral
        moe, gate, up, down = p + "block_sparse_moe.", "w1", "w3", "w2"
    names = {("layers", "router"): (moe + "gate.weight", "transpose")}
    for leaf, proj in (("w_gate", gate), ("w_up", up), ("w_down", down)):
        names[("layers", leaf)] = (moe + "experts.{e}." + proj + ".weight", "transpose")
    if model.n_shared_experts:
        for leaf, proj in (("shared_w_gate", "gate_proj"), ("shared_w_up", "up_proj"),
                           ("shared_w_down", "down_proj")):
            names[("layers", leaf)] = (moe + "shared_expert." + proj + ".weight", "transpose")
    if model.shared_expert_gate:
        names[("layers", "shared_gate")] = (moe + "shared_expert_gate.weight", "row")
    return names


def _lead(path: tuple[str, ...], pattern: str) -> int:
    """How many leading axes of the lmsys leaf index HF tensors: layers, and experts."""
    return (path[0] == "layers") + ("{e}" in pattern)


def _tensor_names(pattern: str, lead: int, shape: tuple[int, ...]) -> list:
    """The HF names of a leaf, nested like its `lead` leading axes (a list per layer, of experts)."""
    if lead == 0:
        return [pattern]
    if lead == 1:
        return [pattern.format(i=i) for i in range(shape[0])]
    return [[pattern.format(i=i, e=e) for e in range(shape[1])] for i in range(shape[0])]


def _flat(names) -> list[str]:
    return [m for n in names for m in (_flat(n) if isinstance(n, list) else [n])]


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
    if kind == "row":  # [D] <- [1, D]
        return (1, shape[0])
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
    if kind == "row":
        return (slice(0, 1), cut(ranges[0])), lambda x: x[0]
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
    if kind == "row":
        return x[None]
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


def _ignorable(name: str, model: ModelConfig) -> bool:
    """HF tensors lmsys may skip: RoPE tables some old checkpoints saved, and an lm_head that
    transformers itself ties to (replaces by) the embedding."""
    return name.endswith("rotary_emb.inv_freq") or (model.tie_embeddings and name == "lm_head.weight")


def load_hf(hf_dir: str | Path, shardings=None, dtype=np.float32, model=None):
    """(params, ModelConfig) from an HF model directory (config.json + one or sharded
    safetensors; `model`: its ModelConfig when the caller has read it already). Every tensor's name and shape is checked first (a missing, unexpected or
    misshapen tensor is a ConversionError naming it); then each leaf is built with
    `jax.make_array_from_callback` on its sharding (a pytree like the params; None: the default
    device): each device's block is read straight from the memory-mapped files as the slices
    of the HF tensors (per layer) that hold it, so no host or device ever holds a whole sharded
    tensor, and host memory holds about one leaf's shards at a time."""
    import jax

    hf_dir = Path(hf_dir)
    if model is None:
        model, _ = hf_model_config(hf_dir)
    reader = _TensorReader(hf_dir)
    from lmsys.models import llama

    specs = llama.param_specs(model)
    leaves = []
    for path, (pattern, kind) in _hf_names(model).items():
        shape = _get(specs, path).shape
        lead = _lead(path, pattern)
        names = _tensor_names(pattern, lead, shape)
        for name in _flat(names):
            reader.check(name, _hf_shape(shape[lead:], kind), str(hf_dir))
        leaves.append((path, kind, shape, names, lead))
    used = {name for _, _, _, names, _ in leaves for name in _flat(names)}
    extra = sorted(n for n in reader.weight_map if n not in used and not _ignorable(n, model))
    if extra:
        raise ConversionError(
            f"{hf_dir}: tensors {', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''} have no "
            f"place in the lmsys model of this config.json ({model.n_layers} layers, "
            f"qkv_bias={model.qkv_bias}, qk_norm={model.qk_norm}, tie_embeddings="
            f"{model.tie_embeddings}, n_experts={model.n_experts}); lmsys would drop them, so it "
            "refuses the checkpoint")

    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params: dict = {}
    for path, kind, shape, names, lead in leaves:
        blocks: dict = {}  # replicas of one block are read once

        def block(index, kind=kind, shape=shape, names=names, lead=lead, blocks=blocks):
            ranges = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
            if ranges not in blocks:
                hf_index, to_lmsys = _hf_block(ranges[lead:], shape[lead:], kind)

                def read(name):
                    return np.asarray(to_lmsys(reader.read(name, hf_index)), dtype)

                if lead == 0:
                    blocks[ranges] = read(names[0])
                elif lead == 1:
                    blocks[ranges] = np.stack([read(names[i]) for i in range(*ranges[0])])
                else:
                    blocks[ranges] = np.stack([np.stack([read(names[i][e]) for e in range(*ranges[1])])
                                               for i in range(*ranges[0])])
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
        lead = _lead(path, pattern)
        names = _tensor_names(pattern, lead, expected)
        items = ([(names[0], host)] if lead == 0 else
                 [(names[i], host[i]) for i in range(len(names))] if lead == 1 else
                 [(names[i][e], host[i, e]) for i in range(len(names)) for e in range(len(names[i]))])
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
