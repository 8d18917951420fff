"""The server's front door, an ASGI middleware (outermost): API keys, per-key rate limits, the
body-size limit, and counting every HTTP request.

    keys = load_api_keys("keys.txt")      # or KeyRing.single("secret") for `--api-key`
    app.add_middleware(Gate, keys=keys, metrics=metrics, max_body_bytes=4 * 2**20)

## The keys file (`lmsys serve --api-keys FILE`)

One key per line: a name, the key, and optional limits (per minute); `#` starts a comment:

    alice   sk-alice-4f9c2a   rpm=60  tpm=20000
    ci      sk-ci-77d1e0                       # no limits

Names and keys must be unique; an empty key, an unknown option or a malformed line fails at
start-up naming the line. A presented key is checked against every key in constant time
(SHA-256 digests compared with `hmac.compare_digest`, no early exit), so timing tells nothing
about which key, or which prefix, is right.

## What the gate checks, in order

1. With keys, every path but /health needs `Authorization: Bearer KEY` (401 otherwise);
   /metrics is open with `public_metrics`. /docs, /redoc and /openapi.json are behind the key.
2. On POST /v1/completions and /v1/chat/completions, the key's limits: `rpm` requests and
   `tpm` tokens (prompt + generated) over the last 60 s; over either, 429 with Retry-After
   (a request is admitted while the usage is under the limit, so one may overshoot `tpm`).
3. The body: a Content-Length above `max_body_bytes`, or more bytes than that, is a 413. The
   body is read here (at most the limit) and replayed to the app.

The key's name is put in `scope["state"]["api_key"]` (`request.state.api_key` in a route) so
that the routes count its tokens (`KeyRing.record_tokens`); /metrics shows per-key usage
(`lmsys_key_requests_total{key,status}`, `lmsys_key_tokens_total{key,kind}`), by name only.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from lmsys.serve.api import APIError

RATE_WINDOW_S = 60.0
LIMITED_PATHS = ("/v1/completions", "/v1/chat/completions")
SERVED_PATHS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")


class KeyFileError(ValueError):
    """A keys file (or key) that cannot be used; the message names the line."""


@dataclass
class ApiKey:
    name: str
    digest: bytes  # SHA-256 of the key; the key itself is not kept
    rpm: int = 0  # requests per minute (0 = no limit)
    tpm: int = 0  # tokens per minute (0 = no limit)
    requests: deque = field(default_factory=deque)  # admission times in the window
    tokens: deque = field(default_factory=deque)  # (time, tokens) in the window
    token_sum: int = 0


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class KeyRing:
    """The server's API keys and their usage windows (thread-safe)."""

    def __init__(self, keys: list[ApiKey]):
        if not keys:
            raise KeyFileError("no API keys given")
        self.keys = keys
        self.lock = threading.Lock()

    @classmethod
    def single(cls, key: str, name: str = "default") -> KeyRing:
        """One key without limits (`--api-key` / $LMSYS_API_KEY); an empty key is refused."""
        if not key or not key.strip():
            raise KeyFileError("the API key is empty (--api-key or $LMSYS_API_KEY): an empty key would "
                            "let 'Bearer ' through; set a key or unset the variable to serve without one")
        return cls([ApiKey(name, _digest(key.strip()))])

    def authenticate(self, token: str) -> ApiKey | None:
        """The key matching `token`, comparing against every key in constant time."""
        presented, found = _digest(token), None
        for key in self.keys:
            if hmac.compare_digest(presented, key.digest):
                found = key
        return found

    def admit(self, key: ApiKey, now: float | None = None) -> APIError | None:
        """Counts a request against the key's limits; the 429 if it is over one."""
        now = time.monotonic() if now is None else now
        with self.lock:
            self._prune(key, now)
            if key.rpm and len(key.requests) >= key.rpm:
                wait = key.requests[0] + RATE_WINDOW_S - now
                return _rate_error(key, f"{key.rpm} requests per minute", "requests", wait)
            if key.tpm and key.token_sum >= key.tpm:
                wait = key.tokens[0][0] + RATE_WINDOW_S - now
                return _rate_error(key, f"{key.tpm} tokens per minute", "tokens", wait)
            key.requests.append(now)
        return None

    def record_tokens(self, key: ApiKey, n: int) -> None:
        if n <= 0 or not key.tpm:
            return
        now = time.monotonic()
        with self.lock:
            key.tokens.append((now, n))
            key.token_sum += n
            self._prune(key, now)

    @staticmethod
    def _prune(key: ApiKey, now: float) -> None:
        while key.requests and key.requests[0] <= now - RATE_WINDOW_S:
            key.requests.popleft()
        while key.tokens and key.tokens[0][0] <= now - RATE_WINDOW_S:
            key.token_sum -= key.tokens.popleft()[1]


def _rate_error(key: ApiKey, limit: str, kind: str, wait: float) -> APIError:
    seconds = max(1, int(wait + 0.999))
    return APIError(429, f"rate limit of key {key.name!r} reached: {limit}; retry in {seconds} s",
                    type=kind, code="rate_limit_exceeded", headers={"Retry-After": str(seconds)})


def load_api_keys(path: str) -> KeyRing:
    """The keys file's keys (see the module docstring); KeyFileError naming the line if bad."""
    keys, names, digests = [], set(), set()
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            where = f"{path}:{number}"
            if len(words) < 2:
                raise KeyFileError(f"{where}: expected 'NAME KEY [rpm=N] [tpm=N]', got {len(words)} word(s)")
            name, key, options = words[0], words[1], words[2:]
            if "=" in key:
                raise KeyFileError(f"{where}: the key of {name!r} is missing (found {key.split('=')[0]}=...)")
            limits = {}
            for option in options:
                opt, _, value = option.partition("=")
                if opt not in ("rpm", "tpm") or not value.isdigit():
                    raise KeyFileError(f"{where}: unknown option {option!r}; use rpm=N and/or tpm=N (per minute)")
                limits[opt] = int(value)
            if name in names:
                raise KeyFileError(f"{where}: the name {name!r} is used twice")
            if _digest(key) in digests:
                raise KeyFileError(f"{where}: the key of {name!r} is also another name's key")
            names.add(name)
            digests.add(_digest(key))
            keys.append(ApiKey(name, _digest(key), **limits))
    if not keys:
        raise KeyFileError(f"{path}: no keys in the file (one 'NAME KEY [rpm=N] [tpm=N]' per line)")
    return KeyRing(keys)


class Gate:
    """ASGI middleware, outermost: the checks of the module docstring, then the app; counts
    every HTTP request by endpoint and status (and by key)."""

    def __init__(self, app, keys: KeyRing | None, metrics, max_body_bytes: int, public_metrics: bool = False):
        self.app, self.keys, self.metrics = app, keys, metrics
        self.max_body_bytes, self.public_metrics = max_body_bytes, public_metrics

    def _protected(self, path: str) -> bool:
        if self.keys is None or path == "/health":
            return False
        return not (path == "/metrics" and self.public_metrics)

    def _token(self, scope) -> str:
        header = dict(scope.get("headers") or ()).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        return token.strip() if scheme.lower() == "bearer" else ""

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        path = scope["path"].rstrip("/") or "/"
        key = None
        try:
            error = None
            if self._protected(path):
                key = self.keys.authenticate(self._token(scope))
                if key is None:
                    error = APIError(401, "missing or wrong API key: send the header "
                                          "'Authorization: Bearer <key>'", code="invalid_api_key")
                elif path in LIMITED_PATHS and scope["method"] == "POST":
                    error = self.keys.admit(key)
            if error is None and scope["method"] in ("POST", "PUT", "PATCH"):
                body, error = await self._read_body(scope, receive)
                if error is None:
                    receive = _replay(body, receive)
            if error is not None:
                return await error.response()(scope, receive, send_status)
            scope.setdefault("state", {})["api_key"] = key
            await self.app(scope, receive, send_status)
        finally:
            endpoint = "/v1/models" if path.startswith("/v1/models") else path
            endpoint = endpoint if endpoint in SERVED_PATHS else "other"
            self.metrics.requests.labels(endpoint=endpoint, status=str(status[0])).inc()
            if key is not None:
                self.metrics.key_requests.labels(key=key.name, status=str(status[0])).inc()

    async def _read_body(self, scope, receive) -> tuple[bytes, APIError | None]:
        limit = self.max_body_bytes
        too_big = APIError(413, f"the request body exceeds the server's limit of {limit} bytes",
                           code="request_too_large")
        length = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            return b"", too_big
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", APIError(499, "client disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return b"", too_big
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None


def _replay(body: bytes, receive):
    """A receive that gives the buffered body first, then the client's later messages
    (disconnects)."""
    sent = [False]

    async def replay():
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
