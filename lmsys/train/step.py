"""The pure core of training: optimizer, loss, and the jitted, sharded train step.

    trainer = Trainer(cfg, rules)
    state = trainer.init(seed)                      # {"step", "params", "opt_state"}, sharded
    state, metrics = trainer.step(state, batch)     # donates `state`

No I/O here; the loop in lmsys.train.loop owns data, logging and checkpoints.
"""

from __future__ import annotations

import dataclasses
from functools import cached_property, partial

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from lmsys.config import Config, OptimizerConfig
from lmsys.config_checks import check_mesh
from lmsys.models import llama
from lmsys.parallel import Rules
from lmsys.parallel.context import to_load_balanced
from lmsys.parallel.fsdp import fsdp_gather
from lmsys.parallel.mesh import zero1_table
from lmsys.train import adapters, dpo

BATCH_KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_mask")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# MoE router losses in the model's aux -> the model.* key weighting them in the training objective
ROUTER_LOSSES = {"moe_aux_loss": "router_aux_loss", "moe_z_loss": "router_z_loss"}


def lr_schedule(cfg: OptimizerConfig, steps: int) -> optax.Schedule:
    """Linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio` at the last step."""
    warmup = min(cfg.warmup_steps, steps)
    base = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=max(steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio)
    # Step i trains with base(i + 1): the first step already learns, the last one ends the decay.
    return lambda step: base(step + 1)


def make_optimizer(cfg: OptimizerConfig, steps: int, decay_mask) -> optax.GradientTransformation:
    """AdamW with global-norm clipping; weight decay only where `decay_mask` is True."""
    adamw = optax.adamw(lr_schedule(cfg, steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=decay_mask)
    if cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
    return adamw


def loss_sums(logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array):
    """Summed next-token cross-entropy over the positions where mask is 1, and their count."""
    logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    nll_BT = (logz_BT - target_logit_BT) * mask_BT
    return jnp.sum(nll_BT), jnp.sum(mask_BT)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def chunked_loss_sums(x_BTD, w_DV, targets_BT, mask_BT, chunk: int, rules: Rules):
    """`loss_sums(x_BTD @ w_DV, ...)` with the [batch, chunk, vocab] logits made one chunk of
    positions at a time, so the whole [batch, seq, vocab] logits never exist. Differentiated,
    the same pass over the chunks also makes the gradients for a unit cotangent (the loss sum
    is linear in each chunk's logit gradient), so no logits are made twice: the input's
    gradient is kept per chunk and the projection's accumulated over the chunks in float32 per
    batch shard, then summed once (under fsdp: one reduce-scatter after the loop); the backward
    only scales them."""
    def one(sums, xs):
        x_BcD, t_Bc, m_Bc = xs
        return jax.tree.map(jnp.add, sums, loss_sums(_chunk_logits(x_BcD, w_DV, rules), t_Bc, m_Bc)), None

    zero = jnp.zeros((), jnp.float32)
    return jax.lax.scan(one, (zero, zero), _chunks_of(x_BTD, targets_BT, mask_BT, chunk))[0]


def _chunks_of(x_BTD, targets_BT, mask_BT, chunk):  # [B, T, ...] -> [T/chunk, B, chunk, ...]
    return tuple(jnp.swapaxes(a.reshape(a.shape[0], a.shape[1] // chunk, chunk, *a.shape[2:]), 0, 1)
                 for a in (x_BTD, targets_BT, mask_BT))


def _chunk_logits(x_BcD, w_DV, rules):
    logits = jnp.einsum("btd,dv->btv", x_BcD, w_DV, preferred_element_type=jnp.float32)
    return rules.constrain(logits, ("batch", "seq", "vocab"))


def _chunked_fwd(x_BTD, w_DV, targets_BT, mask_BT, chunk, rules):
    # The projection's gradient is summed over the chunks per batch shard first (a leading axis
    # of one partial sum per shard, split like the batch: no communication in the loop), then
    # over the shards once, which the partitioner does as one reduce-scatter over fsdp.
    shards = rules.batch_size_divisor
    per_shard = lambda a: a.reshape(shards, a.shape[0] // shards, *a.shape[1:])  # noqa: E731

    def one(carry, xs):
        sums, dw_SDV = carry
        x_BcD, t_Bc, m_Bc = xs
        logits = _chunk_logits(x_BcD, w_DV, rules)
        logz = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, t_Bc[..., None], axis=-1)[..., 0]
        sums = (sums[0] + jnp.sum((logz - target_logit) * m_Bc), sums[1] + jnp.sum(m_Bc))
        onehot = jax.nn.one_hot(t_Bc, logits.shape[-1], dtype=jnp.float32)
        dlogits = (jnp.exp(logits - logz[..., None]) - onehot) * m_Bc[..., None]
        dx_BcD = jnp.einsum("btv,dv->btd", dlogits.astype(w_DV.dtype), w_DV).astype(x_BcD.dtype)
        dw_SDV = dw_SDV + jnp.einsum("sbtd,sbtv->sdv", per_shard(x_BcD), per_shard(dlogits.astype(x_BcD.dtype)),
                                     preferred_element_type=jnp.float32)
        return (sums, rules.constrain(dw_SDV, ("batch", None, "vocab"))), dx_BcD

    zero = jnp.zeros((), jnp.float32)
    dw0 = rules.constrain(jnp.zeros((shards, *w_DV.shape), jnp.float32), ("batch", None, "vocab"))
    (sums, dw_SDV), dx_CBcD = jax.lax.scan(one, ((zero, zero), dw0),
                                           _chunks_of(x_BTD, targets_BT, mask_BT, chunk))
    dx_BTD = jnp.swapaxes(dx_CBcD, 0, 1).reshape(x_BTD.shape)
    return sums, (dx_BTD, _sum_shards(dw_SDV, rules).astype(w_DV.dtype))


def _chunked_bwd(chunk, rules, residuals, cotangents):
    g_loss = cotangents[0]  # the token count has no gradient
    scale = lambda d: (g_loss * d.astype(jnp.float32)).astype(d.dtype)  # noqa: E731
    return (*map(scale, residuals), None, None)


def _sum_shards(dw_SDV, rules: Rules):
    """The sum over the leading per-batch-shard axis, laid out as the parameter (`embed` over
    fsdp): a psum over the other batch axes and an explicit psum_scatter over fsdp (XLA:CPU
    keeps it a reduce-scatter; the v5p compile of BENCHMARKS.md still all-reduces it)."""
    axes = tuple(a for a in rules.table["batch"] if rules.mesh.shape[a] > 1)
    out_spec = rules.spec(("embed", "vocab"), dw_SDV.shape[1:])
    if not axes:
        return dw_SDV[0]
    scatter = "fsdp" in axes and out_spec and out_spec[0] == "fsdp"

    def local(dw):
        dw = dw[0]
        others = tuple(a for a in axes if a != "fsdp" or not scatter)
        if others:
            dw = jax.lax.psum(dw, others)
        return jax.lax.psum_scatter(dw, "fsdp", scatter_dimension=0, tiled=True) if scatter else dw

    manual_out = P("fsdp") if scatter else P()
    return jax.shard_map(local, mesh=rules.mesh, in_specs=P(axes), out_specs=manual_out,
                         axis_names=set(axes), check_vma=False)(dw_SDV)


chunked_loss_sums.defvjp(_chunked_fwd, _chunked_bwd)


class Trainer:
    """The jitted train step and state init for one config on one mesh."""

    def __init__(self, cfg: Config, rules: Rules):
        check_mesh(cfg, dict(rules.mesh.shape), rules.table["batch"])  # a filled (-1) axis is known now
        if rules.mesh.shape.get("stage", 1) > 1:  # the pipeline's settings come from the config
            rules = dataclasses.replace(rules, pipeline=cfg.pipeline)
        if rules.mesh.shape.get("sequence", 1) > 1:  # context parallelism
            rules = dataclasses.replace(rules, sequence_method=cfg.mesh.sequence_method,
                                        sequence_load_balance=cfg.mesh.sequence_load_balance)
        self.cfg, self.rules = cfg, rules
        self.dtype = DTYPES[cfg.dtype]
        self.schedule = lr_schedule(cfg.optimizer, cfg.steps)
        # with lora.rank > 0 the optimizer sees the adapters only (lmsys.train.adapters)
        self.optimizer = make_optimizer(cfg.optimizer, cfg.steps, adapters.decay_mask(cfg))
        self.param_shardings = adapters.shardings(rules, cfg, jax.eval_shape(lambda: adapters.init_params(cfg, cfg.seed)))
        self.base_shardings = rules.tree_shardings(llama.param_axes(cfg.model), llama.param_shapes(cfg.model))
        # Input rows arrive whole on each device of their batch shard (each process loads whole
        # rows); inside the model activations split the sequence over `sequence`.
        self.batch_sharding = rules.sharding(("batch", None))
        self.init = jax.jit(self._init, static_argnums=0, out_shardings=self.state_shardings)
        self.step = jax.jit(self._step, in_shardings=(self.state_shardings, self.batch_sharding),
                            out_shardings=(self.state_shardings, rules.replicated),
                            donate_argnums=0)

    # ------------------------------------------------------------------ shapes and shardings

    @cached_property
    def _abstract_state_unsharded(self):
        return jax.eval_shape(self._init, self.cfg.seed)

    @cached_property
    def state_shardings(self):
        """Params by the rule table; Adam moments like their params (with `optimizer.zero1`,
        also split over `data`: ZeRO-1); counters replicated."""
        abstract = self._abstract_state_unsharded
        moments = self.param_shardings
        if self.cfg.optimizer.zero1:
            moments = Rules(self.rules.mesh, zero1_table(self.rules.table)).tree_shardings(
                adapters.param_axes(self.cfg), adapters.param_shapes(self.cfg))
        moments = adapters.split(moments)[0]
        opt = optax.tree_utils.tree_map_params(
            self.optimizer, lambda _, s: s, abstract["opt_state"], moments,
            transform_non_params=lambda _: self.rules.replicated)
        return {"step": self.rules.replicated, "params": self.param_shardings, "opt_state": opt,
                "nonfinite_streak": self.rules.replicated}

    @cached_property
    def abstract_state(self):
        """ShapeDtypeStructs with shardings: a restore target and an AOT-lowering argument."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            self._abstract_state_unsharded, self.state_shardings)

    def abstract_batch(self, batch_size: int | None = None):
        shape = (batch_size or self.cfg.batch_size, self.cfg.seq_len)
        dtypes = {"loss_mask": jnp.float32}
        return {k: jax.ShapeDtypeStruct(shape, dtypes.get(k, jnp.int32), sharding=self.batch_sharding)
                for k in BATCH_KEYS}

    # ------------------------------------------------------------------ pure functions

    def _init(self, seed: int, base: dict | None = None):
        """The state at step 0: `base` (default: the random init of `seed`) as the params, with
        lora.rank > 0 plus fresh adapters; optimizer state for the trainable params."""
        params = adapters.init_params(self.cfg, seed, base)
        return {"step": jnp.zeros((), jnp.int32), "params": params,
                "opt_state": self.optimizer.init(adapters.split(params)[0]),
                "nonfinite_streak": jnp.zeros((), jnp.int32)}

    def checkpointed(self, state):
        """What a checkpoint holds of `state`: all of it, or with LoRA all but the frozen base
        (whose reference goes in the meta, lmsys.train.adapters.base_reference)."""
        return {**state, "params": adapters.split(state["params"])[0]}

    @cached_property
    def abstract_checkpoint(self):
        """The restore target of `checkpointed` states; `with_frozen` completes a restored one."""
        return self.checkpointed(self.abstract_state)

    def with_frozen(self, restored, params):
        """A restored `checkpointed` state completed with the frozen part of `params`."""
        return {**restored, "params": adapters.join(restored["params"], adapters.split(params)[1])}

    def _loss_sums(self, params, batch):
        if self.rules.sequence_load_balance:  # every token-wise input alike; the loss is a sum
            batch = {k: to_load_balanced(v, self.rules.mesh.shape["sequence"]) for k, v in batch.items()}
        if self.cfg.data.format == "preference":  # DPO over pairs of rows (lmsys.train.dpo)
            return dpo.loss_sums(self._logits, params, batch, self.cfg.dpo.beta)
        chunk = self.cfg.loss_chunk
        chunked = 0 < chunk < self.cfg.seq_len
        out_BTX, aux = llama.forward(
            params, batch["tokens"], batch["positions"], batch["segment_ids"], cfg=self.cfg.model,
            rules=self.rules, dtype=self.dtype, remat=self.cfg.remat, logits=not chunked)
        if chunked:
            loss_sum, n = self._chunked_loss_sums(params, out_BTX, batch["targets"], batch["loss_mask"], chunk)
        else:
            loss_sum, n = loss_sums(out_BTX, batch["targets"], batch["loss_mask"])
        # MoE: each router loss (a mean over this batch's tokens) weighted by its token count:
        # over grad_accum microbatches, their token-weighted mean (the load-balancing loss is not
        # additive, so it is that of each microbatch, as in Megatron-LM)
        router = {k: aux[k] * n for k in ROUTER_LOSSES if k in aux}
        objective = loss_sum
        if router:
            objective = loss_sum + sum(getattr(self.cfg.model, ROUTER_LOSSES[k]) * v for k, v in router.items())
        return objective, (loss_sum, n, router)

    def _logits(self, params, batch):
        return llama.forward(params, batch["tokens"], batch["positions"], batch["segment_ids"],
                             cfg=self.cfg.model, rules=self.rules, dtype=self.dtype, remat=self.cfg.remat)[0]

    def _chunked_loss_sums(self, params, x_BTD, targets_BT, mask_BT, chunk: int):
        """`loss_sums` of the final hidden states, `chunk` positions at a time (`chunked_loss_sums`)
        with the output projection all-gathered over fsdp once."""
        w_DV = fsdp_gather(llama.unembed_weight(params, cfg=self.cfg.model, dtype=self.dtype),
                           self.rules, ("embed", "vocab"))
        return chunked_loss_sums(x_BTD, w_DV, targets_BT, mask_BT, chunk, self.rules)

    def grads(self, params, batch):
        """Mean loss and its gradient over the batch, accumulated over `grad_accum` microbatches
        (the same numbers as one big batch: sums are divided by the total token count once)."""
        return self.grads_and_metrics(params, batch)[:3]

    def grads_and_metrics(self, params, batch, dropout_key=None):
        """`grads` and a dict of extra metrics: for an MoE model the router losses (the gradient
        is that of loss + router_aux_loss x moe_aux_loss + router_z_loss x moe_z_loss; the
        returned loss is the cross-entropy alone). With LoRA the gradients are the adapters'
        only (`adapters.split`); `dropout_key`: their lora.dropout masks (None: no dropout)."""
        params, frozen = adapters.split(params)
        rate = self.cfg.lora.dropout if dropout_key is not None else 0.0

        def sums_and_grad(trainable, mb, i=0):
            def objective(t):
                p = adapters.join(t, frozen)
                if rate:
                    p = adapters.with_dropout(p, jax.random.fold_in(dropout_key, i), rate)
                return self._loss_sums(p, mb)
            return jax.value_and_grad(objective, has_aux=True)(trainable)

        M = self.cfg.grad_accum
        if M == 1:
            (_, (loss_sum, n, router)), g = sums_and_grad(params, batch)
        else:
            def micro(carry, xs):
                mb, i = xs
                (_, sums), g = sums_and_grad(params, mb, i)
                g_acc, sums_acc = carry
                return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, sums_acc, sums)), None

            mbs = {k: self.rules.constrain(v.reshape(M, v.shape[0] // M, *v.shape[1:]),
                                           (None, "batch", "seq"))
                   for k, v in batch.items()}
            zeros = jax.tree.map(jnp.zeros_like, params)
            extra = dpo.METRICS if self.cfg.data.format == "preference" else (
                ROUTER_LOSSES if self.cfg.model.n_experts else ())
            router0 = {k: jnp.zeros((), jnp.float32) for k in extra}
            (g, (loss_sum, n, router)), _ = jax.lax.scan(micro, (zeros, (0.0, 0.0, router0)),
                                                         (mbs, jnp.arange(M)))
        n = jnp.maximum(n, 1.0)
        return loss_sum / n, jax.tree.map(lambda x: x / n, g), n, {k: v / n for k, v in router.items()}

    def _step(self, state, batch):
        """One update. A step whose loss or gradients are not finite changes no parameter or
        optimizer state; it is counted in `nonfinite_streak` (reset by the next good step)."""
        key = jax.random.fold_in(jax.random.key(self.cfg.seed), state["step"]) if self.cfg.lora.dropout else None
        loss, grads, n_tokens, extra = self.grads_and_metrics(state["params"], batch, key)
        grad_norm = optax.tree.norm(grads)
        trainable, frozen = adapters.split(state["params"])
        updates, opt_state = self.optimizer.update(grads, state["opt_state"], trainable)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        streak = jnp.where(finite, 0, state["nonfinite_streak"] + 1)
        metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": self.schedule(state["step"]),
                   "loss_tokens": n_tokens, "nonfinite_streak": streak, **extra}
        params = adapters.join(keep(optax.apply_updates(trainable, updates), trainable), frozen)
        return {"step": state["step"] + 1, "params": params,
                "opt_state": keep(opt_state, state["opt_state"]), "nonfinite_streak": streak}, metrics
