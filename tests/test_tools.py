"""Tool calling (lmsys.serve.tools) through the `openai` client against a tiny random-weight
model with a Qwen2.5 (Hermes-style) chat template: tool_choice "required" and a named function
give tool_calls whose arguments validate against the function's schema, streamed and not; a
conversation with an assistant tool call and a `tool` result renders exactly as transformers'
apply_chat_template renders it; the Hermes and Llama-3 output parsers and the streaming holder."""

import json
import re

import jsonschema
import pytest
from common import tiny_served_model
from openai import BadRequestError, OpenAI

from lmsys.data import eos_id
from lmsys.serve.api import ChatBody
from lmsys.serve.engine import Engine, EngineConfig
from lmsys.serve.server import BackgroundServer, create_app
from lmsys.serve.tools import Format, ToolStream, parse

pytest.importorskip("llguidance")
transformers = pytest.importorskip("transformers")

# Qwen2.5-Instruct's chat template (tokenizer_config.json), default system prompt shortened
QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}},
        "required": ["zone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "Weather in Oslo, and the time?"}]
# a conversation with an assistant's tool call and its result (OpenAI's JSON-string arguments)
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                         "arguments": '{"city": "Oslo", "unit": "celsius"}'}}
CONVERSATION = [{"role": "system", "content": "Be brief."}, *ASK, {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 3}'}]


def serve(root, template: str, specials: tuple[str, ...] = ()):
    """(app, `openai` client, tokenizer, server) of the tiny model served with `template`."""
    cfg, params, tok = tiny_served_model(root, specials=specials)
    engine = Engine(params, cfg, tok, EngineConfig(max_slots=8, page_size=32, max_seq_len=1280, prefill_chunk=256,
                                                   batch_invariant=True), eos_token_id=eos_id(tok))
    app = create_app(engine, "tiny", tok, chat_template=template)
    background = BackgroundServer(app)
    return app, OpenAI(base_url=f"{background.url}/v1", api_key="none", max_retries=0, timeout=120), tok, background


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    *served, background = serve(tmp_path_factory.mktemp("tools"), QWEN25_TEMPLATE)
    yield served
    background.stop()


def check_calls(calls, names, ids=r"call_[0-9a-f]{24}"):
    """The calls are of `names`, with ids matching `ids` and arguments valid for their schema."""
    assert calls
    for call in calls:
        assert call.type == "function" and re.fullmatch(ids, call.id) and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def streamed_calls(stream) -> tuple[dict, dict, str]:
    """(tool-call deltas by choice, finish_reason by choice, all content) of a streamed response."""
    calls, finish, content = {}, {}, ""
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                calls.setdefault(choice.index, []).append(delta)
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    for deltas in calls.values():
        assert [d.index for d in deltas] == list(range(len(deltas)))
    return calls, finish, content


def test_required_and_named_tool_choice_give_valid_calls(served):
    _, client, _ = served
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", n=2,
                                       temperature=1.0, seed=0, max_tokens=200)
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls"
        check_calls(choice.message.tool_calls, SCHEMAS)
    named = client.chat.completions.create(
        model="tiny", messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}},
        parallel_tool_calls=False, n=2, temperature=1.0, seed=1, max_tokens=200)
    for choice in named.choices:
        assert len(choice.message.tool_calls) == 1
        check_calls(choice.message.tool_calls, {"get_time"})

    stream = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", n=2,
                                            temperature=1.0, seed=2, max_tokens=200, stream=True)
    calls, finish, _ = streamed_calls(stream)
    assert finish == {0: "tool_calls", 1: "tool_calls"}
    for deltas in calls.values():
        check_calls(deltas, SCHEMAS)


def test_tool_conversation_renders_as_transformers(served):
    app, client, tok = served
    call, messages = CALL, CONVERSATION
    body = ChatBody.model_validate({"messages": messages, "tools": TOOLS, "max_tokens": 4})
    items, _ = app.state.server._chat_items(body)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=QWEN25_TEMPLATE)
    hf_messages = [*messages[:2], {"role": "assistant", "content": "", "tool_calls": [
        {**call, "function": {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}}]}, messages[3]]
    expected = hf_tok.apply_chat_template(hf_messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert items[0][1] == expected and "<tool_response>\n{\"temp\": 3}" in expected
    r = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, max_tokens=4, seed=0)
    assert r.choices[0].message.role == "assistant"  # a tool result accepted back (auto: free output)


def test_tool_choice_errors(served):
    _, client, _ = served
    for kwargs, words in [({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                           "must be one of tools"),
                          ({"tool_choice": "required"}, "needs tools"),
                          ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
                           "drop response_format")]:
        with pytest.raises(BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=ASK, max_tokens=4, **kwargs)
        assert words in e.value.body["message"] and e.value.body["param"] == "tool_choice"


def test_parsers_and_streaming_holder():
    two = 'Sure.<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n<tool_call>{"name": "b", "arguments": {}}</tool_call>'
    content, calls = parse(two, Format("hermes"))
    assert content == "Sure." and [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("a", {"x": 1}), ("b", {})]
    assert parse("<tool_call>{not json}</tool_call>", Format("hermes")) == ("<tool_call>{not json}</tool_call>", [])
    content, calls = parse('<|python_tag|>{"name": "f", "parameters": {"q": "x"}}', Format("llama3"))
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"q": "x"}
    assert parse("plain {text}", Format("llama3")) == ("plain {text}", [])
    ts = ToolStream(Format("hermes"))
    sent = "".join(ts.feed(ch) for ch in two)
    rest, deltas = ts.finish()
    assert sent + rest == "Sure." and [d["index"] for d in deltas] == [0, 1]
    ts = ToolStream(Format("hermes"))
    assert "".join(ts.feed(ch) for ch in "a <tool b") + ts.finish()[0] == "a <tool b"
