"""Tool calling on chat completions: `tools`, `tool_choice`, `parallel_tool_calls`, `role: tool`
messages, and the model's tool calls parsed into OpenAI's `tool_calls`.

The tools go to the model's chat template as transformers passes them (`tools=[{"type":
"function", "function": {...}}]`), and an assistant message's `tool_calls` arguments (a JSON
string in OpenAI's API) as objects, as HF templates expect (vLLM does the same). The output
format follows the template (`style`): Hermes style (`<tool_call>\\n{"name": ..., "arguments":
{...}}\\n</tool_call>`, Qwen2.5/3, Hermes) when the template mentions `<tool_call>`; Mistral style
(`[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`, as Mistral-7B-Instruct-v0.3's template
writes it; the later `[TOOL_CALLS]name[ARGS]{...}` form is not parsed) when it mentions
`[TOOL_CALLS]`; else Llama-3 style (the whole output
one JSON object `{"name": ..., "parameters": {...}}`, optionally after `<|python_tag|>`).

Mistral: `[TOOL_CALLS]` is a special token in Mistral's tokenizers (`Format.call_token`, its id):
a call is then recognised by that token id only (the same characters written by ordinary tokens
are content), the request's text keeps special tokens (as vLLM's Mistral parser asks), and a
forced call starts with the token itself in the grammar (`<[id]>`); in a tokenizer without it,
the marker is matched as text. Mistral's templates require tool-call ids of 9 letters and digits
(`[TOOL_CALLS]` history and `[TOOL_RESULTS]` call ids): the server's calls get such ids, and ids
sent back in another form (OpenAI's `call_...`) are mapped, the same id to the same 9 characters
in an assistant's `tool_calls` and a `tool` message's `tool_call_id`.

`tool_choice`: "none" renders no tools and parses nothing; "auto" (the default with tools)
parses calls out of free output; "required" and a named function constrain the output with a
grammar (lmsys.serve.constrained) to one call (or, with `parallel_tool_calls`, one or more in
Hermes and Mistral style) of the allowed functions whose arguments follow each function's JSON schema, so
they always parse and validate.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import string
from dataclasses import dataclass

from lmsys.serve.api import APIError

HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
COMPACT = {"x-guidance": {"whitespace_flexible": False}}
MISTRAL_CALLS = "[TOOL_CALLS]"
MISTRAL_ID = re.compile(r"[A-Za-z0-9]{9}")
ALNUM = string.ascii_letters + string.digits


@dataclass(frozen=True)
class Format:
    """A model's tool-call format: "hermes", "llama3" or "mistral"; `call_token` the id of
    Mistral's `[TOOL_CALLS]` when the tokenizer has it as one special token (None: text)."""
    name: str
    call_token: int | None = None

    @property
    def keeps_special_tokens(self) -> bool:
        """Whether a request's text must keep special tokens (its call marker is one)."""
        return self.call_token is not None


def special_token_id(tokenizer, text: str) -> int | None:
    """The id of `text` if the tokenizer (a `tokenizers.Tokenizer`) has it as one special token."""
    token_id = tokenizer.token_to_id(text)
    added = tokenizer.get_added_tokens_decoder().get(token_id) if token_id is not None else None
    return token_id if added is not None and added.special else None


def style(template_source: str, tokenizer=None) -> Format:
    """The tool-call format a chat template defines (see the module's docstring)."""
    if "<tool_call>" in template_source:
        return Format("hermes")
    if MISTRAL_CALLS in template_source:
        return Format("mistral", special_token_id(tokenizer, MISTRAL_CALLS) if tokenizer is not None else None)
    return Format("llama3")


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


def tool_grammar(body, tools: list[dict] | None, fmt: Format) -> str | None:
    """The grammar forcing a call for tool_choice "required" or a named function, else None."""
    from lmsys.serve.constrained import request_grammar

    choice = body.tool_choice
    if not tools or choice in (None, "none", "auto"):
        return None
    if isinstance(choice, dict):
        tools = [t for t in tools if t["function"]["name"] == choice["function"]["name"]]
    key = "parameters" if fmt.name == "llama3" else "arguments"
    calls = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]}, key: _schema(t)},
              "required": ["name", key], "additionalProperties": False} for t in tools]
    call = {**(calls[0] if len(calls) == 1 else {"anyOf": calls}), **COMPACT}
    if fmt.name == "llama3":
        return request_grammar("json_schema", call)
    if fmt.name == "mistral":  # [TOOL_CALLS] [call, call, ...] as the template writes history
        marker = f"<[{fmt.call_token}]>" if fmt.call_token is not None else json.dumps(MISTRAL_CALLS)
        more = ' (", " body)*' if body.parallel_tool_calls else ""
        lark = f'start: {marker} " [" body{more} "]"\nbody: %json {json.dumps(call)}'
        return request_grammar("grammar", lark)
    repeat = "+" if body.parallel_tool_calls else ""
    lark = f'start: call{repeat}\ncall: "<tool_call>\\n" body "\\n</tool_call>"\nbody: %json {json.dumps(call)}'
    return request_grammar("grammar", lark)


def mistral_id(call_id) -> str:
    """A tool-call id as Mistral's templates require it (9 letters and digits): kept if it is
    one, else the same 9 characters for the same id (from its sha256)."""
    if isinstance(call_id, str) and MISTRAL_ID.fullmatch(call_id):
        return call_id
    n = int.from_bytes(hashlib.sha256(str(call_id).encode("utf-8")).digest()[:8], "big")
    return "".join(ALNUM[(n // len(ALNUM) ** i) % len(ALNUM)] for i in range(9))


def template_messages(messages: list[dict], fmt: Format | None = None) -> list[dict]:
    """Assistant `tool_calls` with their JSON-string arguments as objects (what templates read);
    for Mistral's format, tool-call ids as its templates require them (`mistral_id`)."""
    mistral = fmt is not None and fmt.name == "mistral"
    out = []
    for m in messages:
        if mistral and m.get("role") == "tool" and m.get("tool_call_id") is not None:
            m = {**m, "tool_call_id": mistral_id(m["tool_call_id"])}
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                c = dict(c)
                if mistral and c.get("id") is not None:
                    c["id"] = mistral_id(c["id"])
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


def _call(obj, fmt: Format) -> dict | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    call_id = ("".join(secrets.choice(ALNUM) for _ in range(9)) if fmt.name == "mistral"
               else f"call_{secrets.token_hex(12)}")
    return {"id": call_id, "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


def _mistral_calls(text: str, fmt: Format, token_ids) -> tuple[str | None, list[dict]]:
    """Mistral: content before `[TOOL_CALLS]`, the JSON list (or one object) of calls after it.
    With the marker a special token, only its token id (in `token_ids`) starts the calls."""
    cut = text.find(MISTRAL_CALLS)
    if cut < 0 or (fmt.call_token is not None and fmt.call_token not in (token_ids or ())):
        return text, []
    try:
        objs = json.loads(text[cut + len(MISTRAL_CALLS):].strip())
    except json.JSONDecodeError:
        return text, []
    calls = [_call(o, fmt) for o in (objs if isinstance(objs, list) else [objs])]
    if not calls or None in calls:
        return text, []
    return text[:cut].strip() or None, calls


def parse(text: str, fmt: Format, token_ids=None) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a model's output (its text, and its token ids where the format's
    marker is a special token); content None when only calls were made."""
    if fmt.name == "mistral":
        return _mistral_calls(text, fmt, token_ids)
    if fmt.name == "hermes":
        calls = []
        for m in HERMES_CALL.finditer(text):
            try:
                call = _call(json.loads(m.group(1)), fmt)
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
        call = _call(json.loads(body), fmt) if body.startswith("{") else None
    except json.JSONDecodeError:
        call = None
    return (None, [call]) if call else (text, [])


class ToolStream:
    """Streams content until the output may be a tool call, then holds it: at the end the held
    text becomes `tool_calls` deltas (each call whole, with its index and id) or content."""

    def __init__(self, fmt: Format):
        self.fmt, self.text, self.sent, self.ids = fmt, "", 0, []
        self.marker = {"hermes": "<tool_call>", "mistral": MISTRAL_CALLS}.get(fmt.name, "{")

    def feed(self, text: str, token_ids=()) -> str:
        """The content that can be sent now."""
        self.text += text
        self.ids += token_ids
        if self.fmt.name == "llama3":
            head = self.text.lstrip().removeprefix("<|python_tag|>").lstrip()
            held = not head or head.startswith("{") or "<|python_tag|>".startswith(self.text.lstrip())
            if held:
                return ""
            out, self.sent = self.text[self.sent:], len(self.text)
            return out
        if self.fmt.call_token is not None:  # the marker is one special token: nothing to hold before it
            cut = self.text.find(self.marker) if self.fmt.call_token in self.ids else -1
            cut = len(self.text) if cut < 0 else cut
        else:
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
        content, calls = parse(self.text, self.fmt, self.ids)
        if not calls:
            return self.text[self.sent:], []
        rest = (content or "")[self.sent:] if content and content.startswith(self.text[:self.sent]) else ""
        return rest, [{"index": i, **c} for i, c in enumerate(calls)]


def answer(text: str, finish_reason: str | None, fmt: Format, token_ids=None) -> tuple[dict, str | None]:
    """The assistant message of a finished choice with tools, and its finish_reason."""
    content, calls = parse(text, fmt, token_ids)
    if not calls:
        return {"role": "assistant", "content": text}, finish_reason
    return ({"role": "assistant", "content": content, "tool_calls": calls},
            "tool_calls" if finish_reason == "stop" else finish_reason)


def stream_deltas(streams: dict, index: int, fmt: Format, text: str, token_ids, finish_reason: str | None
                  ) -> list[tuple[dict, str | None]]:
    """The (delta, finish_reason) chunks one event of choice `index` gives with tools."""
    ts = streams.setdefault(index, ToolStream(fmt))
    out = [({"content": sent}, None)] if (sent := ts.feed(text, token_ids)) else []
    if finish_reason is not None:
        rest, calls = ts.finish()
        if rest:
            out.append(({"content": rest}, None))
        if calls:
            out.append(({"tool_calls": calls}, None))
        out.append(({}, "tool_calls" if calls and finish_reason == "stop" else finish_reason))
    return out
