"""Live model updates: `lmsys serve models:/NAME@ALIAS --follow` serves the version the alias
points to, and moves with it.

    app = create_app(engine, "code", model.tokenizer, ...)
    follower = Follower(app, "models:/code@prod", model, interval=30).start()

A `Follower` thread polls the registry every `interval` seconds for the version the reference
(`models:/NAME@ALIAS`, or `models:/NAME` / `models:/NAME/latest`: the newest) names. When it
moves, the new version is loaded on the follower's thread, next to the served one (the device
holds both sets of weights meanwhile), and verified before anything changes:

- its files hash as registered (lmsys.interop.registry: config, tokenizer, chat template as
  they are read, the weights right after they are read);
- its model config equals the served one in every key the forward uses (the engine's compiled
  shapes and programs are kept: a different architecture needs a new server), its dtype too;
- its tokenizer is the served one (sha256 of the tokenizer's serialization), its chat template
  and end-of-text token too: clients' token ids and rendering must not change under them;
- a forward pass over a probe prompt gives finite logits.

Then it is swapped in between engine steps (`Engine.set_params`: resharded onto the engine's
placement, no recompilation) by a `Swap` the engine thread runs (EngineLoop.swap).

**The swap rule: in-flight requests finish on the weights they started with.** From the moment
a verified version is handed to the engine thread, requests that have not started (no token
computed yet: new arrivals and those still queued for a slot) are held in the server's queue
(they count towards `--max-queue`); the running ones (and any preempted after starting) run to
their end on the old weights; then the weights are swapped, the prefix cache of the old weights
is dropped, and the held requests run on the new ones. The wait is bounded by `max_wait`
seconds (`--follow-max-wait`, default 60): requests of the old version still running then are
ended with a 503 error ("retry": their tokens so far came from the old weights and no token of
one response ever comes from two versions) and the swap happens. A response therefore always
comes from exactly one version; the price is that new requests wait for the longest running
one (at most `max_wait`).

A version that fails to load or verify (or whose swap fails) leaves the old one serving; the
reason is logged and counted (`lmsys_model_load_failures_total`) and it is not tried again
until the alias moves again (to any other version, then back to it counts). A registry that
cannot be reached is logged (once per distinct error) and counted
(`lmsys_model_poll_errors_total`); serving goes on. `/v1/models` shows the served version
(`lmsys_version`, `lmsys_source`: `models:/NAME/VERSION`, `lmsys_follows`: the reference);
`/metrics` adds `lmsys_model_version`, `lmsys_model_swaps_total`, `lmsys_model_swap_wait_seconds`
(the last swap's wait for the running requests) and `lmsys_model_swap_failed_requests_total`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)
DEFAULT_INTERVAL = 30.0  # seconds between registry polls
DEFAULT_MAX_WAIT = 60.0  # seconds a swap waits for the running requests
PROBE = "The quick brown fox"  # the verification forward's prompt
# model.* keys that do not change the served forward (initialization, training-only losses)
TRAINING_ONLY = ("preset", "init_std", "router_aux_loss", "router_z_loss")


class VersionRefused(Exception):
    """A version that cannot replace the served one; the message says why."""


def check_followable(ref: str) -> None:
    """Raises ValueError unless `ref` is a registry reference that can move: an alias, or the
    newest version."""
    from lmsys.interop.registry import is_model_uri, parse_ref

    if not is_model_uri(ref):
        raise ValueError(f"--follow follows a registered model's alias: serve models:/NAME@ALIAS, not {ref}")
    if parse_ref(ref).version is not None:
        raise ValueError(f"--follow: {ref} names one version, which never moves; serve models:/NAME@ALIAS "
                         f"(or models:/NAME/latest)")


def tokenizer_hash(tokenizer) -> str:
    """sha256 of a tokenizer's serialization (what the engine encodes and decodes with)."""
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()


def forward_keys(model) -> dict:
    """The model config's keys that the served forward depends on."""
    return {k: v for k, v in dataclasses.asdict(model).items() if k not in TRAINING_ONLY}


def version_of(ref: str) -> int:
    """The version of a pinned `models:/NAME/VERSION` (what lmsys.checkpoint.load_model sets)."""
    return int(ref.rsplit("/", 1)[1])


# ---------------------------------------------------------------------------------- the engine side


def _started(req) -> bool:
    """Has any of the request's numbers been computed (by the weights now served)?"""
    return bool(req.generated or req.num_computed or req.preemptions or req.prompt_token_logprobs)


class Swap:
    """New weights handed to the engine thread (`EngineLoop.swap`): `between_steps` runs there
    between steps while it is set; the loop holds its new requests meanwhile."""

    def __init__(self, params, label: str, max_wait: float):
        self.params, self.label, self.max_wait = params, label, max_wait
        self.start = time.monotonic()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.waited = 0.0  # seconds the swap waited for the running requests
        self.drained = 0  # running requests it waited for (at the start)
        self.failed = 0  # requests of the old version ended at max_wait
        self._first = True

    def between_steps(self, loop) -> bool:
        """Holds the engine's unstarted requests (back into the loop's queue, in order); once no
        started request is left (or max_wait passed: those left get a 503), swaps the weights.
        True when done (swapped or failed: `error`), then `loop.swap` is None."""
        engine = loop.engine
        with engine.lock:
            waiting = engine.scheduler.waiting
            fresh = [r for r in waiting if not _started(r)]
            for r in fresh:
                waiting.remove(r)
            started = list(engine.running) + list(waiting)
        if fresh:
            with loop.cond:
                loop.pending.extendleft(reversed(fresh))
        if self._first:
            self.drained, self._first = len(started), False
        self.waited = time.monotonic() - self.start
        if started and self.waited < self.max_wait:
            return False
        try:
            if started:
                from lmsys.serve.api import EngineFailure

                self.failed = len(started)
                log.warning("%d requests on the old weights did not finish within %.0f s; ending them "
                            "(503, retry) to serve %s", len(started), self.max_wait, self.label)
                loop._fail(started, EngineFailure(  # the loop's own failure path: abort + error event
                    f"the served model was updated to {self.label} while this request ran; retry it", 503))
            engine.set_params(self.params)  # also forgets the old weights' cached prefix pages
        except Exception as e:  # noqa: BLE001 - the old weights keep serving; the follower logs it
            self.error = e
        finally:
            self.params = None
            with loop.cond:
                loop.swap = None
                loop.cond.notify_all()
            self.done.set()
        return True


# ---------------------------------------------------------------------------------- the follower


class Follower:
    """Follows registry reference `ref` for the app `app` (lmsys.serve.server.create_app) serving
    `model` (lmsys.checkpoint.load_model of `ref`: its `ref` is the version being served)."""

    def __init__(self, app, ref: str, model, *, interval: float = DEFAULT_INTERVAL,
                 max_wait: float = DEFAULT_MAX_WAIT, registry_uri: str | None = None):
        from prometheus_client import Counter, Gauge

        from lmsys.interop.registry import parse_ref

        check_followable(ref)
        if interval <= 0 or max_wait < 0:
            raise ValueError(f"--follow-interval must be > 0 and --follow-max-wait >= 0, got {interval} "
                             f"and {max_wait}")
        self.routes = app.state.server
        self.loop, self.engine = self.routes.loop, self.routes.engine
        self.ref, self.name = ref, parse_ref(ref).name
        self.interval, self.max_wait, self.registry_uri = interval, max_wait, registry_uri
        self.version = version_of(model.ref)  # served
        self.seen = self.version  # where the reference pointed at the last poll
        self.served = {"config": forward_keys(model.config.model), "dtype": model.config.dtype,
                       "tokenizer": tokenizer_hash(model.tokenizer), "chat_template": model.chat_template,
                       "eos": model.eos_token_id}
        self._probe_ids = model.tokenizer.encode(PROBE, add_special_tokens=False).ids or [0]
        self._probe = jax.jit(self._logits_finite)
        self._registry = None
        self._last_error = ""
        self._stop = threading.Event()
        self.thread: threading.Thread | None = None
        r = self.routes.metrics.registry
        self.swaps = Counter("lmsys_model_swaps", "Model versions swapped in (--follow)", registry=r)
        self.failures = Counter("lmsys_model_load_failures",
                                "Model versions that failed to load or verify, or to swap in (--follow)",
                                registry=r)
        self.poll_errors = Counter("lmsys_model_poll_errors", "Registry polls that failed (--follow)", registry=r)
        self.failed_requests = Counter("lmsys_model_swap_failed_requests",
                                       "Requests of the old version ended at --follow-max-wait", registry=r)
        self.swap_wait = Gauge("lmsys_model_swap_wait_seconds",
                               "The last swap's wait for the requests running on the old weights", registry=r)
        Gauge("lmsys_model_version", "The registry version served", registry=r).set_function(lambda: self.version)
        self._describe()

    def _describe(self) -> None:
        self.routes.card_extra = {"lmsys_version": self.version,
                                  "lmsys_source": f"models:/{self.name}/{self.version}",
                                  "lmsys_follows": self.ref}

    # -- the thread

    def start(self) -> Follower:
        log.info("following %s (serving v%d): polling the registry every %g s", self.ref, self.version,
                 self.interval)
        self.thread = threading.Thread(target=self._run, name="lmsys-follow", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self.thread is not None:
            self.thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - the follower outlives anything one poll does
                log.exception("following %s: a poll failed; still serving v%d", self.ref, self.version)

    # -- one poll

    def poll(self) -> None:
        """Asks the registry where the reference points; loads, verifies and swaps in a new
        version (waiting for the swap)."""
        from lmsys.interop.registry import Registry

        try:
            if self._registry is None:
                self._registry = Registry(self.registry_uri)
            target = self._registry.resolve(self.ref)
        except Exception as e:  # noqa: BLE001 - an unreachable registry must not stop serving
            self.poll_errors.inc()
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            if message != self._last_error:
                log.warning("following %s: cannot read the registry (%s); still serving v%d", self.ref,
                            message, self.version)
            self._last_error = message
            return
        self._last_error = ""
        if target.version == self.seen:
            return  # not moved (a version that failed is tried again only when it moves again)
        log.info("%s moved from v%d to v%d", self.ref, self.seen, target.version)
        self.seen = target.version
        if target.version == self.version:
            return
        label = f"{self.name} v{target.version}"
        try:
            params = self.load(target.version)
        except Exception as e:  # noqa: BLE001 - any failure leaves the old version serving
            self.failures.inc()
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            log.error("%s cannot be served (%s); still serving %s v%d (tried again when %s moves again)",
                      label, reason, self.name, self.version, self.ref)
            return
        self._swap(params, target.version, label)

    def load(self, version: int):
        """The params of `version`, placed as the engine's, once its files, config, tokenizer and a
        probe forward check out; VersionRefused (or a registry error) otherwise."""
        from lmsys.checkpoint import open_model

        t0 = time.perf_counter()
        found = open_model(f"models:/{self.name}/{version}", self.registry_uri)  # hashes config.yaml
        want, got = self.served["config"], forward_keys(found.config.model)
        diff = [k for k in want if want[k] != got.get(k)]
        if diff:
            k = diff[0]
            raise VersionRefused(f"its model.{k} is {got.get(k)!r}, the served model's is {want[k]!r}: a "
                                 f"different architecture needs a new server")
        if found.config.dtype != self.served["dtype"]:
            raise VersionRefused(f"its dtype is {found.config.dtype}, the served model's is {self.served['dtype']}")
        tokenizer = found.tokenizer()  # hashed as read
        if tokenizer_hash(tokenizer) != self.served["tokenizer"]:
            raise VersionRefused("its tokenizer differs from the served one (sha256 of its serialization); "
                                 "clients' token ids would change: serve it with a new server")
        if found.chat_template() != self.served["chat_template"]:
            raise VersionRefused("its chat template differs from the served one; serve it with a new server")
        if found.eos_token_id(tokenizer) != self.served["eos"]:
            raise VersionRefused("its end-of-text token differs from the served one")
        params, _ = found.params(self.engine.rules)  # the weights hashed right after the read
        if not bool(self._probe(params, jnp.asarray([self._probe_ids], jnp.int32))):
            raise VersionRefused(f"its logits on the probe prompt {PROBE!r} are not finite")
        log.info("%s v%d loaded and verified (files hash as registered, same architecture and tokenizer, "
                 "finite probe logits) in %.1f s", self.name, version, time.perf_counter() - t0)
        return params

    def _logits_finite(self, params, tokens_BT):
        from lmsys.models import llama

        positions_BT = jnp.arange(tokens_BT.shape[1], dtype=jnp.int32)[None]
        logits, _ = llama.forward(params, tokens_BT, positions_BT, cfg=self.engine.model,
                                  dtype=self.engine.dtype)
        return jnp.isfinite(logits).all()

    def _swap(self, params, version: int, label: str) -> None:
        """Hands `params` to the engine thread and waits until it swapped them in (or failed)."""
        swap = Swap(params, label, self.max_wait)
        del params
        log.info("swapping in %s once the requests running on v%d finish (new requests wait, at most "
                 "%g s)", label, self.version, self.max_wait)
        with self.loop.cond:
            self.loop.swap = swap
            self.loop.cond.notify_all()
        while not swap.done.wait(0.2):
            if self._stop.is_set() or self.loop.dead:
                with self.loop.cond:  # the engine thread is gone or the server stops: never swapped
                    if self.loop.swap is swap:
                        self.loop.swap = None
                return
        if swap.error is not None:
            self.failures.inc()
            log.error("swapping in %s failed (%s); still serving %s v%d", label,
                      str(swap.error).splitlines()[0], self.name, self.version)
            return
        old, self.version = self.version, version
        self._describe()
        self.swaps.inc()
        self.failed_requests.inc(swap.failed)
        self.swap_wait.set(swap.waited)
        log.info("now serving %s (was v%d); waited %.2f s for %d running requests%s", label, old, swap.waited,
                 swap.drained, f", ended {swap.failed} at --follow-max-wait" if swap.failed else "")


def log_to_stderr() -> None:
    """The follower's log lines (INFO and up) on stderr, formatted as uvicorn's (`lmsys serve`)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)-9s lmsys: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def describe(app, model) -> None:
    """Shows a registered model's version on /v1/models (`lmsys serve models:/...` without
    --follow): `model` is lmsys.checkpoint.load_model's."""
    if model.ref.startswith("models:/"):
        app.state.server.card_extra = {"lmsys_version": version_of(model.ref), "lmsys_source": model.ref}
