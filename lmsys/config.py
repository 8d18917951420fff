"""Typed run configuration: YAML files plus `key=value` dotted overrides, validated at once.

    cfg = load_config("recipes/configs/tiny.yaml", ["mesh.fsdp=4", "steps=200"])

Every error is a `ConfigError` with one line that names the key, the value and a fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmsys.dotted import all_keys, build, flatten


class ConfigError(ValueError):
    """A bad configuration value; the message says which key and how to fix it."""


@dataclass
class ModelConfig:
    preset: str = ""  # a name from lmsys.models.presets; other model.* keys override it
    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 8
    head_dim: int = 32
    d_ff: int = 768
    rope_theta: float = 10000.0
    # Llama-3 RoPE frequency scaling; factor 0 turns it off.
    rope_scaling_factor: float = 0.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    qkv_bias: bool = False
    qk_norm: bool = False  # RMSNorm over head_dim on each query/key head before RoPE (Qwen3)
    init_std: float = 0.02
    attention_impl: str = "auto"
    # Mixture of experts (the MLP of every layer becomes a routed MoE; 0 experts = dense SwiGLU)
    n_experts: int = 0
    experts_per_token: int = 2  # top-k routing; the k weights are a softmax over the k chosen logits
    n_shared_experts: int = 0  # always-on experts beside the routed ones (DeepSeek)
    moe_d_ff: int = 0  # hidden size of each expert (shared ones too); 0 = d_ff
    # 0 = dropless; else each expert takes at most ceil(factor x k x row_tokens / n_experts)
    # tokens of a row (GShard capacity), the rest of its assignments are dropped
    moe_capacity_factor: float = 0.0
    router_aux_loss: float = 0.01  # weight of the load-balancing loss (1.0 when perfectly balanced)
    router_z_loss: float = 0.001  # weight of the router z-loss (mean squared logsumexp of logits)
    # true: the k weights are a softmax over the k chosen logits (Mixtral, norm_topk_prob); false:
    # the chosen experts' probabilities of a softmax over all experts, not renormalized (Qwen2-MoE)
    router_norm_topk: bool = True
    shared_expert_gate: bool = False  # shared experts' output x sigmoid(x . w) (Qwen2-MoE)
    shared_d_ff: int = 0  # the shared experts' hidden size; 0 = n_shared_experts x moe_d_ff
    # Sliding-window attention (Mistral, Gemma's local layers): a query sees the latest
    # `sliding_window` positions, itself included; 0 = none. With global_every > 0 every
    # global_every-th layer (layer i with (i + 1) % global_every == 0) attends globally instead
    # (Gemma 2: 2, Gemma 3: 6); rope_local_theta (0 = rope_theta) is the windowed layers' RoPE base
    sliding_window: int = 0
    global_every: int = 0
    rope_local_theta: float = 0.0
    # linear RoPE scaling (positions / factor) of the global layers when windowed ones are mixed
    # in (Gemma 3's larger models), of every layer otherwise; 0 = off
    rope_linear_factor: float = 0.0
    # Gemma: the gated MLP's activation (silu: SwiGLU | gelu_tanh: GeGLU), embeddings scaled by
    # sqrt(d_model), RMSNorms on the attention and MLP outputs too, (1 + w) norms, queries scaled by
    # query_pre_attn_scalar^-0.5 (0: head_dim), soft caps cap x tanh(x / cap) on the attention
    # logits and on the output logits (0: off)
    mlp_act: str = "silu"
    embed_scale: bool = False
    post_norms: bool = False
    norm_plus_one: bool = False  # RMSNorm weights applied as 1 + w (Gemma; they start at 0)
    query_pre_attn_scalar: float = 0.0
    attn_soft_cap: float = 0.0
    final_soft_cap: float = 0.0
    # how /v1/embeddings pools a sequence's final hidden states: "last" token or "mean"; "" = not
    # said (the server's --embed-pooling, default last); set from a sentence-transformers
    # Pooling config beside an imported HF model (lmsys.interop.hf_config)
    embed_pooling: str = ""


@dataclass
class MeshConfig:
    """Devices per mesh axis; one axis may be -1 to take the devices the others leave."""

    stage: int = 1  # pipeline parallelism: the layers split into this many stages (see `pipeline`)
    data: int = 1
    fsdp: int = -1
    sequence: int = 1  # context parallelism: each device holds 1/sequence of every sequence
    tensor: int = 1
    # expert parallelism: the experts of MoE layers split over this axis (and the batch with it)
    expert: int = 1
    sequence_method: str = "ring"  # ring (K/V passed around with ppermute) | allgather
    # causal load balancing for `sequence` > 1: the sequence cut into 2 x sequence chunks, device
    # i holding chunks i and 2 x sequence - 1 - i, so every device has equal causal attention work
    # (seq_len must be divisible by 2 x sequence); false: one contiguous chunk per device
    sequence_load_balance: bool = True
    # Hybrid meshes (multi-slice TPU, multi-node GPU): the devices come in granules (TPU slices,
    # or hosts/processes) joined by the slow data-center network (DCN); `dcn_<axis>` granules
    # along an axis make it mesh.<axis> x mesh.dcn_<axis> devices long, mesh.<axis> of them
    # inside each granule (fast ICI / NVLink). The product of the dcn_* keys is the number of
    # granules. No dcn_tensor: tensor parallelism all-reduces activations in every layer, so it
    # stays inside a granule. lmsys.parallel.mesh.build_mesh says how granules are found.
    dcn_stage: int = 1
    dcn_expert: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_sequence: int = 1


@dataclass
class PipelineConfig:
    """Pipeline parallelism over `mesh.stage` (lmsys.parallel.pipeline); unused when stage = 1."""

    microbatches: int = 0  # per (grad_accum) batch; 0 = mesh.stage; more shrink the bubble
    repeats: int = 1  # layer chunks per stage: 1 = GPipe, > 1 = circular (interleaved) schedule


@dataclass
class OptimizerConfig:
    lr: float = 3e-4
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the last step
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0  # global-norm clipping; 0 turns it off
    zero1: bool = False  # ZeRO-1: split the Adam moments over `data` too (params stay replicated there)


@dataclass
class CheckpointConfig:
    every: int = 100  # save every N steps (and at the end); 0 saves only at the end
    keep: int = 3
    async_save: bool = True


@dataclass
class DataConfig:
    source: str = "builtin"  # "builtin" (this Python's standard library sources) or paths, comma-separated
    tokenizer: str = "builtin"  # "builtin" (byte-level BPE trained on the source, cached) or a tokenizer.json path
    text_field: str = "text"  # the field holding the text in .jsonl files
    max_documents: int = 0  # 0 = all documents
    cache_dir: str = ""  # "" = $LMSYS_CACHE_DIR or ~/.cache/lmsys
    shuffle: bool = True
    # "text": documents, loss on every token; "chat": JSONL with `messages` ([{role, content}])
    # rendered with the tokenizer's chat template, loss on assistant tokens only (README: all formats).
    format: str = "text"
    # Resuming refuses data that differ from what the checkpoint was trained on (its data_index
    # would point at other samples); true: continue on the changed data from data_index.
    allow_changed_source: bool = False


@dataclass
class DistributedConfig:
    """Multi-process jobs. Empty: a launcher's environment (SLURM, Open MPI, Cloud TPU) is
    detected, else one process."""

    coordinator_address: str = ""  # host:port of process 0
    num_processes: int = 0  # 0 = from the launcher
    process_id: int = -1  # -1 = from the launcher


@dataclass
class TrackingConfig:
    """Experiment tracking beside metrics.jsonl/TensorBoard (process 0 only)."""

    mlflow: bool = False  # log the config as params and each metrics record to an MLflow run
    uri: str = ""  # MLflow tracking URI; "" = $LMSYS_REGISTRY_URI or the local registry database
    experiment: str = "lmsys"


@dataclass
class EvalConfig:
    """Held-out evaluation during training (lmsys.eval.heldout): every `every` steps and at the
    last step, the loss of `batches` fixed batches of held-out documents."""

    every: int = 0  # steps between evaluations; 0 = no evaluation
    batches: int = 4  # batches of batch_size rows of seq_len tokens per evaluation
    source: str = ""  # evaluation documents (files, as data.source); "" = the held-out split
    holdout: float = 0.0  # fraction of data.source's documents held out (never trained on)
    sample: str = ""  # `lmsys train` ends by printing this prompt's greedy continuation; "" = none


@dataclass
class LoraConfig:
    """Low-rank adapters (LoRA, Hu et al. 2021) on a frozen base (lmsys.models.lora): each target
    projection W becomes W + (alpha / rank) x A @ B, only A and B train (B starts at zero)."""

    rank: int = 0  # 0 = off (full fine-tuning)
    alpha: float = 16.0
    dropout: float = 0.0  # on the adapter's input, in training only
    targets: str = "q,v"  # comma-separated among q, k, v, o, gate, up, down; "all" = all seven
    base_quantize: str = ""  # "" | int8 | fp8: the frozen base's matrices stored so (QLoRA-style)


@dataclass
class DpoConfig:
    """Direct Preference Optimization (lmsys.train.dpo), the objective with data.format=preference."""

    beta: float = 0.1  # the KL penalty: rewards are beta x (policy - reference) log-probs


@dataclass
class RlConfig:  # GRPO from rewards (`lmsys rl`, lmsys.rl.loop; lmsys.train.grpo), data.format=prompts
    group_size: int = 8  # samples per prompt (G)
    prompts_per_step: int = 8  # prompts per rollout; batch_size = prompts_per_step x group_size
    temperature: float = 1.0  # sampling; the loss uses the model's own (temperature 1) log-probs
    top_p: float = 1.0
    max_new_tokens: int = 16  # per completion; prompt + completion must fit in seq_len
    updates_per_rollout: int = 1  # optimizer steps on each rollout batch (GRPO's mu)
    clip_eps: float = 0.2  # the policy ratio is clipped to [1 - clip_eps, 1 + clip_eps]
    kl_beta: float = 0.0  # weight of the k3 KL estimate to the frozen reference; 0 = no reference
    # module:function (prompts, completions, **columns) -> list[float]; or exact_match, regex, python_parses
    reward: str = "exact_match"
    reward_pattern: str = ""  # the regex of reward=regex when rows carry no `pattern`
    prompt_field: str = "prompt"  # the JSONL column holding the prompt text
    sft_steps: int = 0  # data.source=arithmetic without init_from: supervised warm-start steps first
    sft_lr: float = 3e-3  # the warm start's peak learning rate (optimizer.lr is the RL updates')
    engine_tensor: int = 1  # the rollout engine's tensor-parallel size (its mesh: the first devices)


@dataclass
class ProfileConfig:
    """A JAX profiler trace of a few training steps (lmsys.train.profile), for TensorBoard's
    profile plugin or Perfetto: steps start_step .. start_step + steps - 1 (as numbered in
    metrics.jsonl), each waited for before the trace stops."""

    steps: int = 0  # steps to trace; 0 = no trace
    start_step: int = 3  # the first traced step (the first steps warm up caches and allocators)
    dir: str = ""  # a local directory; "" = <run_dir>/profile (with several processes: process_<i>/ in it)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    data: DataConfig = field(default_factory=DataConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    rl: RlConfig = field(default_factory=RlConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    steps: int = 100
    batch_size: int = 8  # global, in sequences per step
    seq_len: int = 256
    grad_accum: int = 1  # microbatches per step; batch_size must divide by it
    seed: int = 0
    run_dir: str = "runs/default"
    remat: str = "none"  # none | full | selective
    dtype: str = "float32"  # compute dtype; params and optimizer state stay float32
    # Positions per chunk of the output projection + cross-entropy: the [batch, chunk, vocab]
    # logits exist one chunk at a time (recomputed in the backward), never the whole
    # [batch, seq_len, vocab]. 0 = the whole sequence at once.
    loss_chunk: int = 0
    log_every: int = 1
    peak_flops: float = 0.0  # per device, for MFU; 0 = known peak of the device kind
    max_nonfinite_steps: int = 5  # stop after this many non-finite steps in a row (they are skipped)
    # Fine-tune: a Hugging Face model directory or an lmsys run/convert directory whose weights
    # start a fresh run (model.* and, unless set, data.tokenizer come from there). "" = random init.
    init_from: str = ""


MESH_AXES = ("stage", "expert", "data", "fsdp", "sequence", "tensor")  # outermost first
DCN_AXES = ("stage", "expert", "data", "fsdp", "sequence")  # the axes that may span granules
SEQUENCE_METHODS = ("ring", "allgather")
REMAT_POLICIES = ("none", "full", "selective")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("auto", "xla", "pallas", "cudnn")
DATA_FORMATS = ("text", "chat", "preference", "prompts")


# ----------------------------------------------------------------------------- building


def _unknown(key: str) -> ConfigError:
    if key == "mesh.dcn_tensor":
        return ConfigError(
            "config key 'mesh.dcn_tensor' does not exist: tensor parallelism all-reduces activations "
            "in every layer, too often for the data-center network between slices / nodes; keep "
            "mesh.tensor inside a granule and span granules with mesh.dcn_data, dcn_fsdp, dcn_stage, "
            "dcn_expert or dcn_sequence")
    near = difflib.get_close_matches(key, all_keys(Config), n=1, cutoff=0.5)
    hint = f"; did you mean '{near[0]}'?" if near else "; see lmsys/config.py for the keys"
    return ConfigError(f"unknown config key '{key}'{hint}")


def parse_override(text: str) -> tuple[str, Any]:
    """`mesh.fsdp=4` -> ("mesh.fsdp", 4); values are read as YAML scalars."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value, e.g. steps=200")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    return key.strip(), value


def from_dict(tree: dict, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Builds and validates a Config from a nested dict (a parsed YAML file) and overrides."""
    flat = flatten(tree or {})
    for text in overrides:
        k, v = parse_override(text)
        flat[k] = v
    known = set(all_keys(Config))
    for key in flat:
        if key not in known:
            raise _unknown(key)
    preset = flat.get("model.preset")
    if preset:
        from lmsys.models.presets import PRESETS

        if preset not in PRESETS:
            raise ConfigError(
                f"model.preset '{preset}' is unknown; choose one of {', '.join(PRESETS)}")
        flat = {**{f"model.{k}": v for k, v in PRESETS[preset].items()}, **flat}
    try:
        cfg = build(Config, flat)
    except TypeError as e:  # a value that is not of its key's type
        raise ConfigError(str(e)) from None
    validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Reads a YAML config file (or none), applies `key=value` overrides and validates."""
    if path is None:
        return from_dict({}, overrides)
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    return config_from_yaml(path.read_text(), str(path), overrides)


def config_from_yaml(text: str, where: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A Config from the text of a YAML config file (`where` names it in errors)."""
    import yaml

    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{where}' is not valid YAML: {e}".splitlines()[0]) from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file '{where}' must hold a mapping of keys, got {type(tree).__name__}")
    return from_dict(tree, overrides)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path) -> None:
    """Writes the config as YAML to a local path or any pathlib-like path (etils.epath for URLs)."""
    import yaml

    path = Path(path) if isinstance(path, str) else path
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------- validation


def axis_size(mesh: MeshConfig, axis: str) -> int:
    """Devices along a mesh axis over all granules (mesh.<axis> x mesh.dcn_<axis>); -1 = fill."""
    v = getattr(mesh, axis)
    return v if v == -1 else v * getattr(mesh, f"dcn_{axis}", 1)


def check_key(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' = {value!r}: {rule}")


def validate(cfg: Config) -> None:
    """Checks everything that does not need devices (the mesh size is checked in parallel.mesh)."""
    from lmsys.config_checks import (check_dpo, check_eval, check_family, check_lora, check_moe,
                                     check_pipeline, check_profile, check_rl, check_sequence, check_tensor)

    m = cfg.model
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff"):
        check_key(getattr(m, key) > 0, f"model.{key}", getattr(m, key), "must be positive")
    check_key(m.n_heads % m.n_kv_heads == 0, "model.n_heads", m.n_heads,
              f"must be a multiple of model.n_kv_heads ({m.n_kv_heads}) for grouped-query attention")
    check_key(m.head_dim % 2 == 0, "model.head_dim", m.head_dim, "must be even for RoPE")
    check_key(m.rope_theta > 0, "model.rope_theta", m.rope_theta, "must be positive")
    check_key(m.rope_scaling_factor == 0 or m.rope_scaling_factor >= 1, "model.rope_scaling_factor",
              m.rope_scaling_factor, "must be 0 (off) or >= 1")
    check_key(m.norm_eps > 0, "model.norm_eps", m.norm_eps, "must be positive")
    check_key(m.init_std > 0, "model.init_std", m.init_std, "must be positive")
    check_key(m.attention_impl in ATTENTION_IMPLS, "model.attention_impl", m.attention_impl,
              f"must be one of {', '.join(ATTENTION_IMPLS)}")

    for axis in MESH_AXES:
        v = getattr(cfg.mesh, axis)
        check_key(v == -1 or v >= 1, f"mesh.{axis}", v, "must be a positive device count or -1 (fill)")
    for axis in DCN_AXES:
        v = getattr(cfg.mesh, f"dcn_{axis}")
        check_key(v >= 1, f"mesh.dcn_{axis}", v, "must be a positive number of slices / nodes (1 = none)")
    fills = [a for a in MESH_AXES if getattr(cfg.mesh, a) == -1]
    check_key(len(fills) <= 1, f"mesh.{fills[-1] if fills else 'data'}", -1,
              f"only one mesh axis may be -1, got {', '.join(fills)}")
    check_key(cfg.mesh.sequence_method in SEQUENCE_METHODS, "mesh.sequence_method", cfg.mesh.sequence_method,
              f"must be one of {', '.join(SEQUENCE_METHODS)}")
    if axis_size(cfg.mesh, "sequence") > 1:  # -1 (fill) is checked once the mesh is built (Trainer)
        check_sequence(cfg, axis_size(cfg.mesh, "sequence"))
    if cfg.mesh.tensor > 1:  # -1 (fill) is checked once the mesh is built (check_mesh)
        check_tensor(cfg, cfg.mesh.tensor)

    check_moe(cfg)
    check_family(cfg)

    check_key(cfg.pipeline.microbatches >= 0, "pipeline.microbatches", cfg.pipeline.microbatches,
              "must be >= 0 (0 = mesh.stage)")
    check_key(cfg.pipeline.repeats >= 1, "pipeline.repeats", cfg.pipeline.repeats,
              "must be >= 1 (1 = GPipe, more = circular)")

    o = cfg.optimizer
    check_key(o.lr > 0 and math.isfinite(o.lr), "optimizer.lr", o.lr, "must be a positive number")
    check_key(o.warmup_steps >= 0, "optimizer.warmup_steps", o.warmup_steps, "must be >= 0")
    check_key(0 <= o.min_lr_ratio <= 1, "optimizer.min_lr_ratio", o.min_lr_ratio, "must be in [0, 1]")
    check_key(0 <= o.b1 < 1, "optimizer.b1", o.b1, "must be in [0, 1)")
    check_key(0 <= o.b2 < 1, "optimizer.b2", o.b2, "must be in [0, 1)")
    check_key(o.eps > 0, "optimizer.eps", o.eps, "must be positive")
    check_key(o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay, "must be >= 0")
    check_key(o.clip_norm >= 0, "optimizer.clip_norm", o.clip_norm, "must be >= 0 (0 = no clipping)")

    check_key(cfg.checkpoint.every >= 0, "checkpoint.every", cfg.checkpoint.every, "must be >= 0")
    check_key(cfg.checkpoint.keep >= 1, "checkpoint.keep", cfg.checkpoint.keep, "must be >= 1")
    check_key(cfg.data.max_documents >= 0, "data.max_documents", cfg.data.max_documents, "must be >= 0")
    check_key(bool(cfg.data.source), "data.source", cfg.data.source, "must be 'builtin' or paths")
    check_key(cfg.data.format in DATA_FORMATS, "data.format", cfg.data.format,
              f"must be one of {', '.join(DATA_FORMATS)}")
    check_key(cfg.data.format == "text" or cfg.data.tokenizer != "builtin" or bool(cfg.init_from)
              or cfg.data.source == "arithmetic",  # the built-in task brings its own tokenizer
              "data.tokenizer", cfg.data.tokenizer,
              f"data.format={cfg.data.format} needs the model's tokenizer: set init_from=MODEL_DIR or "
              f"data.tokenizer=PATH")

    dist = cfg.distributed
    check_key(dist.num_processes >= 0, "distributed.num_processes", dist.num_processes, "must be >= 0 (0 = auto)")
    check_key(dist.process_id >= -1, "distributed.process_id", dist.process_id, "must be >= 0, or -1 (auto)")
    check_key(dist.process_id < max(dist.num_processes, dist.process_id + 1), "distributed.process_id",
              dist.process_id, f"must be below distributed.num_processes ({dist.num_processes})")
    check_key(not dist.coordinator_address or ":" in dist.coordinator_address, "distributed.coordinator_address",
              dist.coordinator_address, "must be host:port")
    check_key(cfg.steps >= 1, "steps", cfg.steps, "must be >= 1")
    check_key(cfg.batch_size >= 1, "batch_size", cfg.batch_size, "must be >= 1")
    check_key(cfg.seq_len >= 2, "seq_len", cfg.seq_len, "must be >= 2")
    check_key(cfg.grad_accum >= 1, "grad_accum", cfg.grad_accum, "must be >= 1")
    check_key(cfg.batch_size % cfg.grad_accum == 0, "batch_size", cfg.batch_size,
              f"must be divisible by grad_accum ({cfg.grad_accum})")
    check_key(cfg.log_every >= 1, "log_every", cfg.log_every, "must be >= 1")
    check_key(cfg.max_nonfinite_steps >= 1, "max_nonfinite_steps", cfg.max_nonfinite_steps, "must be >= 1")
    check_key(cfg.peak_flops >= 0, "peak_flops", cfg.peak_flops, "must be >= 0 (0 = known device peak)")
    check_key(cfg.remat in REMAT_POLICIES, "remat", cfg.remat, f"must be one of {', '.join(REMAT_POLICIES)}")
    check_key(cfg.dtype in DTYPES, "dtype", cfg.dtype, f"must be one of {', '.join(DTYPES)}")
    check_key(cfg.loss_chunk >= 0 and (cfg.loss_chunk == 0 or cfg.seq_len % cfg.loss_chunk == 0),
              "loss_chunk", cfg.loss_chunk, f"must be 0 (off) or a divisor of seq_len ({cfg.seq_len})")
    check_key(cfg.loss_chunk == 0 or axis_size(cfg.mesh, "sequence") == 1, "loss_chunk", cfg.loss_chunk,
              "must be 0 with mesh.sequence > 1 (chunks of a sequence split over devices are not "
              "supported); the logits are then already split over `sequence`")
    check_key(bool(cfg.run_dir), "run_dir", cfg.run_dir, "must be a directory path")
    check_key(bool(cfg.tracking.experiment), "tracking.experiment", cfg.tracking.experiment,
              "must name an MLflow experiment, e.g. lmsys")
    if axis_size(cfg.mesh, "stage") > 1:  # -1 (fill) is checked once the mesh is built (Trainer)
        check_pipeline(cfg, axis_size(cfg.mesh, "stage"))
    check_eval(cfg)
    check_lora(cfg)
    check_dpo(cfg)
    check_rl(cfg)
    check_profile(cfg)

