"""Log-likelihoods of token sequences through lmsys's serving engine (no lm-eval needed).

    scorer = Scorer(engine)
    scorer.loglikelihood([(context_ids, continuation_ids), ...])  # -> [(logprob, is_greedy), ...]
    scorer.rolling([doc_ids, ...], prefix_id=eos)                 # -> [(logprob, tokens), ...]
    text_metrics(scorer, documents)                               # loss, perplexity, bits per byte

Each pair is one engine request whose prompt is context + continuation, asking for the prompt
tokens' log-probs (the engine's `echo` path: `GenerationOptions.prompt_logprobs`) and no
generated token (`max_tokens=0`: prefill only); requests are batched by the engine's scheduler
(several prompts per prefill call, handed over longest first so a call's prompts have similar
lengths), so a list of requests runs as a few large calls. A prompt longer than the engine's
`max_seq_len` tokens keeps its last ones, as lm-eval's `hf` model does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmsys.serve.scheduler import GenerationOptions

# prefill only: the prompt's log-probs, no generated token (and no decode step)
# (prompt_logprobs=0: each token's log-prob and greedy flag, no top alternatives)
_SCORE = GenerationOptions(max_tokens=0, temperature=0.0, ignore_eos=True, prompt_logprobs=0)


class Scorer:
    def __init__(self, engine):
        self.engine = engine
        # tokens predicted in one scored sequence: its prompt is max_len + 1 tokens at most
        self.max_len = engine.cfg.max_seq_len - 1

    def loglikelihood(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """The summed log-prob of each continuation after its context, and whether every
        continuation token is the most likely one (greedy)."""
        engine, prompts, n_cont = self.engine, [], []
        for context, continuation in pairs:
            if not continuation:
                raise ValueError("an empty continuation has no log-likelihood")
            prompt = (list(context) + list(continuation))[-(self.max_len + 1):]
            n_cont.append(min(len(continuation), len(prompt) - 1))
            prompts.append(prompt)
        # longest first, so each prefill call holds prompts of similar length (little padding)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        reqs = [None] * len(prompts)
        for i in order:
            reqs[i] = engine.add_request(prompts[i], _SCORE)
        while engine.has_work():
            engine.step()
        out = []
        for req, n in zip(reqs, n_cont):
            lps = req.prompt_token_logprobs[-n:]
            out.append((math.fsum(lps), all(req.prompt_greedy[-n:])))
        return out

    def rolling(self, documents: list[list[int]], prefix_id: int) -> list[tuple[float, int]]:
        """The log-prob of each whole document (its first token predicted after `prefix_id`) in
        disjoint windows of at most `max_len` predicted tokens, each window's context the tokens
        before it (lm-eval's loglikelihood_rolling with context_len 1); and its token count."""
        pairs, owner = [], []
        for i, ids in enumerate(documents):
            for context, predicted in rolling_windows(list(ids), prefix_id, self.max_len):
                pairs.append((context, predicted))
                owner.append(i)
        sums = [0.0] * len(documents)
        for i, (lp, _) in zip(owner, self.loglikelihood(pairs)):
            sums[i] += lp
        return [(s, len(ids)) for s, ids in zip(sums, documents)]


def rolling_windows(ids: list[int], prefix_id: int, max_len: int):
    """(context, predicted) pairs covering `ids` once, as lm-eval's `get_rolling_token_windows`
    + `make_disjoint_window` with context_len 1: the first window predicts the first `max_len`
    tokens after `prefix_id`; each later one predicts the next tokens with the `max_len` tokens
    before its last one as input, so every window is one full model context."""
    if not ids:
        return
    first = min(max_len, len(ids))
    yield [prefix_id], ids[:first]
    done = first
    while done < len(ids):
        n = min(len(ids) - done, max_len)
        end = done + n
        window = ids[max(0, end - max_len - 1):end - 1]
        yield window[:len(window) - (n - 1)], ids[done:end]
        done = end


@dataclass
class TextMetrics:
    loss: float  # mean negative log-likelihood per token (nats)
    perplexity: float
    bits_per_byte: float  # summed -log2 p over the UTF-8 bytes of the text
    tokens: int
    bytes: int
    documents: int

    def as_dict(self) -> dict:
        return dict(vars(self))


def metrics_from_sums(nll: float, tokens: int, n_bytes: int, documents: int = 0) -> TextMetrics:
    """The in-loop eval's formulas (lmsys.eval.heldout.eval_metrics) over these sums."""
    from lmsys.eval.heldout import eval_metrics

    m = eval_metrics(nll, tokens, n_bytes)
    return TextMetrics(loss=m["eval_loss"], perplexity=m["eval_perplexity"],
                       bits_per_byte=m["eval_bits_per_byte"], tokens=tokens, bytes=n_bytes,
                       documents=documents)


def text_metrics(scorer: Scorer, documents: list[str], prefix_id: int) -> TextMetrics:
    """Loss, perplexity and bits per byte of `documents`, each scored whole after `prefix_id`
    (the end-of-text token): bits per byte divides by the documents' UTF-8 length, so models
    with different tokenizers compare."""
    encode = scorer.engine.tokenizer.encode_batch_fast
    docs = [d for d in documents if d]
    ids = [e.ids for e in encode(docs, add_special_tokens=False)]
    scored = scorer.rolling(ids, prefix_id)
    nll = -math.fsum(lp for lp, _ in scored)
    return metrics_from_sums(nll, sum(n for _, n in scored), sum(len(d.encode("utf-8")) for d in docs),
                             len(docs))
