"""`lmsys serve models:/NAME@ALIAS --follow` (lmsys.serve.follow): 20 concurrent streaming
requests while the alias moves twice, each answered wholly by one version (the one it started
on; compared with engines built on each version), requests after a swap answered by the new
version, and broken versions (another shape, a corrupted checkpoint, another tokenizer) refused
with the old one serving, in the metrics and the log, and not retried until the alias moves."""

import dataclasses
import json
import logging
import threading
import time

import httpx
import jax
import numpy as np
import pytest
from jax.sharding import Mesh

pytest.importorskip("mlflow")

from common import tiny_config, write_corpus  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from lmsys.checkpoint import Checkpointer, load_model, make_meta  # noqa: E402
from lmsys.cli import main  # noqa: E402
from lmsys.config import from_dict, save_config  # noqa: E402
from lmsys.data import eos_id, load_tokenizer  # noqa: E402
from lmsys.interop.registry import Registry  # noqa: E402
from lmsys.models import llama  # noqa: E402
from lmsys.serve.engine import Engine, EngineConfig  # noqa: E402
from lmsys.serve.follow import Follower  # noqa: E402
from lmsys.serve.scheduler import GenerationOptions  # noqa: E402
from lmsys.serve.server import BackgroundServer, create_app  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")
logging.getLogger("alembic").setLevel(logging.WARNING)
VOCAB, NAME, MAX_TOKENS = 512, "code", 32
ENGINE = EngineConfig(max_slots=16, page_size=8, max_seq_len=64, prefill_chunk=16, batch_invariant=True)
# 24-28 tokens: their first 16 (a whole batch-invariant prefill chunk) are prefix-cached
PROMPTS = [f"def value{i}(self):\n    return self.value + {i}\n    for" if i % 2 else
           f"import os\nfor x{i} in range(self.value):\n    if" for i in range(20)]
PROBE = "class None"
INTERVAL = 0.1


def _write_run(root, name, model, params, tok):
    """A run directory (config.yaml, tokenizer.json, checkpoint step 0) as `lmsys convert` writes."""
    run = root / name
    run.mkdir()
    tok.save(str(run / "tokenizer.json"))
    save_config(from_dict({"model": dataclasses.asdict(model), "data": {"tokenizer": str(run / "tokenizer.json")},
                           "run_dir": str(run)}), run / "config.yaml")
    ckpt = Checkpointer(run / "checkpoints", keep=1, async_save=False)
    try:
        ckpt.save(0, {"params": params}, make_meta(0, 0, model, Mesh(np.array(jax.devices()[:1]), ("data",))))
    finally:
        ckpt.close()
    return run


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """Registered versions of `code`: v1-v3 the same tiny architecture with different random
    weights; v4 another d_ff; v5 a checkpoint corrupted after registration; v6 another tokenizer.
    Returns (registry uri, {version: params of v1-v3}, model config, tokenizer)."""
    root = tmp_path_factory.mktemp("follow")
    uri = f"sqlite:///{root / 'registry.db'}"
    mp = pytest.MonkeyPatch()
    mp.setenv("LMSYS_REGISTRY_URI", uri)
    tok = load_tokenizer("builtin", VOCAB, source=write_corpus(root / "corpus"), cache_dir=str(root))
    # a larger init scale than training's: random models whose greedy answers differ by version
    cfg = tiny_config(model={"vocab_size": VOCAB, "init_std": 0.5}).model
    reg = Registry(uri)
    params = {}
    for v in (1, 2, 3):
        params[v] = llama.init(jax.random.key(v), cfg)
        reg.register(_write_run(root, f"v{v}", cfg, params[v], tok), NAME)
    wide = dataclasses.replace(cfg, d_ff=256)
    reg.register(_write_run(root, "v4", wide, llama.init(jax.random.key(4), wide), tok), NAME)
    r5 = reg.register(_write_run(root, "v5", cfg, llama.init(jax.random.key(5), cfg), tok), NAME)
    victim = max((p for p in r5.path.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = victim.read_bytes()
    victim.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    other = load_tokenizer("builtin", VOCAB, source=write_corpus(root / "corpus2", seed=1),
                           cache_dir=str(root / "cache2"))
    assert other.to_str() != tok.to_str()
    reg.register(_write_run(root, "v6", cfg, params[3], other), NAME)
    reg.alias(NAME, "prod", 1)
    yield uri, params, cfg, tok
    mp.undo()


@pytest.fixture(scope="module")
def references(versions):
    """{version: {prompt: greedy text}} from an engine built on each of v1-v3."""
    _, params, cfg, tok = versions
    options = GenerationOptions(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    out = {}
    for v, p in params.items():
        engine = Engine(jax.device_put(p, jax.devices()[0]), cfg, tok, ENGINE, eos_token_id=eos_id(tok))
        reqs = engine.generate(PROMPTS + [PROBE], options)
        out[v] = {prompt: r.text for prompt, r in zip(PROMPTS + [PROBE], reqs)}
    for prompt in PROMPTS + [PROBE]:  # the versions are told apart by their greedy answers
        assert len({out[v][prompt] for v in out}) == 3, prompt
    return out


class Valve:
    """Stops the engine thread before a step once `when()` holds there (so the requests it names
    are in flight, deterministically), until opened."""

    def __init__(self, engine):
        self.when, self.paused, self.resume = None, threading.Event(), threading.Event()
        step = engine.step

        def gated():
            when = self.when
            if when is not None and when():
                self.when = None
                self.paused.set()
                self.resume.wait()
                self.resume.clear()
            step()

        engine.step = gated

    def close_when(self, when):
        self.paused.clear()
        self.when = when

    def wait_closed(self):
        assert self.paused.wait(60), "the engine never reached the valve's condition"

    def open(self):
        self.paused.clear()
        self.resume.set()


class Stream(threading.Thread):
    """One streaming completion: its text, whether an error came, when its first chunk came."""

    def __init__(self, url, prompt):
        super().__init__(daemon=True)
        self.url, self.prompt = url, prompt
        self.text, self.error, self.first, self.finish = "", None, threading.Event(), None
        self.start()

    def run(self):
        body = {"model": NAME, "prompt": self.prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", f"{self.url}/v1/completions", json=body, timeout=120) as r:
                if r.status_code != 200:
                    self.error = f"HTTP {r.status_code}"
                    return
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        self.error = chunk["error"]
                        continue
                    self.text += chunk["choices"][0]["text"]
                    self.finish = chunk["choices"][0]["finish_reason"] or self.finish
                    self.first.set()
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.error = repr(e)
        finally:
            self.first.set()


def _complete(url, prompt) -> str:
    r = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": prompt, "max_tokens": MAX_TOKENS,
                                                  "temperature": 0, "ignore_eos": True}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _card(url) -> dict:
    return httpx.get(f"{url}/v1/models").json()["data"][0]


def _metrics(url) -> dict:
    text = httpx.get(f"{url}/metrics").text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


def _until(what, check, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_follow_swaps_between_requests_and_refuses_broken_versions(versions, references, caplog):
    uri, _, _, _ = versions
    reg = Registry(uri)
    model = load_model(f"models:/{NAME}@prod")
    assert model.ref == f"models:/{NAME}/1"
    engine = Engine(model.params, model.config.model, model.tokenizer, ENGINE, eos_token_id=model.eos_token_id)
    engine.warmup(progress=False)
    valve = Valve(engine)
    app = create_app(engine, NAME, model.tokenizer, chat_template=model.chat_template)
    follower = Follower(app, f"models:/{NAME}@prod", model, interval=INTERVAL, max_wait=30)
    loop = app.state.server.loop
    follow_log = "lmsys.serve.follow"
    caplog.set_level(logging.INFO, logger=follow_log)
    with BackgroundServer(app) as server:
        follower.start()
        url = server.url
        assert _card(url) == {**_card(url), "id": NAME, "lmsys_version": 1, "lmsys_source": f"models:/{NAME}/1",
                              "lmsys_follows": f"models:/{NAME}@prod"}
        assert _complete(url, PROBE) == references[1][PROBE]
        # 20 concurrent streams: 16 take the slots, 4 wait for one; the alias moves while the 16 run
        valve.close_when(lambda: sum(1 for r in engine.running if r.generated) == ENGINE.max_slots)
        streams = [Stream(url, p) for p in PROMPTS]
        valve.wait_closed()
        assert all(len(r.generated) < MAX_TOKENS for r in engine.running)
        ids = {s: tuple(engine.encode(s.prompt)) for s in streams}
        started = {tuple(r.prompt_ids) for r in engine.running}
        version = {s: 1 if ids[s] in started else 2 for s in streams}  # the rest start after the swap
        assert sorted(version.values()) == [1] * 16 + [2] * 4
        later = {ids[s] for s in streams if version[s] == 2}
        # the first move: v2 waits for the 16; a request arriving meanwhile (the prompt of a running
        # one, whose prefix-cached pages hold v1's keys and values) is held with the 4, then runs on v2
        reg.alias(NAME, "prod", 2)
        _until("v2 loaded and handed to the engine", lambda: loop.swap is not None)
        held = [Stream(url, next(s.prompt for s in streams if version[s] == 1))]
        _until("the new request queued", lambda: len(loop.pending) + len(engine.waiting) == 5)
        later.add(tuple(engine.encode(held[0].prompt)))
        valve.close_when(lambda: sum(1 for r in engine.running if tuple(r.prompt_ids) in later and r.generated) == 5)
        valve.open()
        valve.wait_closed()  # the 5 run on v2 (swapped in once the 16 finished)
        assert _card(url)["lmsys_version"] == 2 and len(engine.running) == 5
        assert all(len(r.generated) < MAX_TOKENS for r in engine.running)
        # the second move, while they run: v3 waits for them; a new request is held, then runs on v3
        reg.alias(NAME, "prod", 3)
        _until("v3 loaded and handed to the engine", lambda: loop.swap is not None)
        held.append(Stream(url, next(s.prompt for s in streams if version[s] == 2)))
        _until("the new request queued", lambda: len(loop.pending) == 1)
        valve.open()
        _until("v3 served", lambda: _card(url)["lmsys_version"] == 3)
        assert _card(url)["lmsys_source"] == f"models:/{NAME}/3"
        for s, v in zip(held, (2, 3)):
            s.join(60)
            assert (s.error, s.text) == (None, references[v][s.prompt])
        assert _complete(url, PROBE) == references[3][PROBE]  # after the second swap: v3
        for s in streams:  # every stream finished, on the weights it started with
            s.join(60)
            assert (s.error, s.finish) == (None, "length")
            assert s.text == references[version[s]][s.prompt], (version[s], s.prompt)
        m = _metrics(url)
        assert (m["lmsys_model_swaps_total"], m["lmsys_model_version"]) == (2, 3)
        assert m["lmsys_model_load_failures_total"] == 0 and m["lmsys_model_swap_failed_requests_total"] == 0
        assert m["lmsys_model_swap_wait_seconds"] > 0  # waited for the running streams
        swapped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("now serving")]
        assert [s.split(";")[0] for s in swapped] == [f"now serving {NAME} v2 (was v1)",
                                                        f"now serving {NAME} v3 (was v2)"]
        assert "for 16 running requests" in swapped[0] and "for 5 running requests" in swapped[1]

        # broken versions: each refused with v3 serving, counted and logged once
        for n, (version, reason) in enumerate([(4, "its model.d_ff is 256, the served model's is 128"),
                                               (5, "changed since it was registered"),
                                               (6, "its tokenizer differs from the served one")], 1):
            reg.alias(NAME, "prod", version)
            _until(f"v{version} refused", lambda: _metrics(url)["lmsys_model_load_failures_total"] == n)
            errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and r.name == follow_log]
            assert len(errors) == n and errors[-1].startswith(f"{NAME} v{version} cannot be served (")
            assert reason in errors[-1] and f"still serving {NAME} v3" in errors[-1]
            assert _card(url)["lmsys_version"] == 3 and _complete(url, PROBE) == references[3][PROBE]
        time.sleep(5 * INTERVAL)  # not tried again while the alias stays
        m = _metrics(url)
        assert (m["lmsys_model_load_failures_total"], m["lmsys_model_swaps_total"]) == (3, 2)
        reg.client.delete_registered_model_alias(NAME, "prod")  # the registry cannot answer: still v3
        _until("polls failing", lambda: _metrics(url)["lmsys_model_poll_errors_total"] >= 3)
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == follow_log]
        assert len(warned) == 1  # once, not at every poll
        assert warned[0].startswith(f"following models:/{NAME}@prod: cannot read the registry (model '{NAME}' "
                                    f"has no alias 'prod'") and warned[0].endswith("; still serving v3")
        assert _card(url)["lmsys_version"] == 3 and _complete(url, PROBE) == references[3][PROBE]
        reg.alias(NAME, "prod", 2)  # moved again: a good version is swapped in
        _until("v2 served again", lambda: _card(url)["lmsys_version"] == 2)
        assert _complete(url, PROBE) == references[2][PROBE]
        follower.stop()


def test_follow_needs_a_moving_reference(versions, capsys):
    for ref, err in [(f"models:/{NAME}/1", "names one version, which never moves"),
                     ("runs/tiny", "follows a registered model's alias")]:
        assert main(["serve", ref, "--follow"]) == 2
        assert err in capsys.readouterr().err


def test_a_swap_that_waits_past_max_wait_ends_the_old_requests(versions, references):
    """--follow-max-wait 0: the requests running on the old weights get an error event (503,
    "retry") rather than tokens of two versions; the swap happens at once."""
    uri, _, _, _ = versions
    reg = Registry(uri)
    reg.alias(NAME, "prod", 1)
    model = load_model(f"models:/{NAME}@prod")
    engine = Engine(model.params, model.config.model, model.tokenizer, ENGINE, eos_token_id=model.eos_token_id)
    valve = Valve(engine)
    app = create_app(engine, NAME, model.tokenizer, chat_template=model.chat_template)
    follower = Follower(app, f"models:/{NAME}@prod", model, interval=INTERVAL, max_wait=0)
    with BackgroundServer(app) as server:
        follower.start()
        valve.close_when(lambda: sum(1 for r in engine.running if r.generated) == 4)
        wave = [Stream(server.url, p) for p in PROMPTS[:4]]
        valve.wait_closed()
        reg.alias(NAME, "prod", 3)
        _until("v3 loaded and handed to the engine", lambda: app.state.server.loop.swap is not None)
        valve.open()
        for s in wave:
            s.join(60)
            assert s.error == {"message": f"the served model was updated to {NAME} v3 while this request ran; "
                                          f"retry it", "type": "server_error", "param": None,
                               "code": "engine_unavailable"}
            assert references[1][s.prompt].startswith(s.text)  # its text so far: v1's
        assert _complete(server.url, PROBE) == references[3][PROBE]
        m = _metrics(server.url)
        assert (m["lmsys_model_swaps_total"], m["lmsys_model_swap_failed_requests_total"]) == (1, 4)
        follower.stop()
