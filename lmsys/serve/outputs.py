"""The engine's host side of one request: checking its options, and turning what a model call
returned for it (prompt log-probs, a sampled token) into its output, its stop decisions and
its events. Plain Python, no JAX; the engine runs each of these isolated per request."""

from __future__ import annotations

import itertools
import math
import time

import numpy as np

from lmsys.serve.scheduler import MAX_TOP_LOGPROBS, Event, GenerationOptions, Request, RequestError, Scheduler

FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_options(o: GenerationOptions) -> None:
    """RequestError naming the option if the engine cannot represent it (the decode step holds
    top_k, the step index and the seed in 32 bits, temperature and top_p in float32)."""
    def bad(name, rule, value):
        raise RequestError(f"{name} must be {rule}, got {value!r}", param=name)

    if not 0 <= o.max_tokens < 2**31:
        bad("max_tokens", "in [0, 2^31)", o.max_tokens)
    if not (math.isfinite(o.temperature) and 0 <= o.temperature <= FLOAT32_MAX):
        bad("temperature", "a finite float32 >= 0", o.temperature)
    if not 0 <= o.top_k < 2**31:
        bad("top_k", "in [0, 2^31) (0 = off)", o.top_k)
    if not (math.isfinite(o.top_p) and 0 < o.top_p <= 1):
        bad("top_p", "in (0, 1]", o.top_p)
    if o.logprobs is not None and not 0 <= o.logprobs <= MAX_TOP_LOGPROBS:
        bad("logprobs", f"in [0, {MAX_TOP_LOGPROBS}]", o.logprobs)
    if o.prompt_logprobs is not None and not 0 <= o.prompt_logprobs <= MAX_TOP_LOGPROBS:
        bad("logprobs", f"in [0, {MAX_TOP_LOGPROBS}]", o.prompt_logprobs)


def add_prompt_logprobs(req: Request, start: int, n: int, lp_C, top_ids_CK, top_lps_CK) -> None:
    """Records the log-probs of prompt tokens start+1 .. start+n (one prefill chunk's row)."""
    k = req.options.prompt_logprobs
    if start == 0 and not req.prompt_token_logprobs:
        req.prompt_token_logprobs.append(None)  # the first token has no prefix
        req.prompt_top_logprobs.append(None)
    for j in range(n):
        if len(req.prompt_token_logprobs) < len(req.prompt_ids):
            req.prompt_token_logprobs.append(float(lp_C[j]))
            req.prompt_top_logprobs.append(
                {int(t): float(v) for t, v in zip(top_ids_CK[j, :k], top_lps_CK[j, :k])})


def finish_scoring(req: Request, scheduler: Scheduler) -> None:
    """Ends a `max_tokens=0` request once its prompt is scored (no new token)."""
    if req.options.prompt_logprobs is not None and not req.prompt_token_logprobs:
        req.prompt_token_logprobs.append(None)  # a one-token prompt: nothing to score
        req.prompt_top_logprobs.append(None)
    req.finish_reason = "length"
    scheduler.finish(req)
    if req.on_event:
        req.on_event(Event("", [], [], [], "length"))


def append_token(req: Request, scheduler: Scheduler, token: int, logprob: float,
                 top: dict[int, float]) -> None:
    """Records a sampled token, applies the stop rules, emits the new text."""
    o, stops = req.options, req.stops
    if req.first_token_time is None:
        req.first_token_time = time.perf_counter()
    req.generated.append(token)
    scheduler.stats["generated_tokens"] += 1
    text = stops.add(token, req.detok.add(token))
    finish = None
    if not stops.stopped and len(req.generated) >= o.max_tokens:
        text += stops.add(token, req.detok.flush())
        if not stops.stopped:
            text, finish = text + stops.flush(), "length"
    if stops.stopped:
        finish = "stop"
    kept = [] if stops.matched == token else [token]  # a stop token is not part of the output
    new_lp, new_top = [], []
    if o.logprobs is not None and kept:
        new_lp, new_top = [logprob], [dict(itertools.islice(top.items(), o.logprobs))]
        req.token_logprobs += new_lp
        req.top_logprobs += new_top
    req.text += text
    if finish:
        req.finish_reason = finish
        scheduler.finish(req)
    if req.on_event:
        req.on_event(Event(text, kept, new_lp, new_top, finish))
