"""The OpenAI-compatible server, driven by the real `openai` client and raw HTTP: completions and
chat (plain and streamed), n, logprobs, echo, usage, errors, disconnects, metrics, batch
invariance under 32 concurrent clients. A tiny random model served in-process by uvicorn."""

import json
import threading
import time

import httpx
import jax
import pytest
from common import tiny_config, write_corpus
from openai import (
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    NotFoundError,
    OpenAI,
)
from prometheus_client.parser import text_string_to_metric_families

from lmsys.data import eos_id, load_tokenizer
from lmsys.data.chat_template import DEFAULT_CHAT_TEMPLATE, ChatTemplate, load_chat_template
from lmsys.models import llama
from lmsys.serve.engine import Engine, EngineConfig
from lmsys.serve.server import BackgroundServer, create_app

VOCAB = 512
KEY = "sk-test"
MODEL = "tiny"


class _Served:
    def __init__(self, engine, api_key=None):
        self.engine = engine
        self.app = create_app(engine, MODEL, engine.tokenizer, api_key=api_key)
        self.background = BackgroundServer(self.app)
        self.port, self.url = self.background.port, self.background.url
        self.client = OpenAI(base_url=f"{self.url}/v1", api_key=api_key or "none", max_retries=0, timeout=60)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def close(self):
        self.background.stop()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    tok = load_tokenizer("builtin", VOCAB, source=write_corpus(root / "corpus"), cache_dir=str(root))
    cfg = tiny_config(model={"vocab_size": VOCAB}).model
    params = jax.device_put(llama.init(jax.random.key(0), cfg), jax.devices()[0])
    return cfg, params, tok


@pytest.fixture(scope="module")
def served(model):
    cfg, params, tok = model
    engine = Engine(params, cfg, tok, EngineConfig(max_slots=4, page_size=16, max_seq_len=64, prefill_chunk=16),
                    eos_token_id=eos_id(tok))
    engine.warmup(progress=False)
    s = _Served(engine, api_key=KEY)
    yield s
    s.close()


@pytest.fixture(scope="module")
def invariant(model):
    cfg, params, tok = model
    engine = Engine(params, cfg, tok, EngineConfig(max_slots=32, page_size=8, max_seq_len=64, prefill_chunk=16,
                                                   batch_invariant=True), eos_token_id=eos_id(tok))
    engine.warmup(progress=False)
    s = _Served(engine)
    yield s
    s.close()


GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


def test_models_health_and_usage(served):
    assert [m.id for m in served.client.models.list().data] == [MODEL]
    assert httpx.get(f"{served.url}/health").status_code == 200
    prompt = "def value(self):\n    return"
    r = served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=7, **GREEDY)
    n_prompt = len(served.engine.encode(prompt))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, 7, n_prompt + 7)
    assert r.choices[0].finish_reason == "length" and r.object == "text_completion"


def test_completion_stream_equals_plain(served):
    prompt = "import os\nfor value in"
    plain = served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, **GREEDY)
    chunks = list(served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, stream=True,
                                                   stream_options={"include_usage": True}, **GREEDY))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == plain.choices[0].text and text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage == plain.usage
    # token ids as the prompt give the same answer; a batch of prompts gives one choice each
    ids = served.engine.encode(prompt)
    batch = served.client.completions.create(model=MODEL, prompt=[ids, prompt], max_tokens=12, **GREEDY)
    assert [c.text for c in batch.choices] == [plain.choices[0].text] * 2
    assert [c.index for c in batch.choices] == [0, 1]


def test_chat_stream_equals_plain(served):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "def fib(n):"}]
    plain = served.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, **GREEDY)
    assert plain.choices[0].message.role == "assistant" and plain.object == "chat.completion"
    rendered = served.app.state.server.chat.render(messages)
    assert rendered == "<|system|>\nbe brief\n<|user|>\ndef fib(n):\n<|assistant|>\n"
    assert plain.usage.prompt_tokens == len(served.engine.encode(rendered))
    assert plain.usage.completion_tokens == 10
    chunks = list(served.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                                        stream=True, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_n_seeds_and_sampling(served):
    kw = {"model": MODEL, "prompt": "class", "max_tokens": 8, "temperature": 1.0, "n": 2, "seed": 5}
    a = served.client.completions.create(**kw)
    b = served.client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    one = served.client.completions.create(**{**kw, "n": 1, "seed": 6})
    assert one.choices[0].text == a.choices[1].text  # choice i samples with seed + i
    chat = served.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=4, n=3, seed=1, temperature=1.0)
    assert sorted(c.index for c in chat.choices) == [0, 1, 2]


def test_logprobs_and_echo(served):
    prompt = "def fib(n):"
    r = served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, logprobs=3, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    for chosen, lp_, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 3 and lp_ <= 0
        assert abs(max(top.values()) - lp_) < 1e-4  # greedy: the chosen token is the top one
    e = served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, logprobs=2, echo=True, **GREEDY)
    n_prompt = len(served.engine.encode(prompt))
    elp = e.choices[0].logprobs
    assert e.choices[0].text == prompt + r.choices[0].text
    assert len(elp.tokens) == n_prompt + 5 and elp.token_logprobs[0] is None and elp.top_logprobs[0] is None
    assert all(x <= 0 for x in elp.token_logprobs[1:])
    assert elp.token_logprobs[n_prompt:] == pytest.approx(lp.token_logprobs, abs=1e-4)
    assert elp.text_offset[0] == 0 and elp.text_offset[n_prompt] == len(prompt)
    assert elp.text_offset == sorted(elp.text_offset)
    # streamed echo: the prompt comes first
    chunks = list(served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, echo=True,
                                                   stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks) == e.choices[0].text
    chat = served.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                 max_tokens=4, logprobs=True, top_logprobs=2, **GREEDY)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    assert "".join(t.token for t in content) == chat.choices[0].message.content


def _error(response, status):
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_bad_requests_get_openai_errors_and_server_lives(served):
    url, h = f"{served.url}/v1/completions", served.headers
    good = {"model": MODEL, "prompt": "def", "max_tokens": 2}
    _error(httpx.post(url, json={**good, "model": "gpt-9"}, headers=h), 404)
    _error(httpx.post(url, content=b'{"model": "tiny", "prompt": ', headers={**h, "Content-Type": "application/json"}),
           400)
    assert _error(httpx.post(url, json={**good, "max_tokens": "ten"}, headers=h), 400)["param"] == "max_tokens"
    _error(httpx.post(url, json={**good, "prompt": 5}, headers=h), 400)
    _error(httpx.post(url, json={k: v for k, v in good.items() if k != "prompt"}, headers=h), 400)
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"n": 0}, {"max_tokens": 0}, {"logprobs": 6}):
        assert _error(httpx.post(url, json={**good, **bad}, headers=h), 400)["param"] == next(iter(bad))
    err = _error(httpx.post(url, json={**good, "prompt": [3] * 70}, headers=h), 400)
    assert "context" in err["message"]
    _error(httpx.post(url, json={**good, "prompt": [VOCAB + 5]}, headers=h), 400)
    _error(httpx.post(url, json=good), 401)
    _error(httpx.post(url, json=good, headers={"Authorization": "Bearer nope"}), 401)
    _error(httpx.get(f"{served.url}/v1/models"), 401)
    chat = f"{served.url}/v1/chat/completions"
    _error(httpx.post(chat, json={"model": MODEL, "messages": []}, headers=h), 400)
    _error(httpx.post(chat, json={"model": MODEL, "messages": [{"content": "x"}]}, headers=h), 400)
    _error(httpx.post(chat, json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                  "top_logprobs": 9, "logprobs": True}, headers=h), 400)
    _error(httpx.get(f"{served.url}/v1/nothing", headers=h), 404)
    # the real client maps them to its exceptions
    with pytest.raises(NotFoundError):
        served.client.completions.create(model="nope", prompt="x", max_tokens=1)
    with pytest.raises(BadRequestError):
        served.client.completions.create(model=MODEL, prompt="x", max_tokens=1, temperature=-2)
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{served.url}/v1", api_key="wrong", max_retries=0).models.list()
    r = httpx.post(url, json=good, headers=h)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert served.engine.pool.num_used == 0


def test_failed_engine_step_fails_its_request_only(served):
    engine = served.engine
    real = engine._decode_batch
    calls = []

    def broken(batch):
        if not calls:
            calls.append(1)
            raise RuntimeError("injected failure")
        return real(batch)

    engine._decode_batch = broken
    try:
        with pytest.raises(APIStatusError) as e:
            served.client.completions.create(model=MODEL, prompt="def", max_tokens=3, **GREEDY)
        # OpenAI's error JSON without internal exception text (that goes to the server's log)
        assert e.value.status_code == 500 and e.value.body["code"] == "engine_error"
        assert "injected" not in e.value.message and "RuntimeError" not in e.value.message
    finally:
        del engine._decode_batch
    r = served.client.completions.create(model=MODEL, prompt="def", max_tokens=3, **GREEDY)
    assert r.usage.completion_tokens == 3 and engine.pool.num_used == 0


def _gauge(url, headers, name):
    text = httpx.get(f"{url}/metrics", headers=headers).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise KeyError(name)


def test_disconnect_mid_stream_frees_pages(served):
    body = {"model": MODEL, "prompt": "def fib(n):", "max_tokens": 48, "stream": True, "temperature": 0,
            "ignore_eos": True}
    engine = served.engine
    real_step, finished = engine.step, engine.stats["finished"]

    def slow_step():  # ~50 ms a token: the request cannot finish before the client leaves
        time.sleep(0.05)
        real_step()

    engine.step = slow_step
    try:
        _read_one_chunk_and_leave(served, body)
        deadline = time.time() + 5
        while _gauge(served.url, served.headers, "lmsys_kv_pages_used") != 0:
            assert time.time() < deadline, "pages not returned within 5 s of the disconnect"
            time.sleep(0.05)
    finally:
        del engine.step
    assert engine.pool.num_used == 0 and not engine.has_work()
    assert engine.stats["finished"] == finished  # aborted, not run to the end
    # a non-streaming request whose client times out is aborted too
    engine.step = slow_step
    try:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{served.url}/v1/completions", json={**body, "stream": False}, headers=served.headers,
                       timeout=0.5)
        deadline = time.time() + 5
        while engine.has_work():
            assert time.time() < deadline, "request not aborted within 5 s of the disconnect"
            time.sleep(0.05)
    finally:
        del engine.step
    assert engine.pool.num_used == 0 and engine.stats["finished"] == finished


def _read_one_chunk_and_leave(served, body):
    with httpx.Client(timeout=30) as client, \
            client.stream("POST", f"{served.url}/v1/completions", json=body, headers=served.headers) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                json.loads(line[6:])
                break
        assert served.engine.pool.num_used > 0


def test_metrics_and_health(served):
    served.client.completions.create(model=MODEL, prompt="import", max_tokens=3, **GREEDY)
    shared = "def f(value):\n    return value\n" * 3  # > 16 tokens: its first page is cached
    assert len(served.engine.encode(shared)) > 17
    hits = served.engine.stats["prefix_cache_hit_tokens"]
    for _ in range(2):
        served.client.completions.create(model=MODEL, prompt=shared, max_tokens=2, **GREEDY)
    _error(httpx.get(f"{served.url}/metrics"), 401)  # behind the key (no --public-metrics)
    for docs in ("/docs", "/openapi.json"):
        _error(httpx.get(f"{served.url}{docs}"), 401)
        assert httpx.get(f"{served.url}{docs}", headers=served.headers).status_code == 200
    text = httpx.get(f"{served.url}/metrics", headers=served.headers).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("lmsys_requests", "lmsys_prompt_tokens", "lmsys_generated_tokens", "lmsys_requests_waiting",
                 "lmsys_requests_running", "lmsys_time_to_first_token_seconds",
                 "lmsys_inter_token_latency_seconds", "lmsys_kv_pages_used", "lmsys_kv_pages_total",
                 "lmsys_prefix_cache_hit_tokens", "lmsys_prefix_cache_hit_rate", "lmsys_prefix_cache_pages",
                 "lmsys_spec_acceptance_rate", "lmsys_spec_tokens_per_step"):
        assert name in families, name
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("lmsys_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))] >= 1
    assert samples[("lmsys_kv_pages_total", ())] == served.engine.num_pages
    assert samples[("lmsys_generated_tokens_total", ())] >= 3
    assert samples[("lmsys_time_to_first_token_seconds_count", ())] >= 1
    assert samples[("lmsys_prefix_cache_hit_tokens", ())] >= hits + 16  # the second `shared`
    assert 0 < samples[("lmsys_prefix_cache_hit_rate", ())] < 1
    assert samples[("lmsys_prefix_cache_pages", ())] >= 1
    assert httpx.get(f"{served.url}/health").json() == {"status": "ok"}


def test_32_concurrent_streams_are_batch_invariant(invariant):
    prompts = [f"def f{i}(value):\n    " + "return " * (i % 5) for i in range(32)]

    def stream(prompt):
        chunks = invariant.client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, stream=True,
                                                     **GREEDY)
        return "".join(c.choices[0].text for c in chunks)

    alone = [stream(p) for p in prompts]
    together = [None] * len(prompts)
    start = threading.Barrier(len(prompts))

    def worker(i):
        start.wait()
        together[i] = stream(prompts[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert together == alone
    assert invariant.engine.stats["max_decode_batch"] >= 16  # they really ran together
    assert invariant.engine.pool.num_used == 0


def test_chat_template_like_hugging_face(tmp_path):
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    template = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    assert load_chat_template(str(tok_dir / "tokenizer.json")) == template
    assert load_chat_template(str(tok_dir)) == template
    assert load_chat_template("builtin") is None
    (tok_dir / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")  # transformers 5's file
    assert load_chat_template(str(tok_dir)) == "{{ messages[0]['content'] }}"
    out = ChatTemplate(template, "<s>", "</s>").render([{"role": "user", "content": "hi"}])
    assert out == "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    default = ChatTemplate(DEFAULT_CHAT_TEMPLATE, "", "").render([{"role": "user", "content": "hi"}])
    assert default == "<|user|>\nhi\n<|assistant|>\n"


def test_cli_serve_reports_a_missing_run_dir(tmp_path, capsys):
    from lmsys.cli import main

    assert main(["serve", str(tmp_path / "nope")]) == 2
    assert "not a training run directory" in capsys.readouterr().err
