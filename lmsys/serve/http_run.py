"""One HTTP request's engine requests (one per prompt and choice, `n`), their events merged on
one asyncio queue: `Run.submit` checks and queues them off the event loop, `Run.events` yields
them to the endpoint (lmsys.serve.routes, lmsys.serve.embeddings) until all finish, aborting the
unfinished ones when the client leaves or the request's timeout passes; tokens are counted in the
metrics and against the request's API key."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request as HTTPRequest

from lmsys.serve.api import APIError, EngineFailure
from lmsys.serve.scheduler import Event, GenerationOptions, Request, RequestError

DISCONNECT_POLL_S = 0.5  # how often a running request checks that its client is still there


@dataclass
class Choice:
    index: int
    req: Request | None
    prompt_text: str
    arrival: float
    last_token_time: float | None = None
    counted: int = 0  # generated tokens already counted in metrics
    started: bool = False  # first chunk sent (streaming)


class Run:
    """The engine requests of one HTTP request, their events merged on one asyncio queue."""

    def __init__(self, server, http: HTTPRequest):
        self.server, self.http = server, http
        self.queue: asyncio.Queue = asyncio.Queue()
        self.choices: list[Choice] = []
        self.disconnected = False
        self.key = http.scope.get("state", {}).get("api_key")  # lmsys.serve.gate's ApiKey or None
        timeout = server.limits.request_timeout
        self.deadline = time.monotonic() + timeout if timeout else None

    async def submit(self, prepare: Callable[[], tuple[list[tuple[list[int], str, GenerationOptions]], Any]]):
        """Runs `prepare` (checks, chat rendering, tokenizing) and queues the (prompt ids,
        prompt text, options) it returns, all or none (429 on a full queue, 503 without an
        engine, 400 if one can never be served), in one trip off the event loop. Returns what
        `prepare` returned beside the items."""
        loop = asyncio.get_running_loop()

        def add_all():  # off the event loop: add_request waits while a step holds the engine
            items, extra = prepare()
            arrival = time.perf_counter()
            self.choices = [Choice(i, None, text, arrival) for i, (_, text, _) in enumerate(items)]
            reqs = self.server.loop.submit_all([(ids, options, self._callback(loop, c))
                                                for c, (ids, _, options) in zip(self.choices, items)])
            for c, req in zip(self.choices, reqs):
                c.req = req
            return items, extra

        self.server.loop.check_admission()  # a full queue or a dead engine: refused before any work
        try:
            items, extra = await asyncio.to_thread(add_all)
        except RequestError as e:
            self.abort()
            raise APIError(400, str(e), param=e.param, code=e.code) from e
        except BaseException:
            self.abort()
            raise
        self.count_tokens("prompt", sum(len(ids) for ids, _, _ in items))
        return extra

    def count_tokens(self, kind: str, n: int) -> None:
        """Counts tokens in the metrics, and against the API key's tokens/min (thread-safe)."""
        metrics = self.server.metrics
        (metrics.prompt_tokens if kind == "prompt" else metrics.generated_tokens).inc(n)
        if self.key is not None:
            metrics.key_tokens.labels(key=self.key.name, kind=kind).inc(n)
            self.server.keys.record_tokens(self.key, n)

    def _callback(self, loop: asyncio.AbstractEventLoop, c: Choice):
        metrics = self.server.metrics

        def on_event(event):  # on the engine thread
            if isinstance(event, Event) and event.finish_reason == "error":  # this request alone failed
                event = EngineFailure("the engine failed while running this request; the server logged the error")
            if isinstance(event, Event):
                now = time.perf_counter()
                new = len(event.token_ids) if c.req is None else len(c.req.generated) - c.counted
                if new > 0:
                    c.counted += new
                    self.count_tokens("completion", new)
                    if c.last_token_time is None:
                        metrics.ttft.observe(now - c.arrival)
                    else:
                        metrics.itl.observe((now - c.last_token_time) / new)
                    c.last_token_time = now
            with contextlib.suppress(RuntimeError):  # the event loop is gone (shutdown)
                loop.call_soon_threadsafe(self.queue.put_nowait, (c.index, event))

        return on_event

    async def events(self):
        """Yields (choice, event) until every choice has finished. Aborts the unfinished ones
        when the client goes away or the consumer stops early."""
        remaining = len(self.choices)
        getter = None
        clock = asyncio.get_running_loop().time
        checked = clock()
        try:
            while remaining:
                if getter is None:
                    getter = asyncio.ensure_future(self.queue.get())
                if self.deadline is not None and time.monotonic() > self.deadline:
                    timeout = self.server.limits.request_timeout
                    raise APIError(408, f"the request did not finish within the server's request timeout "
                                        f"of {timeout:g} s", type="timeout", code="request_timeout")
                done, _ = await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S)
                if clock() - checked >= DISCONNECT_POLL_S:
                    checked = clock()
                    if await self.http.is_disconnected():
                        self.disconnected = True
                        return
                if not done:
                    continue
                index, event = getter.result()
                getter = None
                if isinstance(event, EngineFailure):
                    raise event
                if event.finish_reason is not None:
                    remaining -= 1
                yield self.choices[index], event
        finally:
            if getter is not None:
                getter.cancel()
            self.abort()

    async def finish(self) -> None:
        """Waits for every choice of a non-streamed response (APIError 499 if the client left)."""
        async for _ in self.events():
            pass
        if self.disconnected:
            raise APIError(499, "client disconnected")

    def abort(self) -> None:
        for c in self.choices:
            if c.req is not None and not c.req.done:
                self.server.loop.abort(c.req)

    def usage(self, prompt_lengths: list[int]) -> dict:
        completion = sum(len(c.req.generated) for c in self.choices)
        prompt = sum(prompt_lengths)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
