"""Speculative decoding with a draft model: a smaller model of the same tokenizer proposes k
tokens per decoding request and step; the target verifies them (lmsys.serve.speculative).

    draft = DraftModel(small_params, small_cfg, small_tokenizer)
    engine = Engine(params, cfg, tokenizer, EngineConfig(speculative="draft"), draft=draft)

    lmsys serve runs/model --speculative draft --draft-model runs/small --num-speculative-tokens 4

The draft model keeps its own keys and values in a page pool of its own shape ([its layers,
the target's pages, page_size, its KV heads, its head dim]) indexed by the target's page
tables: a request's draft keys/values live in the same page ids as its target ones, so they
follow the target's requests through admission, preemption, the prefix cache and data-parallel
sharding with no bookkeeping of their own. Each prefill call of the target is repeated on the
draft pool; each speculative step runs one draft call (ModelCalls.draft: the row's last two
tokens, then k - 1 one-token steps inside one compiled function), which writes the draft's
keys/values up to the last draft; what lies past the accepted tokens is overwritten later, as
the target's rejected positions are ("rolled back" by the target's computed length).

The drafts of a greedy row are the draft's argmax; a sampled row's are drawn from the draft's
distribution q under the row's temperature, top-k and top-p, and q goes to the verification on
device, where the rejection rule keeps the target's distribution exactly. The drafts never
change a greedy row's tokens (the target's argmax decides); stale draft keys/values (a page
filled by a grammar-constrained decode step, say) only lower the acceptance rate.

Compiled shapes: one draft prefill per prefill bucket and one draft call per decode bucket,
all compiled by `Engine.warmup()`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lmsys.config import ConfigError, ModelConfig
from lmsys.models import llama
from lmsys.parallel.sharded_kernels import POOL_AXES
from lmsys.serve.model_calls import ModelCalls


class DraftModel(NamedTuple):
    params: dict
    model: ModelConfig
    tokenizer: object = None  # checked against the target's when both are given


def check_same_tokenizer(target_vocab: int, draft_vocab: int, target_tok=None, draft_tok=None) -> None:
    """ConfigError (a ValueError) unless the draft model shares the target's vocabulary (size and
    tokens)."""
    if draft_vocab != target_vocab:
        raise ConfigError(f"the draft model's vocabulary has {draft_vocab} tokens, the served model's "
                         f"{target_vocab}: a draft model must use the served model's tokenizer")
    if target_tok is None or draft_tok is None:
        return
    a, b = target_tok.get_vocab(with_added_tokens=True), draft_tok.get_vocab(with_added_tokens=True)
    if a != b:
        diff = sorted(set(a.items()) ^ set(b.items()), key=lambda t: t[1])[:3]
        raise ConfigError(f"the draft model's tokenizer differs from the served model's (e.g. "
                         f"{', '.join(f'{t!r}={i}' for t, i in diff)}): a draft model must use "
                         f"the served model's tokenizer")


class Drafter:
    """The draft model beside an engine: its weights (placed as the engine's), its page pool and
    its compiled calls."""

    def __init__(self, engine, draft: DraftModel):
        check_same_tokenizer(engine.model.vocab_size, draft.model.vocab_size, engine.tokenizer,
                             draft.tokenizer)
        self.engine, self.model, rules = engine, draft.model, engine.rules
        m, c = draft.model, engine.cfg
        self.pool_shape = (m.n_layers, engine.num_pages, c.page_size, m.n_kv_heads, m.head_dim)
        params, sharding = draft.params, None
        if rules is not None:
            params = jax.device_put(params, rules.tree_shardings(llama.param_axes(m), llama.param_shapes(m)))
            sharding = rules.sharding(POOL_AXES, self.pool_shape)
        self.params = params
        self._empty = jax.jit(lambda: jnp.zeros(self.pool_shape, engine.dtype), out_shardings=sharding)
        self.reset()
        calls = ModelCalls(m, rules, engine.dtype, engine.shard_axes)
        self._prefill = calls.jit(calls.prefill)
        self._draft = calls.jit(functools.partial(calls.draft, k=c.num_speculative_tokens))

    def reset(self) -> None:
        """An empty pool (with the engine's: `Engine.reset_cache`)."""
        self.kv = (self._empty(), self._empty())

    def prefill(self, toks, pos, table) -> None:
        """The target's prefill call's chunks, on the draft's pool (no log-probs)."""
        z = np.zeros(len(toks), np.int32)
        _, self.kv = self._prefill(self.params, self.kv, (toks, pos, np.zeros_like(toks), z, table, z))

    def propose(self, batch, decode_rows, wanted: dict[int, int]):
        """({request id: its drafts}, the distributions they were drawn from [B, k, V], on
        device) for `batch` in the rows of `decode_rows` (`Engine._decode_rows(batch)`); each
        request gets `wanted[id]` drafts, its pages reserved for them."""
        rows, table, sampling, _, _ = decode_rows
        B = len(table)
        toks, pos, n = np.zeros((B, 2), np.int32), np.full((B, 2), -1, np.int32), np.zeros(B, np.int32)
        for i, r in zip(rows, batch):
            last = len(r.tokens) - 1  # == r.num_computed
            toks[i] = r.tokens[-2:] if last else [0, r.tokens[-1]]
            pos[i] = [last - 1, last]  # a one-token prompt: [-1, 0] (padding, then its token)
            n[i] = wanted[r.id]
        (drafts_BK, q_BKV), self.kv = self._draft(self.params, self.kv, (toks, pos, table, sampling, n))
        drafts_BK = jax.device_get(drafts_BK)
        return {r.id: drafts_BK[i, :n[i]].tolist() for i, r in zip(rows, batch)}, q_BKV

    def warm(self, n: int, pages: int, sampling):
        """Compiles the draft call of decode bucket (n rows, pages); returns its q (shaped as
        the verification call takes it)."""
        z = np.zeros((n, 2), np.int32)
        (_, q_BKV), self.kv = self._draft(self.params, self.kv, (
            z, z - 1, np.zeros((n, pages), np.int32), sampling, z[:, 0]))
        return q_BKV

    def warm_prefill(self) -> int:
        """Compiles the draft's prefill call of every prefill bucket, plus the count of the
        draft calls `warm` compiled; returns how many."""
        sched = self.engine.scheduler
        for n, width in sched.prefill_buckets:
            z = np.zeros((n, width), np.int32)
            self.prefill(z, z - 1, np.zeros((n, sched.pages_per_seq), np.int32))
        return len(sched.prefill_buckets) + len(sched.decode_buckets)
