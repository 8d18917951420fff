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

## Where things are

The request bodies and the error JSON are in lmsys.serve.api, the /v1 endpoints' handling in
lmsys.serve.routes; this module is the app: the engine thread, the API-key gate, the metrics,
/health and /metrics, and running it (`serve`, `BackgroundServer`). The chat template given to
`create_app` (for `lmsys serve`: lmsys.data.chat_template.load_chat_template beside the model's
tokenizer.json) is rendered as Hugging Face does; without one, DEFAULT_CHAT_TEMPLATE.

## Threads

The engine is stepped by one `EngineLoop` thread (started and stopped with the app's
lifespan): it runs `engine.step()` while there is work and sleeps on a condition otherwise.
Events go to each HTTP request's asyncio queue via `loop.call_soon_threadsafe`. A client that
disconnects has its requests aborted (its pages return to the pool on the next loop turn).
"""

from __future__ import annotations

import contextlib
import hmac
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmsys.serve.api import APIError, EngineFailure, validation_message
from lmsys.serve.engine import Engine
from lmsys.serve.routes import Routes, add_routes
from lmsys.serve.scheduler import GenerationOptions, Request

SERVED_PATHS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")


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

    def __init__(self, app, api_key: str | None, metrics: Metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    def authorized(self, scope) -> bool:
        if self.api_key is None:
            return True
        header = dict(scope.get("headers") or ()).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if scope["path"].startswith("/v1") and not self.authorized(scope):
                response = APIError(401, "missing or wrong API key: send the header "
                                         "'Authorization: Bearer <key>'", code="invalid_api_key").response()
                return await response(scope, receive, send_status)
            await self.app(scope, receive, send_status)
        finally:
            path = scope["path"].rstrip("/") or "/"
            if path.startswith("/v1/models"):
                path = "/v1/models"
            endpoint = path if path in SERVED_PATHS else "other"
            self.metrics.requests.labels(endpoint=endpoint, status=str(status[0])).inc()


# ---------------------------------------------------------------------------------- the app


def create_app(engine: Engine, model_name: str, tokenizer, api_key: str | None = None,
               chat_template: str | None = None) -> FastAPI:
    """The OpenAI-compatible app over `engine`; its lifespan starts and stops the engine thread.
    `app.state.server` is the Routes (lmsys.serve.routes), `app.state.server.loop` the
    EngineLoop, `app.state.server.metrics.registry` the metrics."""
    counters = Metrics(engine)
    loop = EngineLoop(engine, on_step_error=lambda e: counters.engine_errors.inc())
    server = Routes(engine, model_name, tokenizer, chat_template, loop, counters)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.loop.start()
        try:
            yield
        finally:
            server.loop.stop()

    app = FastAPI(title="lmsys", description="OpenAI-compatible API over the lmsys engine", lifespan=lifespan)
    app.state.server = server
    app.add_middleware(_Gate, api_key=api_key, metrics=counters)

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, e: RequestValidationError):
        message, param = validation_message(e.errors())
        return APIError(400, message, param=param, code="invalid_value").response()

    @app.exception_handler(ValidationError)
    async def _pydantic_error(_, e: ValidationError):
        message, param = validation_message(e.errors())
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

    add_routes(app, server)

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


__all__ = ["BackgroundServer", "EngineLoop", "create_app", "serve"]
