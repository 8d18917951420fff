"""The OpenAI-compatible HTTP server: FastAPI in front of one `Engine`, stepped by a thread.

    app = create_app(engine, "tiny", tokenizer, api_key="secret")
    uvicorn.run(app, host="127.0.0.1", port=8000)          # or: lmsys serve RUN_DIR

## Endpoints

    GET  /v1/models                 the served model (`id` = its name)
    POST /v1/completions            prompt: str | [token ids] | a list of those (a batch)
    POST /v1/chat/completions       messages, rendered with the model's chat template
    GET  /health                    200 {"status": "ok"}; 503 once the engine thread is gone
    GET  /metrics                   Prometheus text (own CollectorRegistry per app):
        lmsys_requests_total{endpoint,status}, lmsys_prompt_tokens_total,
        lmsys_generated_tokens_total, lmsys_engine_errors_total, lmsys_requests_waiting (queue
        depth), lmsys_requests_running, lmsys_kv_pages_used, lmsys_kv_pages_total,
        lmsys_time_to_first_token_seconds and lmsys_inter_token_latency_seconds (histograms),
        lmsys_key_requests_total{key,status} and lmsys_key_tokens_total{key,kind} (by key name)

Sampling: `max_tokens`, `temperature` (0 = greedy), `top_p`, `top_k` (extension), `seed`,
`stop` (str or list), `n` (choice i samples with seed + i), `ignore_eos` (extension).
Completions: `logprobs` (0..5 alternatives per token), `echo` (with `logprobs`: the prompt's
log-probs too, the first null; with `max_tokens: 0`, only those). Chat: `logprobs: true` +
`top_logprobs` (0..5). `stream: true` sends server-sent events in OpenAI's chunk format ending
with `data: [DONE]` (after an error event if the stream fails); `stream_options:
{"include_usage": true}` adds a last chunk with the usage.

Errors are OpenAI's JSON `{"error": {"message", "type", "param", "code"}}` and never carry
internal exception text (the log does): 400 naming the field (lmsys.serve.api), 401 without a
valid key, 404 for an unknown model, 408 past the request timeout, 413 for a body over the
limit, 429 + Retry-After for a full queue or a key over its limits (lmsys.serve.gate), 500 when
the engine fails a request (the requests of a failed step; a request failing on the host alone),
503 once the engine thread is gone.

## Where things are

The request bodies, limits and the error JSON are in lmsys.serve.api, the /v1 endpoints'
handling in lmsys.serve.routes, keys, rate limits and the body limit in lmsys.serve.gate; this
module is the app: the supervised engine thread, the metrics, /health and /metrics, and running
it (`serve`, `run_app`, `BackgroundServer`). The chat template given to `create_app` (for
`lmsys serve`: lmsys.data.chat_template.load_chat_template beside the model's tokenizer.json)
is rendered as Hugging Face does; without one, DEFAULT_CHAT_TEMPLATE.

## Threads

The engine is stepped by one `EngineLoop` thread (started and stopped with the app's
lifespan): it runs `engine.step()` while there is work and sleeps on a condition otherwise.
Checks, chat rendering, tokenizing and queueing run in a worker thread (`asyncio.to_thread`),
never on the event loop. Events go to each HTTP request's asyncio queue via
`loop.call_soon_threadsafe`. A client that disconnects has its requests aborted (its pages
return to the pool on the next loop turn). If the engine thread dies, every queued and running
request gets a 503 at once, new ones too, and `run_app` / `serve` stop the server: exit status 1.
A weight swap (`EngineLoop.swap`, set by lmsys.serve.follow for `lmsys serve --follow`) runs on
the engine thread between steps.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
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

from lmsys.serve.api import APIError, EngineFailure, Limits, validation_message
from lmsys.serve.engine import Engine
from lmsys.serve.gate import Gate, KeyRing
from lmsys.serve.embeddings import add_embedding_routes
from lmsys.serve.routes import Routes, add_routes
from lmsys.serve.scheduler import GenerationOptions, Request

log = logging.getLogger(__name__)
RETRY_AFTER_S = 1  # the Retry-After of a full queue


# ---------------------------------------------------------------------------------- the engine thread


class EngineLoop:
    """Steps the engine on one thread while it has work; sleeps on a condition otherwise.

    Supervised: a failed step fails the requests it was running and the loop goes on; if the
    loop itself dies (its failure path raised, or a BaseException), `dead` says why, every
    queued and running request gets a 503 at once, `submit` answers 503 from then on, and
    `on_death` is called (`serve` then shuts the server down and exits non-zero).
    """

    def __init__(self, engine: Engine, on_step_error: Callable[[BaseException], None] | None = None,
                 max_queue: int = 0, on_death: Callable[[BaseException], None] | None = None):
        self.engine = engine
        self.cond = threading.Condition()
        self.admission = threading.Lock()
        self.aborts: deque[Request] = deque()
        self.pending: deque[Request] = deque()  # admitted, handed to the engine at its next turn
        self.stopped = False
        self.thread: threading.Thread | None = None
        self.errors = 0
        self.on_step_error, self.on_death = on_step_error, on_death
        self.max_queue = max_queue  # engine requests waiting for a slot at most (0 = no limit)
        self.dead: str | None = None
        self.fault: BaseException | None = None
        # new weights to swap in (lmsys.serve.follow.Swap): while set, it runs between steps,
        # holding the requests that have not started until the running ones finish
        self.swap = None

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
        for req in list(self.engine.running) + list(self.engine.waiting) + list(self.pending):
            self.engine.abort(req)
        self.pending.clear()

    def inject_fault(self, error: BaseException) -> None:
        """The fault hook: the engine thread raises `error` at its next turn, outside the
        per-step handling (as if its failure path had raised): it dies, supervised."""
        with self.cond:
            self.fault = error
            self.cond.notify_all()

    def submit(self, prompt_ids: list[int], options: GenerationOptions, on_event: Callable) -> Request:
        """Queues one request; see `submit_all`."""
        return self.submit_all([(prompt_ids, options, on_event)])[0]

    def submit_all(self, items: list[tuple[list[int], GenerationOptions, Callable]]) -> list[Request]:
        """Queues every (prompt ids, options, on_event), all or none: APIError 503 if the engine
        thread is dead, 429 (Retry-After) if they would take the queue past `max_queue` while
        others wait; RequestError if one can never be served. Never waits for a step: the
        requests are handed to the engine between steps."""
        reqs = [self.engine.new_request(ids, options, on_event) for ids, options, on_event in items]
        with self.admission:
            self.check_admission(len(items))
            with self.cond:
                self.pending.extend(reqs)
                self.cond.notify_all()
        if self.dead:  # died while these were added: the death may not have seen them
            self._fail(reqs, EngineFailure(_unavailable(self.dead).message, 503))
        return reqs

    def check_admission(self, n: int = 1) -> None:
        """APIError 503 if the engine thread is dead, 429 if `n` more requests would take the
        queue past `max_queue` while others wait (also a cheap early check before tokenizing)."""
        if self.dead:
            raise _unavailable(self.dead)
        waiting = len(self.engine.waiting) + len(self.pending)
        if self.max_queue and waiting and waiting + n > self.max_queue:
            raise APIError(429, f"the server is busy: {waiting} requests are queued (limit "
                                f"{self.max_queue}); retry in {RETRY_AFTER_S} s", type="server_overloaded",
                           code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})

    def abort(self, req: Request) -> None:
        """Aborts on the engine thread, between steps (never blocks the caller on a step)."""
        with self.cond:
            self.aborts.append(req)
            self.cond.notify_all()

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001 - supervised: the loop died; say so and fail everything
            self._die(e)

    def _loop(self) -> None:
        engine = self.engine
        while True:
            with self.cond:
                while not (self.stopped or self.aborts or self.pending or self.fault or engine.has_work()
                           or self.swap):
                    self.cond.wait()
                if self.fault is not None:
                    raise self.fault
                if self.stopped:
                    return
                aborts, pending, swap = list(self.aborts), list(self.pending), self.swap
                self.aborts.clear()
                self.pending.clear()
            for req in pending:  # before the aborts: an abort may be for one of these
                if not req.done:
                    engine.enqueue(req)
            for req in aborts:
                engine.abort(req)
            if swap is not None and swap.between_steps(self):
                continue  # swapped: the held requests go to the engine at the next turn
            if not engine.has_work():
                continue
            try:
                engine.step()
            except Exception as e:  # noqa: BLE001 - the server outlives a failed step
                self.errors += 1
                log.exception("an engine step failed; failing the requests it was running")
                self._fail_running(e)

    def _die(self, error: BaseException) -> None:
        with self.cond:
            self.dead = f"{type(error).__name__}"
        log.critical("the engine thread died (%s); every request now gets 503", type(error).__name__,
                     exc_info=error)
        engine = self.engine
        locked = engine.lock.acquire(timeout=5)  # released by a step that raised
        try:
            with self.cond:
                reqs = list(engine.running) + list(engine.waiting) + list(self.pending)
                self.pending.clear()
        finally:
            if locked:
                engine.lock.release()
        self._fail(reqs, EngineFailure(_unavailable(self.dead).message, 503))
        if self.on_death:
            with contextlib.suppress(Exception):
                self.on_death(error)

    def _fail(self, reqs: list[Request], failure: EngineFailure) -> None:
        for req in reqs:
            with contextlib.suppress(Exception):
                self.engine.abort(req)
            if req.on_event:
                with contextlib.suppress(Exception):
                    req.on_event(failure)

    def _fail_running(self, error: Exception) -> None:
        """Fails the requests the failed step was running and makes the engine usable again."""
        engine = self.engine
        self._fail(list(engine.running), EngineFailure(
            "the engine failed while running this request; the server logged the error"))
        # a jitted step that fails after donating the KV cache leaves it deleted: rebuild it
        # (empty: every request that had pages in it was just aborted)
        if any(a.is_deleted() for a in engine.kv):
            engine.reset_cache()
        if self.on_step_error:
            self.on_step_error(error)


def _unavailable(reason: str) -> APIError:
    return APIError(503, f"the engine is not running ({reason}); the server is shutting down or "
                         f"must be restarted", type="server_error", code="engine_unavailable")


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
        stats = lambda key: lambda: engine.stats[key]  # noqa: E731
        Gauge("lmsys_prefix_cache_hit_tokens", "Prompt tokens taken from the prefix cache (not computed)",
              registry=r).set_function(stats("prefix_cache_hit_tokens"))
        Gauge("lmsys_prefix_cache_hit_rate", "Prefix cache hit tokens / prompt tokens looked up",
              registry=r).set_function(lambda: engine.stats["prefix_cache_hit_tokens"] / max(
                  1, engine.stats["prefix_cache_query_tokens"]))
        Gauge("lmsys_prefix_cache_pages", "KV pages held in the prefix cache (in use or idle)",
              registry=r).set_function(stats("prefix_cache_pages"))
        Gauge("lmsys_spec_acceptance_rate", "Speculative decoding: accepted / drafted tokens",
              registry=r).set_function(lambda: engine.stats["spec_accepted_tokens"] / max(
                  1, engine.stats["spec_draft_tokens"]))
        Gauge("lmsys_spec_tokens_per_step", "Tokens generated per request per decode step",
              registry=r).set_function(lambda: engine.stats["generated_tokens"] / max(
                  1, engine.stats["decode_rows"]))
        self.ttft = Histogram("lmsys_time_to_first_token_seconds", "Arrival to first generated token",
                              registry=r, buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.key_requests = Counter("lmsys_key_requests", "HTTP requests by API key name and status",
                                    ["key", "status"], registry=r)
        self.key_tokens = Counter("lmsys_key_tokens", "Tokens by API key name: prompt or completion",
                                  ["key", "kind"], registry=r)
        self.itl = Histogram("lmsys_inter_token_latency_seconds", "Time between generated tokens",
                             registry=r, buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))


# ---------------------------------------------------------------------------------- the app


def create_app(engine: Engine, model_name: str, tokenizer, api_key: str | None = None,
               chat_template: str | None = None, *, keys: KeyRing | None = None,
               limits: Limits | None = None, public_metrics: bool = False,
               on_engine_death: Callable[[BaseException], None] | None = None) -> FastAPI:
    """The OpenAI-compatible app over `engine`; its lifespan starts and stops the engine thread.
    `api_key` (one key) or `keys` (lmsys.serve.gate.load_api_keys) gate every path but /health
    (/metrics too unless `public_metrics`); `limits` bound what is admitted (api.Limits);
    `on_engine_death` is called if the engine thread dies (requests get 503 from then on).
    `app.state.server` is the Routes (lmsys.serve.routes), `app.state.server.loop` the
    EngineLoop, `app.state.server.metrics.registry` the metrics."""
    limits = limits or Limits()
    if api_key is not None:
        if keys is not None:
            raise ValueError("give api_key or keys, not both")
        keys = KeyRing.single(api_key)
    counters = Metrics(engine)

    def died(error: BaseException) -> None:
        counters.engine_errors.inc()
        if on_engine_death:
            on_engine_death(error)

    loop = EngineLoop(engine, on_step_error=lambda e: counters.engine_errors.inc(),
                      max_queue=limits.max_queue, on_death=died)
    server = Routes(engine, model_name, tokenizer, chat_template, loop, counters, limits=limits, keys=keys)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.loop.start()
        try:
            yield
        finally:
            server.loop.stop()

    app = FastAPI(title="lmsys", description="OpenAI-compatible API over the lmsys engine", lifespan=lifespan)
    app.state.server = server
    app.add_middleware(Gate, keys=keys, metrics=counters, max_body_bytes=limits.max_body_bytes,
                       public_metrics=public_metrics)

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
        return e.error().response()

    @app.exception_handler(Exception)
    async def _any_error(_, e: Exception):
        log.error("internal error answering a request", exc_info=e)
        return APIError(500, "internal server error; the server logged it", type="server_error").response()

    add_routes(app, server)
    add_embedding_routes(app, server)

    @app.get("/health")
    async def health():
        if server.loop.dead or server.loop.thread is None or not server.loop.thread.is_alive():
            raise _unavailable(server.loop.dead or "stopped")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(server.metrics.registry).decode(),
                                 media_type=CONTENT_TYPE_LATEST)

    return app


def serve(engine: Engine, model_name: str, tokenizer, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, chat_template: str | None = None, log_level: str = "info",
          **app_options) -> int:
    """Serves until interrupted (Ctrl-C); the exit status of `run_app`. `app_options`:
    create_app's keys, limits, public_metrics."""
    app = create_app(engine, model_name, tokenizer, api_key=api_key, chat_template=chat_template, **app_options)
    return run_app(app, host, port, log_level)


def run_app(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
            sockets=None) -> int:
    """Runs `app` (from create_app) with uvicorn until interrupted: 0. If the engine thread
    dies, the app answers 503, the responses in flight finish and the server stops: 1, for a
    supervisor (systemd, Kubernetes) to restart it."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=5))
    loop = app.state.server.loop
    on_death = loop.on_death

    def died(error: BaseException) -> None:
        if on_death:
            on_death(error)
        server.should_exit = True

    loop.on_death = died
    server.run(sockets=sockets)
    if loop.dead:
        log.critical("the engine thread died (%s): exiting with status 1", loop.dead)
        return 1
    return 0


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


__all__ = ["BackgroundServer", "EngineLoop", "create_app", "run_app", "serve"]
