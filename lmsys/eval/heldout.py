"""Held-out evaluation inside the training loop: `eval.batches` fixed batches of held-out
documents (`eval.holdout` of data.source, or `eval.source`), scored by the training loss
function on the training mesh. The step is compiled once, ahead of time, for the training
shardings; the batches never change, so an evaluation depends only on the parameters (a resumed
run evaluates bit for bit as an uninterrupted one).

    evaluator = HeldoutEval(cfg, trainer, tokenizer)
    record = evaluator.evaluate(state["params"], step)   # {"step", "eval_loss", ...}
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lmsys.config import Config, ConfigError


def eval_documents(cfg: Config):
    """The evaluation documents of a config: eval.source, else data.source's held-out split."""
    from lmsys.data import iter_documents
    from lmsys.data.heldout import split_documents

    d = cfg.data
    if cfg.eval.source:
        return iter_documents(cfg.eval.source, d.text_field)
    return split_documents(iter_documents(d.source, d.text_field, d.max_documents), cfg.eval.holdout,
                           heldout=True)


def eval_metrics(nll: float, tokens: float, n_bytes: int) -> dict[str, float]:
    """eval_loss (nats per token), eval_perplexity and eval_bits_per_byte from sums."""
    loss = nll / max(tokens, 1.0)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0)),
            "eval_bits_per_byte": nll / math.log(2) / max(n_bytes, 1)}


class HeldoutEval:
    def __init__(self, cfg: Config, trainer, tokenizer):
        from lmsys.data.heldout import eval_rows

        self.cfg, self.trainer = cfg, trainer
        B = cfg.batch_size
        where = f"eval.source={cfg.eval.source!r}" if cfg.eval.source else f"eval.holdout={cfg.eval.holdout}"
        try:
            self.rows = eval_rows(eval_documents(cfg), tokenizer, cfg.seq_len, cfg.eval.batches * B)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}; hold out more documents or use a shorter seq_len") from None
        if self.rows.num_rows < 1:
            raise ConfigError(f"{where}: no evaluation documents; hold out more documents (a larger "
                              f"eval.holdout) or set eval.source")
        # a last partial batch is filled with rows whose loss mask is 0 (they count for nothing)
        self.batches = -(-self.rows.num_rows // B)
        self.n_bytes = self.rows.target_bytes(0, self.rows.num_rows)
        batch = trainer.abstract_batch()
        params = trainer.abstract_state["params"]
        self._sums = jax.jit(self._loss_sums, in_shardings=(trainer.param_shardings, trainer.batch_sharding),
                             out_shardings=trainer.rules.replicated).lower(params, batch).compile()

    def _loss_sums(self, params, batch):
        _, (loss_sum, n, _) = self.trainer._loss_sums(params, batch)
        return jnp.stack([loss_sum, n])

    def evaluate(self, params, step: int) -> dict:
        """The held-out metrics of `params`, as a metrics record at `step`."""
        from lmsys.train.loop import global_batch

        B, total = self.cfg.batch_size, jnp.zeros(2, jnp.float32)
        local_B = B // jax.process_count()
        for i in range(self.batches):
            local = self.rows.batch(i * B, B, jax.process_index(), jax.process_count())
            first = i * B + jax.process_index() * local_B  # this process's first row
            local["loss_mask"][first + np.arange(local_B) >= self.rows.num_rows] = 0
            total = total + self._sums(params, global_batch(local, self.trainer.batch_sharding, B))
        nll, tokens = (float(x) for x in jax.device_get(total))
        return {"step": step, **eval_metrics(nll, tokens, self.n_bytes)}
