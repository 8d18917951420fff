"""Structured output (lmsys.serve.constrained): 100 generated JSON schemas against a tiny
random-weight model with sampling on, all outputs parse and validate; greedy with a schema of one
valid value returns it; constrained and free rows share decode steps and the free rows' tokens
are those of the same requests run alone; over HTTP, response_format and vLLM's guided_* fields,
and a schema the library rejects is a 400 naming the problem."""

import json

import httpx
import jsonschema
import numpy as np
import pytest
from common import tiny_config, tiny_served_model
from openai import BadRequestError, OpenAI

from lmsys.data import eos_id
from lmsys.parallel import Rules, build_mesh
from lmsys.serve.constrained import request_grammar
from lmsys.serve.engine import Engine, EngineConfig
from lmsys.serve.scheduler import GenerationOptions
from lmsys.serve.server import BackgroundServer, create_app

pytest.importorskip("llguidance")
VOCAB = 512
MAX_TOKENS = 160


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    cfg, params, tok = tiny_served_model(tmp_path_factory.mktemp("structured"), VOCAB)
    # batch-invariant: one prefill and one decode shape, so the whole file compiles two programs
    return Engine(params, cfg, tok, EngineConfig(max_slots=32, page_size=16, max_seq_len=192, prefill_chunk=16,
                                                 batch_invariant=True), eos_token_id=eos_id(tok))


def random_schema(rng: np.random.Generator, depth: int = 0, kind: str | None = None) -> dict:
    """A JSON schema with nested objects, arrays, enums, number ranges, required and optional
    fields and string patterns (bounded, so every instance fits in MAX_TOKENS)."""
    kinds = ["integer", "number", "string", "pattern", "enum", "boolean", "null"]
    if depth < 2:
        kinds += ["object", "array"]
    kind = kind or kinds[rng.integers(len(kinds))]
    if kind == "integer":
        lo = int(rng.integers(-1000, 1000))
        return {"type": "integer", "minimum": lo, "maximum": lo + int(rng.integers(0, 5000))}
    if kind == "number":
        lo = float(rng.uniform(-100, 100))
        return {"type": "number", "minimum": round(lo, 2), "maximum": round(lo + rng.uniform(0.5, 50), 2)}
    if kind == "string":
        return {"type": "string", "minLength": int(rng.integers(0, 3)), "maxLength": int(rng.integers(3, 10))}
    if kind == "pattern":
        return {"type": "string", "pattern": ["^[a-z]{2,6}$", "^[0-9]{3}-[0-9]{2}$", "^(yes|no|maybe)$",
                                              "^[A-Z][a-z]{0,4}_[0-9]$"][rng.integers(4)]}
    if kind == "enum":
        return {"enum": [["red", "green", "blue"], [1, 2, 3, 5], ["a", 1, None, True]][rng.integers(3)]}
    if kind in ("boolean", "null"):
        return {"type": kind}
    if kind == "array":
        lo = int(rng.integers(0, 2))
        return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": lo,
                "maxItems": lo + int(rng.integers(1, 3))}
    names = [f"k{i}" for i in range(int(rng.integers(1, 4)))]
    required = [n for n in names if rng.random() < 0.6]
    return {"type": "object", "properties": {n: random_schema(rng, depth + 1) for n in names},
            "required": required, "additionalProperties": False}


def run(engine, items):
    reqs = [engine.add_request(engine.encode(prompt), options) for prompt, options in items]
    while engine.has_work():
        engine.step()
    return reqs


def test_generated_schemas_validate_and_free_rows_are_untouched(engine):
    rng = np.random.default_rng(0)
    schemas = [random_schema(rng, kind="object") for _ in range(100)]
    free = [("def fib(", GenerationOptions(max_tokens=24, temperature=1.0, seed=100 + i, ignore_eos=True))
            for i in range(8)]
    alone = [r.generated for r in run(engine, free)]
    constrained = [(f"item {i}:", GenerationOptions(max_tokens=MAX_TOKENS, temperature=1.0, seed=i,
                                                    grammar=request_grammar("json_schema", s)))
                   for i, s in enumerate(schemas)]
    steps = engine.stats["decode_steps"]
    reqs = run(engine, free[:4] + constrained + free[4:])  # free rows share steps with constrained ones
    assert engine.stats["max_decode_batch"] == 32 and engine.stats["decode_steps"] > steps
    assert [r.generated for r in reqs[:4] + reqs[-4:]] == alone
    for schema, r in zip(schemas, reqs[4:-4]):
        assert r.finish_reason == "stop", (schema, r.text)
        jsonschema.validate(json.loads(r.text), schema)
    assert len({r.text for r in reqs[4:-4]}) > 75  # sampled: different values, not one template
    assert np.mean([len(r.generated) for r in reqs[4:-4]]) > 10


@pytest.mark.parametrize("schema, value", [
    ({"type": "object", "properties": {"answer": {"const": "forty-two"}, "ok": {"enum": [True]}},
      "required": ["answer", "ok"], "additionalProperties": False}, {"answer": "forty-two", "ok": True}),
    ({"type": "array", "items": {"enum": [7]}, "minItems": 3, "maxItems": 3}, [7, 7, 7]),
])
def test_greedy_single_valid_value_comes_back_exactly(engine, schema, value):
    (r,) = run(engine, [("x", GenerationOptions(max_tokens=64, grammar=request_grammar("json_schema", schema)))])
    assert (r.text, r.finish_reason) == (json.dumps(value, separators=(",", ":")), "stop")


@pytest.fixture(scope="module")
def server(engine):
    background = BackgroundServer(create_app(engine, "tiny", engine.tokenizer))
    yield background.url, OpenAI(base_url=f"{background.url}/v1", api_key="none", max_retries=0, timeout=60)
    background.stop()


def test_http_response_format_and_guided_fields(server):
    url, client = server
    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                               "temp": {"type": "integer", "minimum": -30, "maximum": 40}},
              "required": ["city", "temp"], "additionalProperties": False}
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "weather?"}], n=4, max_tokens=MAX_TOKENS, seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": schema}})
    for choice in chat.choices:
        jsonschema.validate(json.loads(choice.message.content), schema)
    obj = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "json"}],
                                         max_tokens=MAX_TOKENS, seed=2, response_format={"type": "json_object"})
    assert obj.choices[0].finish_reason == "length" or isinstance(json.loads(obj.choices[0].message.content), dict)
    choice = client.completions.create(model="tiny", prompt=["a", "b"], n=3, max_tokens=16, seed=3,
                                       extra_body={"guided_choice": ["yes", "no", "it depends"]})
    assert {c.text for c in choice.choices} <= {"yes", "no", "it depends"} and len(choice.choices) == 6
    regex = client.completions.create(model="tiny", prompt="id", max_tokens=16, seed=4,
                                      extra_body={"guided_regex": "[0-9]{3}-[a-c]{2}"})
    assert regex.choices[0].text[:3].isdigit() and regex.choices[0].text[3] == "-" and len(regex.choices[0].text) == 6
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="x", max_tokens=MAX_TOKENS, seed=5, stream=True, extra_body={"guided_json": schema}))
    jsonschema.validate(json.loads(streamed), schema)


def test_http_rejected_constraints_are_400s_naming_the_problem(server):
    url, client = server
    with pytest.raises(BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], response_format={
            "type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "strin"}}})
    assert e.value.body["param"] == "response_format" and "strin" in e.value.body["message"]
    cases = [({"guided_regex": "([a-z"}, "guided_regex", "regex"),
             ({"guided_json": "{not json"}, "guided_json", "guided_json"),
             ({"guided_choice": []}, "guided_choice", "guided_choice"),
             ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "one output constraint"),
             ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema object")]
    for extra, param, words in cases:
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 4, **extra}, timeout=60)
        assert r.status_code == 400, (extra, r.text)
        err = r.json()["error"]
        assert err["param"] == param and words in err["message"], (extra, err)


def test_constrained_and_free_rows_share_steps_on_a_data_parallel_mesh(engine):
    """kv_pages over a data axis (data 2 x tensor 4): each shard's decode rows hold constrained
    and free requests in the same step; greedy rows equal the single-device engine's tokens,
    sampled constrained rows validate."""
    rules = Rules(build_mesh(tiny_config({"data": 2, "fsdp": 1, "tensor": 4}).mesh))
    mesh = Engine(engine.params, engine.model, engine.tokenizer,
                  EngineConfig(max_slots=8, page_size=16, max_seq_len=192, prefill_chunk=16, batch_invariant=True),
                  rules=rules, eos_token_id=engine.eos_token_id)
    assert mesh.num_shards == 2
    rng = np.random.default_rng(1)
    schemas = [random_schema(rng, kind="object") for _ in range(6)]

    def constrained(i, temperature):
        return (f"row {i}:", GenerationOptions(max_tokens=MAX_TOKENS, temperature=temperature, seed=i,
                                               grammar=request_grammar("json_schema", schemas[i])))

    free = [("def fib(", GenerationOptions(max_tokens=24, seed=50 + i, temperature=t, ignore_eos=True))
            for i, t in enumerate([0.0, 1.0])]
    items = [constrained(0, 0.0), constrained(1, 0.0), *free, constrained(2, 0.0), constrained(3, 0.0),
             constrained(4, 1.0), constrained(5, 1.0)]
    reqs = [mesh.add_request(mesh.encode(prompt), options) for prompt, options in items]
    mixed = set()  # shards whose decode rows held constrained and free requests in one step
    while mesh.has_work():
        mesh.step()
        for g in range(2):
            rows = [r for r in mesh.running if r.shard == g and r.generated]
            if any(r.matcher is not None for r in rows) and any(r.matcher is None for r in rows):
                mixed.add(g)
    assert mixed == {0, 1}
    single = run(engine, items)
    for i, (r, ref) in enumerate(zip(reqs, single)):
        if items[i][1].temperature == 0:
            assert r.generated == ref.generated, i
    for r, schema in zip(reqs[:2] + reqs[4:], schemas):
        assert r.finish_reason == "stop", r.text
        jsonschema.validate(json.loads(r.text), schema)
