"""The engine's device side: the jitted model calls over the paged KV pool.

Each call is a pure function `fn(params, kv, rows, rules) -> (out, kv)`: `kv` is the page pool
(keys, values: [n_layers, num_pages, page_size, n_kv_heads, head_dim]), donated and returned
updated; every leaf of `rows` and `out` has the batch first. With data-parallel serving the call
runs per data shard (`per_shard`): rows [g * B/D, (g+1) * B/D) on shard g against its own pages.
The host side (which requests run, which pages they hold, what a row carries) is
`lmsys.serve.scheduler` and `lmsys.serve.engine`; a new kind of call (verification of drafted
tokens, embeddings, ...) is a new method here, jitted by `ModelCalls.jit`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from lmsys.config import ModelConfig
from lmsys.models import llama
from lmsys.parallel import Rules
from lmsys.serve.constrained import masked_logits
from lmsys.serve.lora import with_rows
from lmsys.serve.sampling import next_token_logprobs, sample
from lmsys.serve.scheduler import MAX_TOP_LOGPROBS
from lmsys.serve.speculative import draft_token, verify_output


class ModelCalls:
    def __init__(self, model: ModelConfig, rules: Rules | None, dtype, shard_axes: tuple[str, ...]):
        self.model, self.rules, self.dtype, self.shard_axes = model, rules, dtype, shard_axes

    def jit(self, fn):
        """`fn` jitted per data shard, the pool donated."""
        return jax.jit(self.per_shard(fn), donate_argnums=1)

    def per_shard(self, fn):
        """`fn(params, kv, rows, rules) -> (out, kv)` run by each data shard on its own rows
        (every leaf of `rows` and `out` has the batch first) and its own pages: a shard_map
        manual over the page axes (tensor and fsdp stay automatic inside)."""
        if not self.shard_axes:
            return lambda params, kv, rows: fn(params, kv, rows, self.rules)
        axes = self.shard_axes
        rows, pages = PartitionSpec(axes), PartitionSpec(None, axes)
        # check_vma=False: every output is per shard anyway, and a Pallas kernel's outputs (the
        # paged decode kernel, attention_impl="pallas") carry no manual-axis types
        return jax.shard_map(lambda params, kv, rows: fn(params, kv, rows, self.rules.manual(axes)),
                             mesh=self.rules.mesh, in_specs=(PartitionSpec(), pages, rows),
                             out_specs=(rows, pages), axis_names=set(axes), check_vma=False)

    def forward(self, params, kv, tokens_BT, positions_BT, page_table_BP, rules, adapter_B=None):
        """The final hidden states [B, T, D] (no output projection) and the updated pool;
        `adapter_B`: each row's LoRA slot when params hold a bank (lmsys.serve.lora)."""
        params = with_rows(params, adapter_B)
        cache = {"k": kv[0], "v": kv[1], "page_table": page_table_BP}
        x_BTD, aux = llama.forward(params, tokens_BT, positions_BT, cfg=self.model, rules=rules,
                                   dtype=self.dtype, cache=cache, logits=False)
        return x_BTD, (aux["cache"]["k"], aux["cache"]["v"])

    def logits(self, params, x_BTD, rules):
        logits_BTV = llama.unembed(params, x_BTD, cfg=self.model, rules=rules, dtype=self.dtype)
        if rules is not None:
            # sampling and log-probs work on whole rows of the vocabulary: gather it here (left
            # to the partitioner inside the data shard_map, jaxlib 0.10.2's SPMD partitioner
            # aborts on their gathers when the vocabulary splits over `tensor` and the rows or
            # positions over `fsdp` or `sequence`)
            logits_BTV = rules.constrain(logits_BTV, ("batch", "seq", None))
        return logits_BTV

    def prefill(self, params, kv, rows, rules):
        """One chunk of one prompt per row: fills the cache. Only when a row of the call asks
        for them (`echo_B` > 0), also the log-probs of each next prompt token (for `echo` and
        scoring) and whether it is greedy; with the top alternatives only when a row asks for
        them (`echo_B` == 2). Otherwise zeros, and the output projection is skipped."""
        tokens_BC, positions_BC, targets_BC, echo_B, page_table_BP, adapter_B = rows
        x_BCD, kv = self.forward(params, kv, tokens_BC, positions_BC, page_table_BP, rules, adapter_B)

        def echo(x_BCD, num_top=MAX_TOP_LOGPROBS):  # (log-prob, greedy, top ids, top log-probs)
            return next_token_logprobs(self.logits(params, x_BCD, rules), targets_BC, num_top)

        def zeros(shapes):
            return tuple(jnp.zeros(a.shape, a.dtype) for a in shapes)

        full = jax.eval_shape(echo, x_BCD)  # every branch returns these shapes
        branches = [lambda x: zeros(full), lambda x: echo(x, 0)[:2] + zeros(full[2:]), echo]
        return jax.lax.switch(jnp.max(echo_B), branches, x_BCD), kv

    def decode(self, params, kv, rows, rules):
        """One token per row, among the tokens its bitmask allows (`allowed_BW`: structured
        output, lmsys.serve.constrained; all bits set for a free row); the log-probs (and top
        alternatives) only when a row of the call asks for them (`logprobs_B`), else zeros.
        `adapter_B`: each row's LoRA slot (lmsys.serve.lora)."""
        tokens_B, positions_B, page_table_BP, sampling, logprobs_B, allowed_BW, adapter_B = rows
        x_B1D, kv = self.forward(params, kv, tokens_B[:, None], positions_B[:, None],
                                 page_table_BP, rules, adapter_B)
        logits_BV = masked_logits(self.logits(params, x_B1D, rules)[:, 0], allowed_BW)
        return sample(logits_BV, sampling, MAX_TOP_LOGPROBS, logprobs_B), kv

    def uncached(self, params, tokens_BT, rules, capture: tuple[str, ...] = ()):
        """The base model's final-normed hidden states [B, T, D] and aux of whole sequences
        (positions 0..T-1) without KV pages: the prefill path of embeddings and activations. A
        LoRA bank in `params` is applied as slot 0 (no adapter)."""
        positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1], dtype=jnp.int32), tokens_BT.shape)
        params = with_rows(params, jnp.zeros(tokens_BT.shape[0], jnp.int32))
        return llama.forward(params, tokens_BT, positions_BT, cfg=self.model, rules=rules,
                             dtype=self.dtype, logits=False, capture=capture)

    def activations(self, params, tokens_BT, rules, *, capture: tuple[str, ...]):
        """The per-layer activations `capture` names (llama.forward's `capture`), each [layers,
        B, T, D] in float32, over the prefill path without KV pages (nor output projection)."""
        _, aux = self.uncached(params, tokens_BT, rules, capture=capture)
        return {k: v.astype(jnp.float32) for k, v in aux["captured"].items()}

    def embed(self, params, tokens_BT, lengths_B, rules, *, pooling: str):
        """Pooled final-normed hidden states [B, D] in float32 (the prefill path without KV
        pages: causal attention within each row, so right padding never reaches a real token):
        the mean over each row's first `lengths_B` tokens, or its last token's (`pooling`)."""
        T = tokens_BT.shape[1]
        x_BTD = self.uncached(params, tokens_BT, rules)[0].astype(jnp.float32)
        if pooling == "mean":
            valid_BT = jnp.arange(T)[None, :] < lengths_B[:, None]
            return jnp.sum(jnp.where(valid_BT[..., None], x_BTD, 0), axis=1) / lengths_B[:, None]
        return jnp.take_along_axis(x_BTD, (lengths_B - 1)[:, None, None], axis=1)[:, 0]

    def verify(self, params, kv, rows, rules):
        """Speculative decoding: [last token, k drafts] per row (unused draft slots at position
        -1); which drafts the target accepts and the tokens each row emits, with their
        log-probs when a row asks for them (`lmsys.serve.speculative`). A draft model's drafts
        come with the distributions they were drawn from (`q_BKV`, rows' last element; without
        it, point masses as ngram's)."""
        tokens_BT, positions_BT, page_table_BP, sampling, num_drafts_B, logprobs_B, adapter_B, *q = rows
        x_BTD, kv = self.forward(params, kv, tokens_BT, positions_BT, page_table_BP, rules, adapter_B)
        logits_BTV = self.logits(params, x_BTD, rules)
        return verify_output(logits_BTV, tokens_BT[:, 1:], num_drafts_B, sampling, logprobs_B,
                             MAX_TOP_LOGPROBS, *q), kv

    def draft(self, params, kv, rows, rules, *, k: int):
        """A draft model's k drafts per row (lmsys.serve.draft) and the distributions they were
        drawn from [B, k, V]: its last two tokens at [n - 1, n] (n: the target's computed
        tokens; re-writing n - 1 covers a previous step whose drafts were all accepted), then
        one token per draft, fed only while the row wants more (`num_drafts_B`), so no key or
        value is written past the pages reserved for the verification."""
        tokens_B2, positions_B2, page_table_BP, sampling, num_drafts_B = rows
        x_B2D, kv = self.forward(params, kv, tokens_B2, positions_B2, page_table_BP, rules)
        first = draft_token(self.logits(params, x_B2D[:, 1:], rules)[:, 0], sampling, 0)

        def one(carry, j):
            kv, token_B = carry
            pos_B = jnp.where(j < num_drafts_B, positions_B2[:, 1] + j, -1)
            x_B1D, kv = self.forward(params, kv, token_B[:, None], pos_B[:, None], page_table_BP, rules)
            token_B, q_BV = draft_token(self.logits(params, x_B1D, rules)[:, 0], sampling, j)
            return (kv, token_B), (token_B, q_BV)

        (kv, _), (tokens_JB, q_JBV) = jax.lax.scan(one, (kv, first[0]), jnp.arange(1, k))
        drafts_BK = jnp.concatenate([first[0][:, None], tokens_JB.T], axis=1)
        q_BKV = jnp.concatenate([first[1][:, None], jnp.moveaxis(q_JBV, 0, 1)], axis=1)
        return (drafts_BK, q_BKV), kv
