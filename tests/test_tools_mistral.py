"""Mistral's tool-call format (lmsys.serve.tools) through the `openai` client against a tiny
random-weight model whose tokenizer has Mistral's control tokens as special tokens, with
Mistral-7B-Instruct-v0.3's chat template: a conversation with tools, an assistant tool call and
a `tool` result renders exactly as transformers' apply_chat_template renders it (OpenAI-style
call ids mapped to the 9 letters and digits the template requires); tool_choice "required" and a
named function give calls that start with the `[TOOL_CALLS]` token and validate, streamed and
not; the parser and the streaming holder recognise the call by the token id when it is a
special token and by its text otherwise; the text-marker grammar accepts Mistral's format."""

import json
import re

import pytest
from test_tools import ASK, CALL, CONVERSATION, SCHEMAS, TOOLS, check_calls, serve, streamed_calls

from lmsys.serve import tools
from lmsys.serve.api import ChatBody

pytest.importorskip("llguidance")
transformers = pytest.importorskip("transformers")

MISTRAL_ID = "[A-Za-z0-9]{9}"
SPECIALS = ("<s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
            "[/TOOL_RESULTS]", "[TOOL_CALLS]")
# mistralai/Mistral-7B-Instruct-v0.3's chat template (tokenizer_config.json), verbatim
MISTRAL_V03_TEMPLATE = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    *served, background = serve(tmp_path_factory.mktemp("mistral"), MISTRAL_V03_TEMPLATE, SPECIALS)
    yield served
    background.stop()


def test_mistral_conversation_renders_as_transformers(served):
    app, client, tok = served
    server = app.state.server
    assert server.tool_style == tools.Format("mistral", tok.token_to_id("[TOOL_CALLS]"))
    call, messages = CALL, CONVERSATION
    body = ChatBody.model_validate({"messages": messages, "tools": TOOLS, "max_tokens": 4})
    items, ids = server._chat_items(body)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=MISTRAL_V03_TEMPLATE,
                                                  bos_token="<s>", eos_token="<|endoftext|>")

    def hf(call_id):
        hf_messages = [*messages[:2], {"role": "assistant", "content": "", "tool_calls": [
            {**call, "id": call_id, "function": {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}}]},
            {**messages[3], "tool_call_id": call_id}]
        return hf_tok.apply_chat_template(hf_messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)

    with pytest.raises(Exception, match="length 9"):  # OpenAI-style ids as they are: the template refuses them
        hf("call_1")
    mapped = tools.mistral_id("call_1")
    assert re.fullmatch(MISTRAL_ID, mapped) and tools.mistral_id("abcDEF123") == "abcDEF123"
    expected = hf(mapped)
    assert items[0][1] == expected
    assert f'[TOOL_CALLS] [{{"name": "get_weather", "arguments": {{"city": "Oslo", "unit": "celsius"}}, "id": "{mapped}"}}]' in expected
    assert f'[TOOL_RESULTS] {{"content": {{"temp": 3}}, "call_id": "{mapped}"}}[/TOOL_RESULTS]' in expected
    # the control tokens are one token each, as transformers tokenizes the prompt
    assert ids == hf_tok(expected, add_special_tokens=False)["input_ids"]
    assert {tok.token_to_id(s) for s in ("[AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]")} <= set(ids)
    r = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, max_tokens=4, seed=0)
    assert r.choices[0].message.role == "assistant"  # a tool result accepted back (auto: free output)


def test_mistral_required_and_named_give_valid_calls(served):
    _, client, tok = served
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", n=2,
                                       temperature=1.0, seed=0, max_tokens=200, logprobs=True)
    for choice in r.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert choice.logprobs.content[0].token == "[TOOL_CALLS]"  # the special token itself
        check_calls(choice.message.tool_calls, SCHEMAS, MISTRAL_ID)
    named = client.chat.completions.create(
        model="tiny", messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}},
        parallel_tool_calls=False, n=2, temperature=1.0, seed=1, max_tokens=200)
    for choice in named.choices:
        assert len(choice.message.tool_calls) == 1
        check_calls(choice.message.tool_calls, {"get_time"}, MISTRAL_ID)

    stream = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", n=2,
                                            temperature=1.0, seed=2, max_tokens=200, stream=True)
    calls, finish, content = streamed_calls(stream)
    assert finish == {0: "tool_calls", 1: "tool_calls"} and content == ""
    for deltas in calls.values():
        check_calls(deltas, SCHEMAS, MISTRAL_ID)


def test_mistral_parser_token_or_text(served):
    _, _, tok = served
    special = tools.Format("mistral", tok.token_to_id("[TOOL_CALLS]"))
    text_marker = tools.Format("mistral")
    out = 'Sure.[TOOL_CALLS] [{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]'
    ids = tok.encode(out, add_special_tokens=False).ids
    no_call = tok.encode("[TOOL_", add_special_tokens=False).ids  # the marker's text from ordinary tokens
    for fmt, token_ids in [(special, ids), (text_marker, None)]:
        content, calls = tools.parse(out, fmt, token_ids)
        assert content == "Sure." and [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                                       for c in calls] == [("a", {"x": 1}), ("b", {})]
        assert all(re.fullmatch(MISTRAL_ID, c["id"]) for c in calls)
    assert tools.parse(out, special, no_call) == (out, [])  # the marker's text without its token: content
    assert tools.parse("[TOOL_CALLS] [{oops", text_marker) == ("[TOOL_CALLS] [{oops", [])
    for fmt, pieces in [(special, [(tok.decode([t], skip_special_tokens=False), [t]) for t in ids]),
                        (text_marker, [(ch, []) for ch in out])]:
        ts = tools.ToolStream(fmt)
        sent = "".join(ts.feed(text, token_ids) for text, token_ids in pieces)
        rest, deltas = ts.finish()
        assert sent + rest == "Sure." and [d["index"] for d in deltas] == [0, 1]
    ts = tools.ToolStream(special)  # no call token: "[" goes out at once, nothing held
    assert ts.feed("a [TOOL", no_call) == "a [TOOL"


def test_mistral_text_marker_grammar_accepts_the_format(served):
    """Where [TOOL_CALLS] is not a special token the forced call starts with its text."""
    app, _, tok = served
    engine = app.state.server.engine
    body = ChatBody.model_validate({"messages": ASK, "tools": TOOLS, "tool_choice": "required"})
    grammar = tools.tool_grammar(body, tools.chosen_tools(body), tools.Format("mistral"))
    good = ('[TOOL_CALLS] [{"name":"get_time","arguments":{"zone":3}}, '
            '{"name":"get_weather","arguments":{"city":"Oslo","unit":"celsius"}}]')
    matcher = engine.grammar_state(grammar)  # the text spelled with ordinary tokens, not the special one
    assert all(matcher.consume_token(t) for ch in good for t in tok.encode(ch, add_special_tokens=False).ids)
    assert matcher.is_accepting()
    bad = engine.grammar_state(grammar)
    assert not all(bad.consume_token(t) for ch in '[TOOL_CALLS] [{"name":"nope"'
                   for t in tok.encode(ch, add_special_tokens=False).ids)
