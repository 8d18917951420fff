"""Config rules beyond the basic ranges of lmsys.config.validate, which applies them all: the
model families' and sections' own (eval, LoRA, DPO, RL, profiling), and those that depend on mesh
axis sizes (experts, tensor, sequence and pipeline splits, the batch split) — for the sizes a
config names; the Trainer (on its built mesh, where a -1 axis is known) and `lmsys plan` (on the
sizes it plans for) apply the mesh ones through `check_mesh`."""

from __future__ import annotations

import dataclasses
import math

from lmsys.config import Config, ConfigError, axis_size, check_key


def check_moe(cfg: Config) -> None:
    """The mixture-of-experts keys, and a `mesh.expert` that splits the experts evenly."""
    m, e = cfg.model, axis_size(cfg.mesh, "expert")
    check_key(m.n_experts >= 0, "model.n_experts", m.n_experts, "must be >= 0 (0 = a dense MLP)")
    if not m.n_experts:
        if e > 1:
            check_experts(cfg, e)
        return
    check_key(1 <= m.experts_per_token <= m.n_experts, "model.experts_per_token", m.experts_per_token,
              f"must be between 1 and model.n_experts ({m.n_experts})")
    for key in ("n_shared_experts", "moe_d_ff", "moe_capacity_factor", "router_aux_loss", "router_z_loss"):
        check_key(getattr(m, key) >= 0, f"model.{key}", getattr(m, key), "must be >= 0")
    t = cfg.mesh.tensor
    check_key(t <= 1 or (m.moe_d_ff or m.d_ff) % t == 0, "model.moe_d_ff", m.moe_d_ff or m.d_ff,
              f"must be divisible by mesh.tensor ({t})")
    if e > 1:  # -1 (fill) is checked once the mesh is built (lmsys.train.Trainer)
        check_experts(cfg, e)


def check_experts(cfg: Config, n: int) -> None:
    """`n` devices on the expert axis each hold the same number of whole experts."""
    check_key(cfg.model.n_experts > 0, "mesh.expert", n,
              "needs a mixture-of-experts model (model.n_experts > 0); use mesh.data for data parallelism")
    check_key(cfg.model.n_experts % n == 0, "model.n_experts", cfg.model.n_experts,
              f"must be divisible by mesh.expert ({n}) so each device holds whole experts; change "
              "mesh.expert or model.n_experts")


def check_mesh(cfg: Config, sizes: dict[str, int], batch_axes: tuple[str, ...]) -> None:
    """The rules that need every mesh axis's size (an axis may be -1 in the config, known only
    once the mesh is built): the Trainer checks them on its mesh and `lmsys plan` on the sizes it
    plans for. `batch_axes`: the mesh axes the batch splits over (the rule table's `batch`)."""
    stages = sizes.get("stage", 1)
    if stages > 1:
        check_pipeline(cfg, stages)
    if sizes.get("sequence", 1) > 1:
        check_sequence(cfg, sizes["sequence"])
    if sizes.get("tensor", 1) > 1:
        check_tensor(cfg, sizes["tensor"])
    experts = sizes.get("expert", 1)
    if cfg.model.n_experts or experts > 1:
        check_experts(cfg, experts)
        check_moe(dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, stage=stages)))
    divisor = math.prod(sizes.get(a, 1) for a in batch_axes)
    # microbatches of gradient accumulation, each split again into pipeline microbatches
    splits = cfg.grad_accum * ((cfg.pipeline.microbatches or stages) if stages > 1 else 1)
    micro = cfg.batch_size // splits
    if micro % divisor:
        axes = " x ".join(a for a in batch_axes if a != "expert" or experts > 1)
        raise ConfigError(
            f"config key 'batch_size' = {cfg.batch_size}: each of the {splits} microbatches "
            f"({micro} sequences) must split over mesh {axes} = {divisor} devices; use a "
            f"batch_size that is a multiple of {divisor * splits}")


def check_tensor(cfg: Config, t: int) -> None:
    """Heads and the MLP split evenly over `t` tensor-parallel devices."""
    m = cfg.model
    check_key(m.n_heads % t == 0, "model.n_heads", m.n_heads,
              f"must be divisible by mesh.tensor ({t}); change mesh.tensor or model.n_heads")
    check_key(m.n_kv_heads % t == 0 or t % m.n_kv_heads == 0, "model.n_kv_heads", m.n_kv_heads,
              f"must divide or be divisible by mesh.tensor ({t}) so KV heads shard or replicate evenly")
    check_key(m.d_ff % t == 0, "model.d_ff", m.d_ff, f"must be divisible by mesh.tensor ({t})")


def check_sequence(cfg: Config, n: int) -> None:
    """The sequence splits evenly over a ring of n devices: into n chunks, or with
    `mesh.sequence_load_balance` into 2n (each device holds two, lmsys.parallel.context)."""
    if cfg.mesh.sequence_load_balance:
        check_key(cfg.seq_len % (2 * n) == 0, "seq_len", cfg.seq_len,
                  f"must be divisible by 2 x mesh.sequence = {2 * n} for the load-balanced ring (each "
                  f"device holds 2 of {2 * n} chunks); use a multiple of {2 * n} or set "
                  "mesh.sequence_load_balance=false")
    else:
        check_key(cfg.seq_len % n == 0, "seq_len", cfg.seq_len, f"must be divisible by mesh.sequence ({n})")


def check_pipeline(cfg: Config, stages: int) -> None:
    """The layers split into `stages` x `pipeline.repeats` equal chunks, and every stage gets
    work: at least `stages` microbatches, each a whole number of rows."""
    chunks = stages * cfg.pipeline.repeats
    check_key(not cfg.model.global_every, "model.global_every", cfg.model.global_every,
              "(windowed and global layers mixed) does not run in a pipeline yet (a stage's "
              "layers do not know their index); use mesh.stage=1")
    check_key(cfg.model.n_layers % chunks == 0, "model.n_layers", cfg.model.n_layers,
              f"must be divisible by mesh.stage x pipeline.repeats = {stages} x {cfg.pipeline.repeats} "
              f"= {chunks} (equal layer chunks per stage); change mesh.stage or pipeline.repeats")
    m = cfg.pipeline.microbatches or stages
    check_key(m >= stages, "pipeline.microbatches", m,
              f"must be >= mesh.stage ({stages}): with fewer microbatches than stages some stage "
              "never has work; use more microbatches (the bubble is (stages-1)/(microbatches+stages-1))")
    rows = cfg.batch_size // cfg.grad_accum
    check_key(rows % m == 0, "pipeline.microbatches", m,
              f"must divide the {rows} sequences of each batch (batch_size / grad_accum); "
              f"choose a divisor of {rows} that is >= {stages}")


def check_dpo(cfg: Config) -> None:
    """DPO (data.format=preference): whole pairs in every microbatch, the full logits."""
    check_key(cfg.dpo.beta > 0, "dpo.beta", cfg.dpo.beta, "must be positive")
    if cfg.data.format != "preference":
        return
    rows = cfg.batch_size // cfg.grad_accum
    check_key(rows % 2 == 0, "batch_size", cfg.batch_size,
              f"DPO needs whole (chosen, rejected) pairs in each of the {cfg.grad_accum} microbatches: "
              f"make batch_size / grad_accum even")
    check_key(cfg.loss_chunk == 0, "loss_chunk", cfg.loss_chunk, "must be 0 with data.format=preference (DPO)")
    check_key(not cfg.model.n_experts, "data.format", cfg.data.format,
              "DPO on a mixture-of-experts model is not supported (its router losses); use a dense model")


def check_rl(cfg: Config) -> None:
    """The rl.* keys (`lmsys rl`, data.format=prompts)."""
    r = cfg.rl
    check_key(r.group_size >= 2, "rl.group_size", r.group_size,
              "must be >= 2 (advantages are normalized within each prompt's group)")
    for key in ("prompts_per_step", "max_new_tokens", "updates_per_rollout", "engine_tensor"):
        check_key(getattr(r, key) >= 1, f"rl.{key}", getattr(r, key), "must be >= 1")
    check_key(r.temperature > 0 and math.isfinite(r.temperature), "rl.temperature", r.temperature,
              "must be a positive number (GRPO needs samples, not the greedy answer)")
    check_key(0 < r.top_p <= 1, "rl.top_p", r.top_p, "must be in (0, 1]")
    check_key(0 < r.clip_eps < 1, "rl.clip_eps", r.clip_eps, "must be in (0, 1)")
    check_key(r.kl_beta >= 0, "rl.kl_beta", r.kl_beta, "must be >= 0 (0 = no KL term)")
    check_key(r.sft_steps >= 0, "rl.sft_steps", r.sft_steps, "must be >= 0")
    check_key(r.sft_lr > 0, "rl.sft_lr", r.sft_lr, "must be positive")
    check_key(":" in r.reward or r.reward in ("exact_match", "regex", "python_parses"), "rl.reward", r.reward,
              "must be exact_match, regex, python_parses or module:function")
    if cfg.data.format != "prompts":
        return
    check_key(r.max_new_tokens < cfg.seq_len, "rl.max_new_tokens", r.max_new_tokens,
              f"must be below seq_len ({cfg.seq_len}), which holds prompt + completion")
    check_key(cfg.grad_accum == 1 and not cfg.model.n_experts and cfg.loss_chunk == 0, "data.format",
              cfg.data.format, "GRPO (data.format=prompts) runs with grad_accum=1, loss_chunk=0 on a dense model")
    # GRPO's loss and scoring (lmsys.train.grpo) read tokens in batch order, not in the
    # load-balanced order a sequence-parallel forward expects (Trainer._loss_sums)
    check_key(axis_size(cfg.mesh, "sequence") == 1, "mesh.sequence", cfg.mesh.sequence,
              "must be 1 for GRPO (data.format=prompts): context parallelism is not supported by lmsys rl")


def check_lora(cfg: Config) -> None:
    """The lora.* keys (with lora.rank > 0)."""
    from lmsys.models.lora import TARGETS, target_names

    lo = cfg.lora
    check_key(lo.rank >= 0, "lora.rank", lo.rank, "must be >= 0 (0 = off)")
    check_key(lo.rank > 0 or not lo.base_quantize, "lora.base_quantize", lo.base_quantize,
              "quantizes the frozen base of LoRA training: set lora.rank > 0")
    if not lo.rank:
        return
    check_key(lo.alpha > 0, "lora.alpha", lo.alpha, "must be positive (the scale is alpha / rank)")
    check_key(0 <= lo.dropout < 1, "lora.dropout", lo.dropout, "must be in [0, 1)")
    names = target_names(lo.targets)
    bad = [t for t in names if t not in TARGETS]
    check_key(bool(names) and not bad, "lora.targets", lo.targets,
              f"must be comma-separated among {', '.join(TARGETS)} (or all)")
    check_key(lo.base_quantize in ("", "int8", "fp8"), "lora.base_quantize", lo.base_quantize,
              "must be '' (off), int8 or fp8")
    mlp = [t for t in names if t in ("gate", "up", "down")]
    check_key(not (mlp and cfg.model.n_experts), "lora.targets", lo.targets,
              f"a mixture-of-experts model has no dense MLP for {', '.join(mlp)}; target q, k, v, o only")


MLP_ACTS = ("silu", "gelu_tanh")


def check_family(cfg: Config) -> None:
    """The keys of the other model families' features: windows, Gemma's options, router variants."""
    m = cfg.model
    for key in ("sliding_window", "global_every", "rope_local_theta", "rope_linear_factor",
                "query_pre_attn_scalar",
                "attn_soft_cap", "final_soft_cap", "shared_d_ff"):
        check_key(getattr(m, key) >= 0, f"model.{key}", getattr(m, key), "must be >= 0 (0 = off)")
    check_key(m.mlp_act in MLP_ACTS, "model.mlp_act", m.mlp_act, f"must be one of {', '.join(MLP_ACTS)}")
    check_key(m.embed_pooling in ("", "last", "mean") or m.embed_pooling.startswith("unsupported:"),
              "model.embed_pooling", m.embed_pooling, "must be last, mean or '' (the server's --embed-pooling)")
    check_key(m.sliding_window or not m.global_every, "model.global_every", m.global_every,
              "needs a model.sliding_window (the other layers' window)")
    check_key(m.global_every or not m.rope_local_theta, "model.rope_local_theta", m.rope_local_theta,
              "needs windowed and global layers mixed (model.sliding_window and global_every)")
    check_key(not (m.rope_linear_factor and m.rope_scaling_factor), "model.rope_linear_factor",
              m.rope_linear_factor, "and model.rope_scaling_factor (Llama 3's) exclude each other")
    check_key(m.n_shared_experts or not (m.shared_expert_gate or m.shared_d_ff),
              "model.n_shared_experts", m.n_shared_experts,
              "must be > 0 with model.shared_expert_gate or model.shared_d_ff")
    check_key(not (m.final_soft_cap and cfg.loss_chunk), "loss_chunk", cfg.loss_chunk,
              "must be 0 with model.final_soft_cap (the chunked loss has no output soft cap)")


def check_profile(cfg: Config) -> None:
    """The profile.* keys: a trace window inside the run, written to a local directory."""
    p = cfg.profile
    check_key(p.steps >= 0, "profile.steps", p.steps, "must be >= 0 (0 = no trace)")
    check_key(p.start_step >= 1, "profile.start_step", p.start_step, "must be >= 1 (steps count from 1)")
    if p.steps:
        check_key(p.start_step + p.steps - 1 <= cfg.steps, "profile.start_step", p.start_step,
                  f"traces steps {p.start_step}..{p.start_step + p.steps - 1}, past the run's last "
                  f"step ({cfg.steps}); lower profile.start_step or profile.steps")
        where = p.dir or cfg.run_dir
        check_key("://" not in where, "profile.dir", p.dir,
                  f"the JAX profiler writes to a local directory and {where!r} is a URL; set "
                  f"profile.dir=/a/local/dir")


def check_eval(cfg: Config) -> None:
    """The eval.* keys: a held-out split or an eval source (not both) when evaluating."""
    e = cfg.eval
    check_key(e.every >= 0, "eval.every", e.every, "must be >= 0 (0 = no evaluation)")
    check_key(e.batches >= 1, "eval.batches", e.batches, "must be >= 1")
    check_key(0 <= e.holdout < 1, "eval.holdout", e.holdout, "must be a fraction in [0, 1)")
    check_key(not (e.source and e.holdout), "eval.holdout", e.holdout,
              f"eval.source is set ({e.source!r}): evaluate on it or on a held-out split, not both; "
              f"set eval.holdout=0 or eval.source=''")
    if e.every:
        check_key(bool(e.source) or e.holdout > 0, "eval.every", e.every,
                  "needs evaluation documents: set eval.holdout (e.g. 0.05) or eval.source=PATHS")
        check_key(cfg.data.format == "text", "eval.every", e.every,
                  f"held-out evaluation reads text documents; data.format={cfg.data.format!r} is not "
                  f"supported: set eval.every=0")
