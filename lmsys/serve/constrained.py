"""Structured output: a request's grammar (a JSON schema, a regex, a list of choices, a Lark /
GBNF grammar) as a per-step token mask applied inside the batched decode call.

    grammar = request_grammar("json_schema", {"type": "object", ...})   # llguidance grammar text
    engine.generate([prompt], GenerationOptions(grammar=grammar, max_tokens=64))

The grammar library is llguidance (the `structured` extra): a Rust wheel without dependencies
(xgrammar needs torch and triton, outlines-core precompiles a whole-vocabulary index per schema),
used by vLLM and SGLang; it compiles a schema lazily in milliseconds and computes each step's
mask in well under a millisecond, so nothing is compiled ahead per schema.

How it runs: `Grammars` (one per engine, made on its first constrained request) wraps the
engine's tokenizer for llguidance once. `Grammars.check` validates a grammar (a cached result
per grammar text; a schema the library rejects is a RequestError naming the problem, the
server's 400) and `Grammars.matcher` builds a request's parser state: both run where the request
is made (`Engine.new_request`: the server's worker thread, never the engine loop). Each decode
step, `Grammars.bitmask` fills one row of 32-bit words per batch row (bit t of row i: token t is
allowed) for the constrained rows, in parallel in llguidance, and leaves every other row
all-allowed (-1), so constrained and free rows share one compiled decode step; the call
applies it with `masked_logits` before sampling (log-probs of a constrained row are those of the
masked distribution). After the step each constrained request's parser consumes its token
(`advance`). When the grammar is complete only the end-of-text token is allowed, and it ends the
request (finish_reason "stop", also with `ignore_eos`).
"""

from __future__ import annotations

import functools
import json
import threading

import jax.numpy as jnp
import numpy as np

from lmsys.serve.scheduler import Request, RequestError

# the request fields that ask for a grammar: response_format (OpenAI) and vLLM's guided_*
KINDS = ("json_schema", "regex", "choice", "grammar")
CHECKED_CACHE = 512  # validated grammar texts remembered per engine


def request_grammar(kind: str, spec) -> str:
    """llguidance grammar text for one constraint: kind "json_schema" (a schema dict or its JSON
    text; {"type": "object"} is any object), "regex" (Rust regex syntax, whole output),
    "choice" (a list of strings: the output is one of them) or "grammar" (Lark or GBNF).
    JSON is compact: no whitespace between tokens (a model never loops on blank lines)."""
    from llguidance import LLMatcher, grammar_from

    try:
        if kind == "json_schema":
            schema = json.loads(spec) if isinstance(spec, str) else spec
            if not isinstance(schema, dict):
                raise ValueError(f"a JSON schema is an object, got {type(schema).__name__}")
            return LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        if kind == "choice":
            if not spec or not all(isinstance(c, str) and c for c in spec):
                raise ValueError("a list of one or more non-empty strings is needed")
            return grammar_from("choice", json.dumps(list(spec)))
        if kind in ("regex", "grammar"):
            return grammar_from(kind, spec)
    except (ValueError, TypeError, RuntimeError) as e:  # json.JSONDecodeError is a ValueError
        raise RequestError(f"{kind}: {e}", param=kind, code="invalid_grammar") from None
    raise ValueError(f"unknown grammar kind {kind!r}; one of {KINDS}")


class Grammars:
    """llguidance's view of one engine's tokenizer, validated grammars and parser states."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_id: int):
        from llguidance import LLExecutor, LLTokenizer

        # the tokenizer's own JSON (a `tokenizers.Tokenizer`); tokens past it (a vocabulary
        # padded for the model's shapes) are never allowed
        self.vocab_size, self.eos_token_id = vocab_size, eos_token_id
        self.tokenizer = LLTokenizer(tokenizer.to_str(), n_vocab=vocab_size, eos_token=eos_token_id)
        self.words = (vocab_size + 31) // 32
        self.executor = LLExecutor()
        self._check = functools.lru_cache(CHECKED_CACHE)(self._validate)
        self._lock = threading.Lock()

    def _validate(self, grammar: str) -> str:
        from llguidance import LLMatcher

        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        return messages[0] if is_error else ""

    def check(self, grammar: str, param: str = "response_format") -> None:
        """RequestError naming the problem if llguidance rejects `grammar` (cached per text)."""
        with self._lock:  # lru_cache is thread-safe for reads; keep one compile per text
            problem = self._check(grammar)
        if problem:
            raise RequestError(f"{param}: the grammar library rejected it: {problem}", param=param,
                               code="invalid_grammar")

    def matcher(self, grammar: str, param: str = "response_format"):
        """A fresh parser state for one request (llguidance builds it without the GIL)."""
        from llguidance import LLMatcher

        self.check(grammar, param)
        m = LLMatcher(self.tokenizer, grammar)
        if m.is_error():
            raise RequestError(f"{param}: {m.get_error()}", param=param, code="invalid_grammar")
        return m

    def bitmask(self, rows: list[int], reqs: list[Request], B: int) -> np.ndarray:
        """[B, ceil(V / 32)] int32: each constrained request's allowed tokens in its row, every
        other row all allowed."""
        from llguidance.numpy import fill_next_token_bitmask_par

        mask = np.full((B, self.words), -1, np.int32)
        pairs = [(r.matcher, i) for i, r in zip(rows, reqs) if r.matcher is not None]
        if pairs:
            fill_next_token_bitmask_par(self.executor, pairs, mask)
        return mask


def all_allowed(B: int, vocab_size: int) -> np.ndarray:
    """The bitmask of a batch without constraints."""
    return np.full((B, (vocab_size + 31) // 32), -1, np.int32)


def advance(req: Request, token: int) -> None:
    """The request's parser consumes its sampled token (the mask allowed it, so this fails only
    on a library fault: the request then ends with an error, its neighbours go on)."""
    if not req.matcher.consume_token(token):
        raise RuntimeError(f"the grammar refused token {token}: {req.matcher.get_error()}")


def masked_logits(logits_BV, bitmask_BW):
    """Logits with the tokens a row's bitmask does not allow at -inf (inside the decode call)."""
    bits_BW32 = (bitmask_BW[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1
    allowed_BV = bits_BW32.reshape(bitmask_BW.shape[0], -1)[:, :logits_BV.shape[-1]].astype(bool)
    return jnp.where(allowed_BV, logits_BV, -jnp.inf)
