"""A seeded fuzzer of the OpenAI endpoints (tests/test_server_hardening.py): random and
malformed bodies, headers, huge numbers, NaN/Infinity, unicode edge cases, random token-id
lists and clients that leave mid-request, sent 8 at a time. Every answer must be 2xx or 4xx in
OpenAI's error JSON, never a 5xx; afterwards a normal request is answered and every KV page is
back in the pool."""

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

NASTY = [None, 0, -1, 1, 2, 7, 64, 65, 2**31 - 1, 2**31, 2**40, 2**63, 2**64, -2**63 - 1, 10**400,
         0.5, 1.5, 2.0000001, 1e308, -1e308, 5e-324, float("inf"), float("-inf"), float("nan"), -0.0,
         True, False, "", "10", "x", "\ud800", "a\udfffb", "\x00", "\u202e\u0301e\u0301", "🙂" * 50,
         "\U0010ffff", "\uffff", "é" * 1000, [], {}, [1, 2], [-1], [2**32], [[1], [2]], ["a", 1],
         [None], {"a": 1}, {"type": "text"}, [{"type": "text", "text": "hi"}]]
FIELDS = ["prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stop", "seed", "logprobs",
          "echo", "ignore_eos", "model", "stream_options", "best_of", "user", "frequency_penalty", "logit_bias",
          "suffix", "max_completion_tokens", "top_logprobs", "messages", "unknown_field", "tools"]
TEXTS = ["def fib(n):", "", " ", "\n\n", "🙂 emoji", "\u0000nul", "\ud800 lone", "mixed é ñ 中文", "x" * 500,
         "\u202eRTL", "a\u0301\u0301\u0301"]


def _prompt(rng, vocab):
    kind = rng.random()
    if kind < 0.4:
        return rng.choice(TEXTS)
    if kind < 0.7:  # random token ids, some out of range
        return [rng.choice([rng.randrange(vocab), -1, vocab, 2**32, 2**31]) if rng.random() < 0.1
                else rng.randrange(vocab) for _ in range(rng.randrange(0, 40))]
    if kind < 0.85:
        return [rng.choice(TEXTS) for _ in range(rng.randrange(0, 4))]
    return rng.choice(NASTY)


def _messages(rng):
    if rng.random() < 0.2:
        return rng.choice(NASTY)
    out = []
    for _ in range(rng.randrange(0, 4)):
        m = {"role": rng.choice(["user", "system", "assistant", "tool", "developer", "bot", ""]),
             "content": rng.choice(TEXTS + [None, [{"type": "text", "text": "hi"}], [{"type": "image"}]])}
        if rng.random() < 0.2:
            m[rng.choice(["name", "tool_calls", "extra"])] = rng.choice(NASTY)
        if rng.random() < 0.1:
            del m["content"]
        out.append(m)
    return out


def request(rng, vocab, model):
    """One random request: (method, path, headers, body bytes or None)."""
    r = rng.random()
    if r < 0.05:
        return "GET", rng.choice(["/health", "/metrics", "/v1/models", "/v1/models/x", "/nope", "/v1/completions"]), {}, None
    chat = rng.random() < 0.45
    path = "/v1/chat/completions" if chat else "/v1/completions"
    headers = {"Content-Type": "application/json"}
    if rng.random() < 0.05:
        headers["Content-Type"] = rng.choice(["text/plain", "application/x-www-form-urlencoded", ""])
    if rng.random() < 0.05:
        headers["Authorization"] = rng.choice(["Bearer", "Basic abc", "Bearer \t x", "bearer x" * 100])
    if r < 0.12:  # not JSON at all
        junk = rng.choice([b"", b"{", b"[]", b"null", b"\xff\xfe\x00", b'{"prompt": "x"', b"1e999999",
                           b"[" * 20000 + b"]" * 20000, bytes(rng.randrange(256) for _ in range(64))])
        return "POST", path, headers, junk
    body = ({"messages": [{"role": "user", "content": rng.choice(TEXTS[:4])}]} if chat
            else {"prompt": _prompt(rng, vocab)})
    body.update({"model": model, "max_tokens": rng.randrange(1, 5), "temperature": rng.choice([0, 0.7, 1.0])})
    for _ in range(rng.randrange(0, 4)):
        field = rng.choice(FIELDS)
        if field == "prompt" and not chat:
            body[field] = _prompt(rng, vocab)
        elif field == "messages" and chat:
            body[field] = _messages(rng)
        elif rng.random() < 0.1:
            body.pop(field, None)
        else:
            body[field] = rng.choice(NASTY)
    if isinstance(body.get("max_tokens"), int) and not isinstance(body["max_tokens"], bool) \
            and 8 < body["max_tokens"] < 2**20:
        body["max_tokens"] = 8  # keep the valid ones short: this is about the answers' shape
    text = json.dumps(body, allow_nan=True)
    if rng.random() < 0.03:
        text = text.replace('"', "'", 1)
    return "POST", path, headers, text.encode()


def _check(response: httpx.Response, what) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:300], what)
    if response.status_code >= 400:
        err = response.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], (response.text, what)
    elif what[1].startswith("/v1/") and what[0] == "POST":
        if response.headers["content-type"].startswith("text/event-stream"):
            lines = [x[6:] for x in response.text.splitlines() if x.startswith("data: ")]
            assert lines and lines[-1] == "[DONE]", (response.text[-300:], what)
            for line in lines[:-1]:
                assert "error" not in json.loads(line), (line, what)
        else:
            assert response.json()["choices"], what


def fuzz(server, n: int, seed: int) -> dict[int, int]:
    """Sends `n` random requests (seeded) 8 at a time; returns how many got each status."""
    rng = random.Random(seed)
    engine = server.engine
    vocab = engine.model.vocab_size
    cases = [request(rng, vocab, "tiny") for _ in range(n)]
    leave = [rng.random() < 0.05 for _ in range(n)]  # clients that disconnect mid-request
    statuses = []

    def send(i):
        method, path, headers, body = cases[i]
        timeout = 0.05 if leave[i] else 120
        with httpx.Client(base_url=server.url, timeout=timeout) as client:
            try:
                response = client.request(method, path, headers=headers, content=body)
            except httpx.TimeoutException:
                assert leave[i], cases[i]
                return
            _check(response, (method, path, body[:200] if body else body))
            statuses.append(response.status_code)

    with ThreadPoolExecutor(8) as pool:
        for f in [pool.submit(send, i) for i in range(n)]:
            f.result()
    # the mix is a fuzz, not a wall of 400s: many requests were served, many refused
    assert statuses.count(200) > n // 10 and statuses.count(400) > n // 4, sorted(statuses)
    ok = httpx.post(f"{server.url}/v1/completions", json={"prompt": "def", "max_tokens": 3, "temperature": 0,
                                                         "ignore_eos": True}, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
    deadline = time.time() + 10
    while engine.has_work() or engine.pool.num_used:
        assert time.time() < deadline, "pages in use did not return to 0 after the fuzz"
        time.sleep(0.05)
    return {s: statuses.count(s) for s in sorted(set(statuses))}
