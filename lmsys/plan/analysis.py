"""Analytical per-device memory of the training state (and a long sequence's activations) and
the minimum collective bytes of each parallelism strategy, for any mesh, without devices.

The shared formulas: tests check them against XLA's memory analysis of the compiled train step,
and the planner reuses them. A mesh is a dict of axis sizes (`mesh_shape` resolves a config's
-1; axes left out are 1). Each parameter is split exactly as the Trainer lays it out: the rule
table (lmsys.parallel.mesh) names the mesh axes of each logical axis, e.g. `layers` over
`stage` (pipeline), `embed` over `fsdp` (ZeRO-3), `heads`/`mlp`/`vocab` over `tensor`, the
`experts` of MoE weights over `expert` (expert parallelism); a
dimension that its mesh axes do not divide stays whole. Sizes are bytes per device.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import AbstractMesh

from lmsys.config import MESH_AXES, ModelConfig
from lmsys.models import llama
from lmsys.parallel.mesh import DEFAULT_RULES, Rules, zero1_table


ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}  # bytes per element of each compute dtype


def per_device(n: int, shards: int) -> int:
    """A dimension of n split over `shards` devices as the rule table splits it: evenly, or
    left whole when they do not divide it."""
    return n // shards if n % shards == 0 else n


def _rules(sizes: dict[str, int], table: dict | None) -> Rules:
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; the axes are {', '.join(MESH_AXES)}")
    if any(v < 1 for v in sizes.values()):
        raise ValueError(f"mesh sizes must be positive device counts, got {sizes}; resolve -1 "
                         "with lmsys.parallel.mesh_shape first")
    mesh = AbstractMesh(tuple(sizes.get(a, 1) for a in MESH_AXES), MESH_AXES)
    return Rules(mesh, dict(DEFAULT_RULES if table is None else table))


def param_bytes_per_device(model: ModelConfig, sizes: dict[str, int], *, table: dict | None = None,
                           itemsize: int = 4) -> dict[str, float]:
    """Bytes of each top-level parameter group (`embed`, `layers`, `final_norm`, `unembed`) that
    one device holds (float32 by default); sum the values for the total."""
    rules = _rules(sizes, table)
    out = {}
    for group, specs in llama.param_specs(model).items():
        leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, llama.ParamSpec))
        out[group] = sum(_bytes_per_device(rules, s, itemsize) for s in leaves)
    return out


def expert_param_bytes_per_device(model: ModelConfig, sizes: dict[str, int], *, table: dict | None = None,
                                  itemsize: int = 4) -> float:
    """Bytes of the routed experts' weights (the params with an `experts` axis) that one device
    holds: 1/expert of them with expert parallelism (and split further by fsdp/tensor); 0 for a
    dense model. Included in `param_bytes_per_device`'s `layers`."""
    rules = _rules(sizes, table)
    specs = jax.tree.leaves(llama.param_specs(model)["layers"], is_leaf=lambda x: isinstance(x, llama.ParamSpec))
    return sum(_bytes_per_device(rules, s, itemsize) for s in specs if "experts" in s.axes)


def _bytes_per_device(rules: Rules, s: llama.ParamSpec, itemsize: int) -> float:
    spec = rules.spec(s.axes, s.shape)
    shards = math.prod(rules.mesh.shape[a] for entry in spec if entry is not None
                       for a in ((entry,) if isinstance(entry, str) else entry))
    return math.prod(s.shape) * itemsize / shards


def optimizer_state_bytes_per_device(model: ModelConfig, sizes: dict[str, int], *, zero1: bool = False,
                                     table: dict | None = None) -> float:
    """Bytes of AdamW's two float32 moments on one device: laid out like the parameters, and
    with `zero1` split over `data` too (the step counter and other scalars are left out)."""
    table = dict(DEFAULT_RULES if table is None else table)
    moments = param_bytes_per_device(model, sizes, table=zero1_table(table) if zero1 else table)
    return 2 * sum(moments.values())


def collective_bytes_min(cfg, sizes: dict[str, int]) -> dict[str, float]:
    """Analytical minimum of the bytes one device sends per train step, by cause (sum the
    values for the total), for a run config `cfg` (lmsys.config.Config) on a mesh of `sizes`.

    Convention: bandwidth-optimal (ring) collectives over a group of n devices; one device
    sends 2(n-1)/n x S for an all-reduce of S bytes, (n-1)/n x S for an all-gather whose result
    is S or a reduce-scatter whose input is S, (n-1)/n x S for an all-to-all of S and S for a
    point-to-point send. Gradients are float32 like the parameters (4 bytes); activations
    are in `cfg.dtype`. P_t = parameter bytes per device with only `stage`, `tensor` and
    `expert` applied (what a device computes with); B_loc = batch rows per device
    (batch_size / (expert x data x fsdp)); T_loc = seq_len / sequence; L = layers per stage.
    Terms (each present only when its axes are > 1; combined meshes add them):

    - `grad all-reduce`: data parallelism over the replica axes R = data x sequence (x expert
      for the dense parameters, whose rows split over `expert` too): 2(R-1)/R x P_t / fsdp.
      ZeRO-1 (`optimizer.zero1`) moves the same bytes as a reduce-scatter of the gradients plus
      an all-gather of the updated parameters: (R-1)/R + (R-1)/R.
    - `fsdp gather+scatter` (ZeRO-3 over fsdp = f, per microbatch of grad_accum): each layer's
      parameters all-gathered once per pass that uses them — the forward, and the backward
      (under remat the recomputed forward and the backward run in the same pass and share one
      gather: lmsys gathers a layer explicitly, in the compute dtype, inside the rematerialized
      layer) — and its gradients reduce-scattered once; the output projection is gathered once
      (kept for the backward) and its gradient reduce-scattered once: grad_accum x (f-1)/f x
      (3 x P_layers + 2 x P_head) in the compute dtype (under remat; without remat the layers are
      gathered as stored, float32, and the partitioner decides). P_head is the unembedding and
      final norm (with tied embeddings the table is the head).
    - `embedding all-to-all` (fsdp = f): the table stays in its d_model shards; the token ids
      are all-gathered over fsdp, each device looks up its group's rows in its own slice, and an
      all-to-all hands each device its rows whole (lmsys.parallel.fsdp.embed_lookup); the
      gradient goes back by the transposed all-to-all: (f-1)/f x (2 x B_loc x T_loc x d_model x
      itemsize + f x B_loc x T_loc x 4 bytes of int32 ids).
    - `tensor activations` (Megatron over tensor = t): per layer 2 all-reduces forward (after
      attention's and the MLP's row-parallel matmuls) and 2 backward (the input gradients of
      the column-parallel matmuls), plus 1 for the vocab-parallel embedding lookup (forward)
      and 1 for the vocab-parallel head's input gradient (backward): (4L + 2) x 2(t-1)/t x A,
      A = B_loc x T_loc x d_model x itemsize.
    - `sequence K/V` (context parallelism over sequence = s, per layer, K and V chunks of
      C = B_loc x T_loc x kv_heads_loc x head_dim x itemsize each): ring: K and V passed s-1
      times in the forward, their gradient accumulators s-1 times in the backward (the K/V
      chunks received in the forward kept for it): 4(s-1) x C; allgather: K and V all-gathered
      forward, their gradients reduce-scattered backward: the same 4(s-1) x C.
    - `pipeline activations` (GPipe/circular over stage = p with m microbatches of
      A_mb = B_loc/m x T_loc x d_model x itemsize): a device in the middle of the pipeline sends
      each microbatch's activation on (forward) and its gradient back (backward), once per
      layer chunk it holds (repeats v): 2 x m x v x A_mb.
    - `expert all-to-all` (expert parallelism over expert = e, per MoE layer): the dispatch and
      combine all-to-alls forward and their transposes backward, 4 x (e-1)/e x k x N x d_model x
      itemsize for the k = experts_per_token copies of the N = B_loc x T_loc local tokens (only
      routed tokens; a capacity buffer with empty slots sends more).
    """
    m = cfg.model
    _rules(sizes, None)  # validates the axes and sizes
    g = {a: sizes.get(a, 1) for a in MESH_AXES}
    item = ITEMSIZE[cfg.dtype]
    rows = g["expert"] * g["data"] * g["fsdp"]
    if cfg.batch_size % rows or cfg.seq_len % g["sequence"] or m.n_layers % g["stage"]:
        raise ValueError(f"batch_size {cfg.batch_size}, seq_len {cfg.seq_len} and n_layers {m.n_layers} "
                         f"must split over the mesh {g}")
    b_loc, t_loc, layers = cfg.batch_size // rows, cfg.seq_len // g["sequence"], m.n_layers // g["stage"]
    compute = {a: g[a] for a in ("stage", "tensor", "expert")}
    p_t = sum(param_bytes_per_device(m, compute).values())
    p_experts = expert_param_bytes_per_device(m, compute)
    out: dict[str, float] = {}

    def ring(n: int) -> float:
        return (n - 1) / n

    r = g["data"] * g["sequence"]
    re_ = r * g["expert"]
    grad = 2 * (ring(re_) * (p_t - p_experts) + ring(r) * p_experts) / g["fsdp"]
    if grad:
        out["grad all-reduce"] = grad
    f = g["fsdp"]
    if f > 1:
        groups = param_bytes_per_device(m, compute)
        p_head = p_t - groups["layers"] - (0 if m.tie_embeddings else groups["embed"])
        layer_item = item if cfg.remat != "none" else 4
        out["fsdp gather+scatter"] = cfg.grad_accum * ring(f) * (
            3 * groups["layers"] * layer_item / 4 + 2 * p_head * item / 4)
        out["embedding all-to-all"] = ring(f) * (2 * b_loc * t_loc * m.d_model * item + f * b_loc * t_loc * 4)
    t = g["tensor"]
    if t > 1:
        a = b_loc * t_loc * m.d_model * item
        out["tensor activations"] = (4 * layers + 2) * 2 * ring(t) * a
    s = g["sequence"]
    if s > 1:
        kv = per_device(m.n_kv_heads, t)
        c = b_loc * t_loc * kv * m.head_dim * item
        out["sequence K/V"] = layers * 4 * (s - 1) * c  # ring and allgather alike
    p = g["stage"]
    if p > 1:
        micro = cfg.pipeline.microbatches or p
        out["pipeline activations"] = 2 * micro * cfg.pipeline.repeats * (b_loc // micro) * t_loc * m.d_model * item
    e = g["expert"]
    if e > 1 and m.n_experts:
        out["expert all-to-all"] = layers * 4 * ring(e) * m.experts_per_token * b_loc * t_loc * m.d_model * item
    return out


# ----------------------------------------------------------------------------- activations (context parallelism)


# Bytes XLA keeps per query-key pair and head for the backward pass (fp32, no remat; measured
# with XLA:CPU's memory analysis at 512-2048 tokens): a softmax over whole rows (plain attention,
# `allgather`) keeps logits, masked logits and probabilities (~3.6 floats); the ring's online
# softmax ~1.75 floats (~2.25 with the contiguous layout, whose skipped blocks sit under lax.cond).
PAIR_BYTES = {"softmax": 14.5, "ring": 7.0, "ring_contiguous": 9.0}


def attention_pairs_per_row(seq_len: int, sequence: int = 1, method: str = "ring",
                            load_balance: bool = True) -> float:
    """Query-key pairs one device computes per batch row and head under a causal mask
    (`attention_work_per_device` counts the same number in the running code)."""
    t = seq_len / sequence
    if sequence == 1 or method == "allgather":
        return t * seq_len
    if load_balance:  # 3 of 4 half-blocks of its own chunk, 2 of 4 of each other device's
        return (2 * sequence + 1) / 4 * t * t
    return sequence * t * t  # every block, skipped ones under lax.cond included (the slowest device)


def activation_bytes_per_device(model, *, batch: int, seq_len: int, sequence: int = 1,
                                method: str = "ring", load_balance: bool = True,
                                batch_shards: int = 1, tensor: int = 1) -> float:
    """Bytes of activations one device keeps for the backward pass of a float32 train step
    without remat: `batch` rows of `seq_len` tokens split over `batch_shards` (data x fsdp) and
    `sequence` devices, heads/mlp/vocab over `tensor`. Per token and layer: the residual stream,
    norms and projections (6 D + 2 N H + 2 K H + 4 F floats); per query-key pair and head the
    attention's PAIR_BYTES; the ring adds each fold's running output and softmax statistics and
    each step's K/V chunk, all-gather the whole sequence's K/V; the loss 4 V floats per token.
    The rest of XLA's temporaries (gradients, optimizer updates) scale with the parameters, not
    the sequence; `tests/test_context_parallel.py` checks this against memory_analysis()."""
    if method not in ("ring", "allgather"):
        raise ValueError(f"method must be 'ring' or 'allgather', got {method!r}")
    if sequence < 1 or batch_shards < 1 or tensor < 1:
        raise ValueError(f"sequence, batch_shards and tensor must be >= 1, got {sequence}, "
                         f"{batch_shards}, {tensor}")
    m = model
    N, K = per_device(m.n_heads, tensor), per_device(m.n_kv_heads, tensor)
    F, V = per_device(m.d_ff, tensor), per_device(m.vocab_size, tensor)
    D, H, n = m.d_model, m.head_dim, sequence
    rows = batch / batch_shards
    tokens = rows * seq_len / n
    per_token = 6 * D + 2 * N * H + 2 * K * H + 4 * F
    kind = "softmax"
    if n > 1 and method == "allgather":
        per_token += n * 2 * K * H
    elif n > 1:
        folds = (2 * n + 1) / 2 if load_balance else n  # token-equivalents of all folds
        per_token += folds * (2 * N * H + 2 * N) + n * 2 * K * H
        kind = "ring" if load_balance else "ring_contiguous"
    pairs = rows * N * attention_pairs_per_row(seq_len, n, method, load_balance)
    return m.n_layers * (4 * tokens * per_token + PAIR_BYTES[kind] * pairs) + 4 * tokens * 4 * V


# ----------------------------------------------------------------------------- train step memory


def train_memory_per_device(cfg, sizes: dict[str, int], *, flash: bool = True) -> dict[str, float]:
    """Bytes one device needs for the train step of run config `cfg` on a mesh of `sizes`, by
    part (sum the values for the total; `arguments` parts are the step's inputs, the rest XLA's
    temporaries). `flash`: attention keeps O(tokens) (a flash kernel; False: the XLA softmax,
    which keeps [heads, seq, seq] float32 scores per row during its backward).

    Arguments: float32 params and the two Adam moments as laid out (`param_bytes_per_device`,
    `optimizer_state_bytes_per_device`) and the batch (5 int32/float32 arrays of its rows).
    Temporaries, with b = rows per device per microbatch, t = seq_len / sequence, the compute
    dtype's itemsize i and D, N'H, K'H, F', V' the model, head, kv, mlp and vocab widths on
    one device:
    - `gradients`: float32, laid out like the params.
    - `saved activations`: per layer, what the backward needs from the forward. Remat `full`:
      the layer's input, D x i per token. `selective`: also q, k, v and the two block outputs
      (N'H + 2K'H + 2D) x i. `none`: every intermediate, (6D + 2N'H + 2K'H + 4F') x 4 (the
      float32 norm/RoPE copies included; as in `activation_bytes_per_device`).
    - `layer backward`: the live set of one layer's backward (its recomputed forward under
      remat): (5D + 3N'H + 4K'H + 5F') x i per token, and without a flash kernel
      PAIR_BYTES["softmax"] per query-key pair and head; plus, under fsdp, the layer's gathered
      weights and their gradient before the reduce-scatter, 3 x the layer's params / (f x 4) x i.
    - `embedding and head`: under fsdp the gathered output projection (kept from the forward
      for the backward) and its gradient, and the embedding table's gradient (its gathered
      copy is freed after the lookup): 3 x V' x D x i (2 with tied embeddings);
      with `loss_chunk` the head's float32 gradient accumulator, one per batch shard, V' x D x 4.
    - `logits`: float32 logits, their softmax and gradient for the positions one loss chunk
      holds (b x loss_chunk, or all b x t): 3 x V' x 4 per position.
    """
    m = cfg.model
    g = {a: sizes.get(a, 1) for a in MESH_AXES}
    item = ITEMSIZE[cfg.dtype]
    split = lambda n: per_device(n, g["tensor"])  # noqa: E731
    D, H = m.d_model, m.head_dim
    NH, KH = split(m.n_heads) * H, split(m.n_kv_heads) * H
    F = split(m.moe_d_ff * m.experts_per_token if m.n_experts else m.d_ff)
    V = split(m.vocab_size)
    rows = cfg.batch_size // (g["expert"] * g["data"] * g["fsdp"] * cfg.grad_accum)
    t = cfg.seq_len // g["sequence"]
    tokens = rows * t
    layers = m.n_layers // g["stage"]
    params = param_bytes_per_device(m, sizes)
    out = {
        "params": sum(params.values()),
        "optimizer state": optimizer_state_bytes_per_device(m, sizes, zero1=cfg.optimizer.zero1),
        "batch": 5 * 4 * cfg.batch_size // (g["expert"] * g["data"] * g["fsdp"]) * cfg.seq_len,
        "gradients": sum(params.values()),
    }
    if cfg.remat == "full":
        saved = D * item
    elif cfg.remat == "selective":
        saved = (NH + 2 * KH + 3 * D) * item
    else:
        saved = (6 * D + 2 * NH + 2 * KH + 4 * F) * 4
    out["saved activations"] = layers * tokens * saved
    work = tokens * (5 * D + 3 * NH + 4 * KH + 5 * F) * item
    if not flash:
        work += PAIR_BYTES["softmax"] * rows * split(m.n_heads) * attention_pairs_per_row(
            cfg.seq_len, g["sequence"])
    if g["fsdp"] > 1:
        work += 3 * params["layers"] / layers / 4 * item
    out["layer backward"] = work
    head = 0.0
    if g["fsdp"] > 1:
        head += (2 if m.tie_embeddings else 3) * V * D * item
    chunk = cfg.loss_chunk if 0 < cfg.loss_chunk < t else t
    if chunk < t:
        head += V * D * 4
    out["embedding and head"] = head
    out["logits"] = 3 * rows * chunk * V * 4
    return out


ARGUMENT_PARTS = ("params", "optimizer state", "batch")
