"""Tool calling on chat completions: `tools`, `tool_choice`, `parallel_tool_calls`, `role: tool`
messages, and the model's tool calls parsed into OpenAI's `tool_calls`.

The tools go to the model's chat template as transformers passes them (`tools=[{"type":
"function", "function": {...}}]`), and an assistant message's `tool_calls` arguments (a JSON
string in OpenAI's API) as objects, as HF templates expect (vLLM does the same). The output
format follows the template: Hermes style (`<tool_call>\\n{"name": ..., "arguments": {...}}\\n
</tool_call>`, Qwen2.5/3, Hermes) when the template mentions `<tool_call>`, else Llama-3 style
(the whole output one JSON object `{"name": ..., "parameters": {...}}`, optionally after
`<|python_tag|>`).

`tool_choice`: "none" renders no tools and parses nothing; "auto" (the default with tools)
parses calls out of free output; "required" and a named function constrain the output with a
grammar (lmsys.serve.constrained) to one call (or, with `parallel_tool_calls`, one or more in
Hermes style) of the allowed functions whose arguments follow each function's JSON schema, so
they always parse and validate.
"""

from __future__ import annotations

import json
import re
import secrets

from lmsys.serve.api import APIError

HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
COMPACT = {"x-guidance": {"whitespace_flexible": False}}


def style(template_source: str) -> str:
    return "hermes" if "<tool_call>" in template_source else "llama3"


def _schema(tool: dict) -> dict:
    return tool["function"].get("parameters") or {"type": "object"}


def chosen_tools(body) -> list[dict] | None:
    """The tools to render (None: none) after checking `tools` and `tool_choice` (400s)."""
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
    choice = body.tool_choice
    if choice is not None and not tools and choice != "none":
        raise APIError(400, "tool_choice needs tools", param="tool_choice")
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if choice.get("type") != "function" or name not in {t["function"]["name"] for t in tools}:
            raise APIError(400, f"tool_choice: a named function must be one of tools, got {json.dumps(choice)[:80]}",
                           param="tool_choice")
    elif choice not in (None, "none", "auto", "required"):
        raise APIError(400, f"tool_choice must be none, auto, required or a function, got {choice!r}",
                       param="tool_choice")
    return tools if tools and choice != "none" else None


def tool_grammar(body, tools: list[dict] | None, fmt: str) -> str | None:
    """The grammar forcing a call for tool_choice "required" or a named function, else None."""
    from lmsys.serve.constrained import request_grammar

    choice = body.tool_choice
    if not tools or choice in (None, "none", "auto"):
        return None
    if isinstance(choice, dict):
        tools = [t for t in tools if t["function"]["name"] == choice["function"]["name"]]
    key = "arguments" if fmt == "hermes" else "parameters"
    calls = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]}, key: _schema(t)},
              "required": ["name", key], "additionalProperties": False} for t in tools]
    call = {**(calls[0] if len(calls) == 1 else {"anyOf": calls}), **COMPACT}
    if fmt == "llama3":
        return request_grammar("json_schema", call)
    repeat = "+" if body.parallel_tool_calls else ""
    lark = f'start: call{repeat}\ncall: "<tool_call>\\n" body "\\n</tool_call>"\nbody: %json {json.dumps(call)}'
    return request_grammar("grammar", lark)


def template_messages(messages: list[dict]) -> list[dict]:
    """Assistant `tool_calls` with their JSON-string arguments as objects (what templates read)."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                c = dict(c)
                fn = dict(c.get("function") or {})
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"])
                    except json.JSONDecodeError:
                        raise APIError(400, f"messages: tool call arguments are not JSON: {fn['arguments'][:80]!r}",
                                       param="messages") from None
                c["function"] = fn
                calls.append(c)
            m = {**m, "tool_calls": calls}
        out.append(m)
    return out


def _call(obj) -> dict | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return {"id": f"call_{secrets.token_hex(12)}", "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


def parse(text: str, fmt: str) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a model's output; content None when only calls were made."""
    if fmt == "hermes":
        calls = []
        for m in HERMES_CALL.finditer(text):
            try:
                call = _call(json.loads(m.group(1)))
            except json.JSONDecodeError:
                call = None
            if call is None:
                return text, []  # not a well-formed call: the output is plain content
            calls.append(call)
        if not calls:
            return text, []
        content = HERMES_CALL.sub("", text).strip()
        return content or None, calls
    body = text.strip().removeprefix("<|python_tag|>").strip()
    try:
        call = _call(json.loads(body)) if body.startswith("{") else None
    except json.JSONDecodeError:
        call = None
    return (None, [call]) if call else (text, [])


class ToolStream:
    """Streams content until the output may be a tool call, then holds it: at the end the held
    text becomes `tool_calls` deltas (each call whole, with its index and id) or content."""

    def __init__(self, fmt: str):
        self.fmt, self.text, self.sent = fmt, "", 0
        self.marker = "<tool_call>" if fmt == "hermes" else "{"

    def feed(self, text: str) -> str:
        """The content that can be sent now."""
        self.text += text
        if self.fmt == "llama3":
            head = self.text.lstrip().removeprefix("<|python_tag|>").lstrip()
            held = not head or head.startswith("{") or "<|python_tag|>".startswith(self.text.lstrip())
            if held:
                return ""
            out, self.sent = self.text[self.sent:], len(self.text)
            return out
        cut = self.text.find(self.marker)
        if cut < 0:  # hold a tail that may start the marker
            cut = len(self.text)
            for k in range(1, len(self.marker)):
                if self.text.endswith(self.marker[:k]):
                    cut = len(self.text) - k
                    break
        out = self.text[self.sent:cut] if cut > self.sent else ""
        self.sent = max(self.sent, cut)
        return out

    def finish(self) -> tuple[str, list[dict]]:
        """(content still to send, tool-call deltas) at the end of the output."""
        content, calls = parse(self.text, self.fmt)
        if not calls:
            return self.text[self.sent:], []
        rest = (content or "")[self.sent:] if content and content.startswith(self.text[:self.sent]) else ""
        return rest, [{"index": i, **c} for i, c in enumerate(calls)]


def answer(text: str, finish_reason: str | None, fmt: str) -> tuple[dict, str | None]:
    """The assistant message of a finished choice with tools, and its finish_reason."""
    content, calls = parse(text, fmt)
    if not calls:
        return {"role": "assistant", "content": text}, finish_reason
    return ({"role": "assistant", "content": content, "tool_calls": calls},
            "tool_calls" if finish_reason == "stop" else finish_reason)


def stream_deltas(streams: dict, index: int, fmt: str, text: str, finish_reason: str | None) -> list[tuple[dict, str | None]]:
    """The (delta, finish_reason) chunks one event of choice `index` gives with tools."""
    ts = streams.setdefault(index, ToolStream(fmt))
    out = [({"content": sent}, None)] if (sent := ts.feed(text)) else []
    if finish_reason is not None:
        rest, calls = ts.finish()
        if rest:
            out.append(({"content": rest}, None))
        if calls:
            out.append(({"tool_calls": calls}, None))
        out.append(({}, "tool_calls" if calls and finish_reason == "stop" else finish_reason))
    return out
