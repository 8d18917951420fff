"""The OpenAI-compatible HTTP server: FastAPI in front of one `Engine`, stepped by a thread.

    app = create_app(engine, "tiny", tokenizer, api_key="secret")
    uvicorn.run(app, host="127.0.0.1", port=8000)          # or: lmsys serve RUN_DIR

## Endpoints

    GET  /v1/models                 the served model (`id` = its name)
    POST /v1/completions            prompt: str | [token ids] | a list of those (a batch)
    POST /v1/chat/completions       messages, rendered with the model's chat template
    GET  /health                    200 {"status": "ok"}
    GET  /metrics                   Prometheus text (own CollectorRegistry per app):
        lmsys_requests_total{endpoint,status}, lmsys_prompt_tokens_total,
        lmsys_generated_tokens_total, lmsys_engine_errors_total, lmsys_requests_waiting (queue
        depth), lmsys_requests_running, lmsys_kv_pages_used, lmsys_kv_pages_total,
        lmsys_time_to_first_token_seconds and lmsys_inter_token_latency_seconds (histograms)

Sampling: `max_tokens`, `temperature` (0 = greedy), `top_p`, `top_k` (extension), `seed`,
`stop` (str or list), `n` (choice i samples with seed + i), `ignore_eos` (extension).
Completions: `logprobs` (0..5 alternatives per token), `echo` (with `logprobs`: the prompt's
log-probs too, the first null). Chat: `logprobs: true` + `top_logprobs` (0..5). `stream: true`
sends server-sent events in OpenAI's chunk format ending with `data: [DONE]`;
`stream_options: {"include_usage": true}` adds a last chunk with the usage.

Errors are OpenAI's JSON `{"error": {"message", "type", "param", "code"}}`: 400 for malformed
JSON, wrong types, out-of-range values and prompts that do not fit the context; 401 for a
missing or wrong API key (when one is set); 404 for an unknown model; 500 if the engine fails
while running a request (the requests running in that step fail; queued ones and the server
carry on).

## Chat template

The template given to `create_app` (for `lmsys serve`: `chat_template` of the
`tokenizer_config.json` beside the model's tokenizer.json, when there is one) is rendered with
jinja2 as Hugging Face does (`messages`, `add_generation_prompt=True`, `bos_token`,
`eos_token`). Otherwise DEFAULT_CHAT_TEMPLATE: each message as `<|role|>\\ncontent\\n`, then
`<|assistant|>\\n`.

## Threads

The engine is stepped by one `EngineLoop` thread (started and stopped with the app's
lifespan): it runs `engine.step()` while there is work and sleeps on a condition otherwise.
Events go to each HTTP request's asyncio queue via `loop.call_soon_threadsafe`. A client that
disconnects has its requests aborted (its pages return to the pool on the next loop turn).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import secrets
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmsys.serve.engine import (
    MAX_TOP_LOGPROBS,
    Engine,
    Event,
    GenerationOptions,
    Request,
    RequestError,
)

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
DISCONNECT_POLL_S = 0.5  # how often a running request checks that its client is still there
SERVED_PATHS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")


# ---------------------------------------------------------------------------------- errors


class APIError(Exception):
    """An error answered as OpenAI's error JSON."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


class EngineFailure(Exception):
    """The engine raised while running a request (delivered to the request's queue)."""


# ---------------------------------------------------------------------------------- request bodies


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class _Body(BaseModel):
    # strict: "10" is not an int, 1 is not a str; unknown OpenAI fields (user, penalties...) ignored
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # extension; 0 or -1 = off
    n: int = Field(1, ge=1, le=64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False  # extension


class CompletionBody(_Body):
    prompt: str | list[int] | list[str | list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    max_tokens: int | None = Field(16, ge=1)


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    max_completion_tokens: int | None = Field(None, ge=1)


# ---------------------------------------------------------------------------------- the engine thread


class EngineLoop:
    """Steps the engine on one thread while it has work; sleeps on a condition otherwise."""

    def __init__(self, engine: Engine, on_step_error: Callable[[BaseException], None] | None = None):
        self.engine = engine
        self.cond = threading.Condition()
        self.aborts: deque[Request] = deque()
        self.stopped = False
        self.thread: threading.Thread | None = None
        self.errors = 0
        self.on_step_error = on_step_error

    def start(self) -> None:
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="lmsys-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=30)
        for req in list(self.engine.running) + list(self.engine.waiting):
            self.engine.abort(req)

    def submit(self, prompt_ids: list[int], options: GenerationOptions, on_event: Callable) -> Request:
        """Queues a request (raises RequestError if it can never be served); wakes the loop."""
        req = self.engine.add_request(prompt_ids, options, on_event)
        with self.cond:
            self.cond.notify_all()
        return req

    def abort(self, req: Request) -> None:
        """Aborts on the engine thread, between steps (never blocks the caller on a step)."""
        with self.cond:
            self.aborts.append(req)
            self.cond.notify_all()

    def _run(self) -> None:
        engine = self.engine
        while True:
            with self.cond:
                while not self.stopped and not self.aborts and not engine.has_work():
                    self.cond.wait()
                if self.stopped:
                    return
                aborts = list(self.aborts)
                self.aborts.clear()
            for req in aborts:
                engine.abort(req)
            if not engine.has_work():
                continue
            try:
                engine.step()
            except Exception as e:  # noqa: BLE001 - the server outlives a failed step
                self.errors += 1
                traceback.print_exc()
                self._fail_running(e)

    def _fail_running(self, error: Exception) -> None:
        """Fails the requests the failed step was running and makes the engine usable again."""
        engine = self.engine
        for req in list(engine.running):
            engine.abort(req)
            if req.on_event:
                with contextlib.suppress(Exception):
                    req.on_event(EngineFailure(f"the engine failed while running this request: "
                                               f"{type(error).__name__}: {error}"))
        # a jitted step that fails after donating the KV cache leaves it deleted: rebuild it
        # (empty: every request that had pages in it was just aborted)
        if any(a.is_deleted() for a in engine.kv):
            engine.reset_cache()
        if self.on_step_error:
            self.on_step_error(error)


# ---------------------------------------------------------------------------------- metrics


class Metrics:
    def __init__(self, engine: Engine):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("lmsys_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("lmsys_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generated_tokens = Counter("lmsys_generated_tokens", "Tokens generated", registry=r)
        self.engine_errors = Counter("lmsys_engine_errors", "Engine steps that raised", registry=r)
        Gauge("lmsys_requests_waiting", "Requests queued for a slot (queue depth)",
              registry=r).set_function(lambda: len(engine.waiting))
        Gauge("lmsys_requests_running", "Requests holding a slot",
              registry=r).set_function(lambda: len(engine.running))
        Gauge("lmsys_kv_pages_used", "KV cache pages in use", registry=r).set_function(lambda: engine.pool.num_used)
        Gauge("lmsys_kv_pages_total", "KV cache pages in the pool", registry=r).set_function(
            lambda: engine.pool.num_pages)
        self.ttft = Histogram("lmsys_time_to_first_token_seconds", "Arrival to first generated token",
                              registry=r, buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.itl = Histogram("lmsys_inter_token_latency_seconds", "Time between generated tokens",
                             registry=r, buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))


class _Gate:
    """ASGI middleware, outermost: checks the API key of /v1 requests (before the body is
    read), and counts every HTTP request by endpoint and response status."""

    def __init__(self, app, server: _Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if scope["path"].startswith("/v1") and not self.server.authorized(scope):
                response = APIError(401, "missing or wrong API key: send the header "
                                         "'Authorization: Bearer <key>'", code="invalid_api_key").response()
                return await response(scope, receive, send_status)
            await self.app(scope, receive, send_status)
        finally:
            path = scope["path"].rstrip("/") or "/"
            if path.startswith("/v1/models"):
                path = "/v1/models"
            endpoint = path if path in SERVED_PATHS else "other"
            self.server.metrics.requests.labels(endpoint=endpoint, status=str(status[0])).inc()


# ---------------------------------------------------------------------------------- chat template


def load_chat_template(tokenizer_spec: str) -> str | None:
    """The chat template beside a tokenizer.json (file or directory): chat_template.jinja, else
    `chat_template` of tokenizer_config.json; None if neither (then DEFAULT_CHAT_TEMPLATE)."""
    path = os.path.expanduser(tokenizer_spec)
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    if not directory:
        return None
    jinja = os.path.join(directory, "chat_template.jinja")  # where transformers 5 saves it
    if os.path.isfile(jinja):
        with open(jinja) as f:
            return f.read() or None
    config = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(config):
        return None
    with open(config) as f:
        template = json.load(f).get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template or None


class ChatTemplate:
    def __init__(self, source: str, bos_token: str, eos_token: str):
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise APIError(400, f"chat template: {message}", param="messages")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
        self.template = env.from_string(source)
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: list[dict]) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=True,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except APIError:
            raise
        except Exception as e:
            raise APIError(400, f"chat template failed on these messages: {e}", param="messages") from e


def _special_token(tokenizer, candidates: tuple[str, ...], token_id: int | None = None) -> str:
    if token_id is not None:
        return tokenizer.id_to_token(token_id) or ""
    for token in candidates:
        if tokenizer.token_to_id(token) is not None:
            return token
    return ""


# ---------------------------------------------------------------------------------- one HTTP request's engine requests


@dataclass
class _Choice:
    index: int
    req: Request | None
    prompt_text: str
    arrival: float
    last_token_time: float | None = None
    counted: int = 0  # generated tokens already counted in metrics
    started: bool = False  # first chunk sent (streaming)


class _Run:
    """The engine requests of one HTTP request, their events merged on one asyncio queue."""

    def __init__(self, server: _Server, http: HTTPRequest):
        self.server, self.http = server, http
        self.queue: asyncio.Queue = asyncio.Queue()
        self.choices: list[_Choice] = []
        self.disconnected = False

    async def submit(self, items: list[tuple[list[int], str, GenerationOptions]]) -> None:
        """Queues every (prompt ids, prompt text, options); aborts them all if one cannot fit."""
        loop = asyncio.get_running_loop()
        self.choices = [_Choice(i, None, text, time.perf_counter()) for i, (_, text, _) in enumerate(items)]

        def add_all():  # off the event loop: add_request waits while a step holds the engine
            for c, (ids, _, options) in zip(self.choices, items):
                c.req = self.server.loop.submit(ids, options, self._callback(loop, c))

        try:
            await asyncio.to_thread(add_all)
        except RequestError as e:
            self.abort()
            raise APIError(400, str(e), param="prompt", code="context_length_exceeded") from e
        except BaseException:
            self.abort()
            raise
        self.server.metrics.prompt_tokens.inc(sum(len(ids) for ids, _, _ in items))

    def _callback(self, loop: asyncio.AbstractEventLoop, c: _Choice):
        metrics = self.server.metrics

        def on_event(event):  # on the engine thread
            if isinstance(event, Event):
                now = time.perf_counter()
                new = len(event.token_ids) if c.req is None else len(c.req.generated) - c.counted
                if new > 0:
                    c.counted += new
                    metrics.generated_tokens.inc(new)
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


# ---------------------------------------------------------------------------------- the app


class _Server:
    def __init__(self, engine: Engine, model_name: str, tokenizer, api_key: str | None,
                 chat_template: str | None):
        self.engine, self.model_name, self.tokenizer, self.api_key = engine, model_name, tokenizer, api_key
        self.metrics = Metrics(engine)
        self.loop = EngineLoop(engine, on_step_error=lambda e: self.metrics.engine_errors.inc())
        self.created = int(time.time())
        self.chat = ChatTemplate(chat_template or DEFAULT_CHAT_TEMPLATE,
                                 _special_token(tokenizer, BOS_CANDIDATES),
                                 _special_token(tokenizer, (), engine.eos_token_id)
                                 if engine.eos_token_id is not None else "")

    # -------------------------------------------------------------- shared pieces

    def authorized(self, scope) -> bool:
        if self.api_key is None:
            return True
        header = dict(scope.get("headers") or ()).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def options(self, body: _Body, max_tokens: int, seed: int, **kw) -> GenerationOptions:
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        return GenerationOptions(max_tokens=max_tokens, temperature=body.temperature,
                                 top_k=max(body.top_k, 0), top_p=body.top_p, seed=seed,
                                 stop=tuple(s for s in stop if s), ignore_eos=body.ignore_eos, **kw)

    @staticmethod
    def seeds(body: _Body) -> list[int]:
        base = body.seed if body.seed is not None else secrets.randbits(31)
        return [(base + i) % 2**32 for i in range(body.n)]

    def token_str(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def sse(self, gen, include_done: bool = True):
        async def stream():
            try:
                async for chunk in gen:
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            except EngineFailure as e:
                yield f"data: {json.dumps(APIError(500, str(e), 'server_error').body())}\n\n"
            except APIError as e:
                yield f"data: {json.dumps(e.body())}\n\n"
            if include_done:
                yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -------------------------------------------------------------- completions

    def completion_logprobs(self, c: _Choice, echo: bool, tokens: list[int], lps: list[float],
                            tops: list[dict[int, float]], offset: int) -> dict:
        """OpenAI's legacy logprobs object; with echo (first chunk / whole answer) the prompt's
        tokens come first."""
        ids, lp, top = [], [], []
        if echo:
            ids += c.req.prompt_ids
            lp += c.req.prompt_token_logprobs or [None] * len(c.req.prompt_ids)
            top += c.req.prompt_top_logprobs or [None] * len(c.req.prompt_ids)
        ids += tokens
        lp += lps
        top += tops
        strs, offsets = [], []
        for t in ids:
            offsets.append(offset)
            s = self.token_str(t)
            strs.append(s)
            offset += len(s)
        return {"tokens": strs, "token_logprobs": lp,
                "top_logprobs": [None if d is None else {self.token_str(k): v for k, v in d.items()} for d in top],
                "text_offset": offsets}

    async def completions(self, body: CompletionBody, http: HTTPRequest):
        self.check_model(body.model)
        prompts = body.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise APIError(400, "prompt is empty; send a string, a list of token ids or a list of those",
                           param="prompt")
        items, lengths = [], []
        for p in prompts:
            ids = self.engine.encode(p) if isinstance(p, str) else list(p)
            text = p if isinstance(p, str) else self.tokenizer.decode(ids)
            lengths.append(len(ids))
            for seed in self.seeds(body):
                items.append((ids, text, self.options(
                    body, body.max_tokens or 16, seed, logprobs=body.logprobs,
                    prompt_logprobs=body.logprobs if body.echo and body.logprobs is not None else None)))
        run = _Run(self, http)
        await run.submit(items)
        rid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": self.model_name}
        with_logprobs = body.logprobs is not None
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return self.sse(self._stream_completions(run, head, body.echo, with_logprobs, include_usage, lengths))
        await run.finish()
        choices = []
        for c in run.choices:
            r = c.req
            text = (c.prompt_text if body.echo else "") + r.text
            lp = None
            if with_logprobs:
                lp = self.completion_logprobs(c, body.echo, r.generated[:len(r.token_logprobs)],
                                              r.token_logprobs, r.top_logprobs, 0)
            choices.append({"index": c.index, "text": text, "logprobs": lp, "finish_reason": r.finish_reason})
        return {**head, "choices": choices, "usage": run.usage(lengths)}

    async def _stream_completions(self, run: _Run, head: dict, echo: bool, with_logprobs: bool,
                                  include_usage: bool, lengths: list[int]):
        offsets = {}
        async for c, ev in run.events():
            text, lp = ev.text, None
            first = not c.started
            c.started = True
            if first and echo:
                text = c.prompt_text + text
            if with_logprobs:
                start = offsets.get(c.index, 0)
                lp = self.completion_logprobs(c, first and echo, ev.token_ids, ev.logprobs, ev.top_logprobs, start)
                offsets[c.index] = start + sum(len(s) for s in lp["tokens"])
            if not (text or ev.token_ids or ev.finish_reason or first):
                continue
            chunk = {**head, "choices": [{"index": c.index, "text": text, "logprobs": lp,
                                          "finish_reason": ev.finish_reason}]}
            if include_usage:
                chunk["usage"] = None
            yield chunk
        if include_usage:
            yield {**head, "choices": [], "usage": run.usage(lengths)}

    # -------------------------------------------------------------- chat

    def chat_logprobs(self, tokens: list[int], lps: list[float], tops: list[dict[int, float]]) -> dict:
        def entry(t, lp):
            s = self.token_str(t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

        return {"content": [{**entry(t, lp), "top_logprobs": [entry(k, v) for k, v in top.items()]}
                            for t, lp, top in zip(tokens, lps, tops)]}

    async def chat_completions(self, body: ChatBody, http: HTTPRequest):
        self.check_model(body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        messages = []
        for m in body.messages:
            content = m.content
            if isinstance(content, list):
                content = "".join(part.text for part in content)
            messages.append({**(m.model_extra or {}), "role": m.role, "content": content or "",
                             **({"name": m.name} if m.name else {})})
        prompt = self.chat.render(messages)
        ids = self.engine.encode(prompt)
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:  # as much as the context leaves
            max_tokens = max(1, self.engine.cfg.max_seq_len - len(ids))
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        items = [(ids, prompt, self.options(body, max_tokens, seed, logprobs=logprobs)) for seed in self.seeds(body)]
        run = _Run(self, http)
        await run.submit(items)
        rid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        head = {"id": rid, "object": "chat.completion", "created": created, "model": self.model_name}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return self.sse(self._stream_chat(run, {**head, "object": "chat.completion.chunk"},
                                              body.logprobs, include_usage, [len(ids)]))
        await run.finish()
        choices = []
        for c in run.choices:
            r = c.req
            lp = (self.chat_logprobs(r.generated[:len(r.token_logprobs)], r.token_logprobs, r.top_logprobs)
                  if body.logprobs else None)
            choices.append({"index": c.index, "message": {"role": "assistant", "content": r.text},
                            "logprobs": lp, "finish_reason": r.finish_reason})
        return {**head, "choices": choices, "usage": run.usage([len(ids)])}

    async def _stream_chat(self, run: _Run, head: dict, with_logprobs: bool, include_usage: bool,
                           lengths: list[int]):
        extra = {"usage": None} if include_usage else {}
        for c in run.choices:  # the first chunk of each choice carries the role
            yield {**head, "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}], **extra}
        async for c, ev in run.events():
            if ev.text or ev.token_ids:
                lp = self.chat_logprobs(ev.token_ids, ev.logprobs, ev.top_logprobs) if with_logprobs else None
                yield {**head, "choices": [{"index": c.index, "delta": {"content": ev.text},
                                            "logprobs": lp, "finish_reason": None}], **extra}
            if ev.finish_reason is not None:
                yield {**head, "choices": [{"index": c.index, "delta": {}, "logprobs": None,
                                            "finish_reason": ev.finish_reason}], **extra}
        if include_usage:
            yield {**head, "choices": [], "usage": run.usage(lengths)}

    # -------------------------------------------------------------- models

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "lmsys",
                "max_model_len": self.engine.cfg.max_seq_len}


def _validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """A one-line message and the top-level parameter for pydantic's errors."""
    e = errors[0]
    if e.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg', ''))}", None
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    param = loc[0] if loc else None
    msg = e.get("msg", "invalid value")
    if e.get("type") != "missing" and "input" in e:
        msg += f" (got {repr(e['input'])[:80]})"
    if len(errors) > 1:
        msg += f"; and {len(errors) - 1} more problem(s)"
    return (f"{'.'.join(loc)}: {msg}" if loc else msg), param


def create_app(engine: Engine, model_name: str, tokenizer, api_key: str | None = None,
               chat_template: str | None = None) -> FastAPI:
    """The OpenAI-compatible app over `engine`; its lifespan starts and stops the engine thread.
    `app.state.server.loop` is the EngineLoop, `app.state.server.metrics.registry` the metrics."""
    server = _Server(engine, model_name, tokenizer, api_key, chat_template)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.loop.start()
        try:
            yield
        finally:
            server.loop.stop()

    app = FastAPI(title="lmsys", description="OpenAI-compatible API over the lmsys engine", lifespan=lifespan)
    app.state.server = server
    app.add_middleware(_Gate, server=server)

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, e: RequestValidationError):
        message, param = _validation_message(e.errors())
        return APIError(400, message, param=param, code="invalid_value").response()

    @app.exception_handler(ValidationError)
    async def _pydantic_error(_, e: ValidationError):
        message, param = _validation_message(e.errors())
        return APIError(400, message, param=param, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return APIError(e.status_code, str(e.detail), type=kind).response()

    @app.exception_handler(EngineFailure)
    async def _engine_error(_, e: EngineFailure):
        return APIError(500, str(e), type="server_error").response()

    @app.exception_handler(Exception)
    async def _any_error(_, e: Exception):
        traceback.print_exception(e)
        return APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").response()


    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [server.model_card()]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str):
        server.check_model(model)
        return server.model_card()

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: HTTPRequest):
        return await server.completions(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: HTTPRequest):
        return await server.chat_completions(body, request)

    @app.get("/health")
    async def health():
        if server.loop.thread is None or not server.loop.thread.is_alive():
            raise APIError(503, "the engine thread is not running", type="server_error")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(server.metrics.registry).decode(),
                                 media_type=CONTENT_TYPE_LATEST)

    return app


def serve(engine: Engine, model_name: str, tokenizer, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, chat_template: str | None = None, log_level: str = "info") -> None:
    """Serves until interrupted (Ctrl-C)."""
    import uvicorn

    app = create_app(engine, model_name, tokenizer, api_key=api_key, chat_template=chat_template)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


class BackgroundServer:
    """An app served by uvicorn on a thread of this process, for notebooks and tests:

        with BackgroundServer(create_app(engine, "tiny", tokenizer)) as server:
            OpenAI(base_url=f"{server.url}/v1", api_key="x")...

    `port=0` takes a free port."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0):
        import socket

        import uvicorn

        sock = socket.socket()
        sock.bind((host, port))
        self.port = sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + timeout
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the server did not start on {self.url} within {timeout:.0f} s")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.stop()


__all__ = ["DEFAULT_CHAT_TEMPLATE", "APIError", "BackgroundServer", "EngineLoop", "create_app",
           "load_chat_template", "serve"]
