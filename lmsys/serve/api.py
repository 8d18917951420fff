"""The OpenAI API's request bodies, the server's limits and the error shape.

    CompletionBody   POST /v1/completions       (prompt, logprobs, echo + the shared fields)
    ChatBody         POST /v1/chat/completions  (messages of Message / TextPart, logprobs,
                                                 top_logprobs, max_completion_tokens, tools
                                                 (ToolSpec), tool_choice, parallel_tool_calls
                                                 + shared)
    SamplingBody     the shared fields: model, max_tokens, temperature, top_p, top_k, n, stream,
                     stream_options (StreamOptions), stop, seed, ignore_eos, and structured
                     output: response_format (ResponseFormat) or guided_json / guided_regex /
                     guided_choice / guided_grammar (vLLM's names); return_hidden_states
                     (HiddenStatesRequest, an extension); cache_salt (vLLM's name: requests
                     share cached prompt pages only with the same salt)
    Limits           what one request may ask and how many may wait (`lmsys serve` flags)

Bodies are strict ("10" is not an int) and every number is range-checked to what the engine
holds (top_k and token ids in 32 bits, finite temperatures in OpenAI's [0, 2], seeds in 64
bits). `check_fields` refuses fields the server does not implement, naming them, except
IGNORED_FIELDS (accepted and documented as ignored) and NEUTRAL_FIELDS at their no-op value
(`frequency_penalty: 0`, `best_of: 1`, ...); `check_text` refuses strings that are not valid
Unicode (lone surrogates such as "\\ud800"). Errors are OpenAI's JSON `{"error": {"message",
"type", "param", "code"}}` (APIError); `validation_message` turns pydantic's errors into its
one-line message. The routes are in lmsys.serve.routes, the app in lmsys.serve.server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from lmsys.models.llama import CAPTURES
from lmsys.serve.scheduler import MAX_TOP_LOGPROBS, RequestError


# ---------------------------------------------------------------------------------- errors


class APIError(Exception):
    """An error answered as OpenAI's error JSON."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        # what a client sent may not be valid Unicode: never echo it back unencodable
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class EngineFailure(Exception):
    """The engine failed a request (delivered to the request's queue): 500, or 503 when the
    engine thread is gone. The message never carries internal exception text."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status

    def error(self) -> APIError:
        return APIError(self.status, str(self), type="server_error",
                        code="engine_unavailable" if self.status == 503 else "engine_error")


# ---------------------------------------------------------------------------------- limits


@dataclass
class Limits:
    """What the server admits. The defaults keep a 2-core laptop and an 8-GPU node responsive:
    memory and host work per request are bounded whatever the engine's size (the queue counts
    engine requests, one per prompt and choice; a full queue is a 429 with Retry-After)."""

    max_queue: int = 256  # engine requests waiting for a slot at most (beyond: 429)
    max_body_bytes: int = 4 * 2**20  # a request body at most (beyond: 413)
    max_choices: int = 64  # prompts x n of one request at most
    max_stop: int = 4  # stop strings per request (OpenAI's limit)
    max_stop_chars: int = 256  # characters of one stop string
    max_messages: int = 1024  # chat messages per request
    request_timeout: float = 600.0  # seconds from arrival to the last token (0 = none); then 408
    embed_pooling: str | None = None  # /v1/embeddings' pooling, "last" or "mean"; None: the model's
    max_hidden_values: int = 2**22  # floats of `return_hidden_states` one request may ask for


# no-op OpenAI fields: accepted and ignored (documented in the README)
IGNORED_FIELDS = frozenset({"user", "metadata", "store", "service_tier"})
# OpenAI features the server does not implement: accepted only at their default (no-op) value
NEUTRAL_FIELDS = {
    "frequency_penalty": (0,), "presence_penalty": (0,), "best_of": (None, 1), "logit_bias": (None, {}),
    "suffix": (None, ""), "functions": (None, []),
}


def check_fields(body: BaseModel) -> None:
    """400 naming the first field the server does not implement (see NEUTRAL_FIELDS)."""
    for name, value in (body.model_extra or {}).items():
        if name in IGNORED_FIELDS:
            continue
        if name in NEUTRAL_FIELDS:
            if value is None or any(value == ok and isinstance(value, bool) == isinstance(ok, bool)
                                    for ok in NEUTRAL_FIELDS[name]):
                continue
            raise APIError(400, f"{name}={str(value)[:80]} is not supported by this server (only "
                                f"{' or '.join(repr(v) for v in NEUTRAL_FIELDS[name] if v is not None)})",
                           param=name, code="unsupported_parameter")
        raise APIError(400, f"unknown field {name!r}", param=name, code="unknown_parameter")


def check_text(value, path: str) -> None:
    """400 naming the first string (or key) in `value` that is not valid Unicode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise APIError(400, f"{path}: not valid Unicode (a lone surrogate at character "
                                f"{e.start}); send UTF-8 text", param=path.split(".")[0].split("[")[0],
                           code="invalid_value") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            check_text(k, path)
            check_text(v, f"{path}.{k}")
    elif isinstance(value, (list, tuple)):
        if value and not isinstance(value[0], int):
            for i, v in enumerate(value):
                check_text(v, f"{path}[{i}]")


# ---------------------------------------------------------------------------------- request bodies


INT32_MAX, INT64_MAX = 2**31 - 1, 2**63 - 1
TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)
    name: str | None = None
    description: str | None = None
    schema_: dict = Field(default_factory=dict, alias="schema")  # {} = any JSON value
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class HiddenStatesRequest(BaseModel):
    """`return_hidden_states` on completions and chat (extension; lmsys.serve.activations)."""
    model_config = ConfigDict(strict=True, extra="forbid")
    layers: list[int] = Field(min_length=1)
    positions: Literal["last", "all"] = "last"
    kind: Literal[CAPTURES] = "residual"


class SamplingBody(BaseModel):
    """The fields both endpoints share: the model, sampling, stops, streaming."""

    # strict: "10" is not an int, 1 is not a str; other fields are kept for check_fields
    model_config = ConfigDict(strict=True, extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(0, ge=-1, le=INT32_MAX)  # extension; 0 or -1 = off
    n: int = Field(1, ge=1, le=64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-INT64_MAX - 1, le=INT64_MAX)
    ignore_eos: bool = False  # extension
    # structured output (lmsys.serve.constrained): OpenAI's response_format, or one of vLLM's
    # guided_* extension fields
    response_format: ResponseFormat | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1)
    guided_grammar: str | None = None
    # the model's activations over each choice (extension; lmsys.serve.activations)
    return_hidden_states: HiddenStatesRequest | None = None
    # prefix caching (lmsys.serve.prefix_cache): cached KV pages are shared only among requests
    # with the same salt (vLLM's field; e.g. a secret per user, so no one can probe whether
    # another user sent a prompt by timing a cache hit)
    cache_salt: str | None = Field(None, min_length=1, max_length=1024)


class CompletionBody(SamplingBody):
    prompt: str | list[TokenId] | list[str | list[TokenId]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    # 0 with echo: only the prompt's log-probs (how evaluation tools score text)
    max_tokens: int | None = Field(16, ge=0, le=INT32_MAX)


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


ROLES = ("system", "developer", "user", "assistant", "tool")


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal[ROLES]
    content: str | list[TextPart] | None = None  # None only for an assistant message
    name: str | None = None


class FunctionSpec(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict | None = None  # a JSON schema; None = no arguments constraint
    strict: bool | None = None


class ToolSpec(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["function"]
    function: FunctionSpec


class ChatBody(SamplingBody):
    messages: list[Message] = Field(min_length=1)
    tools: list[ToolSpec] | None = Field(None, max_length=128)  # lmsys.serve.tools
    tool_choice: Literal["none", "auto", "required"] | dict | None = None
    parallel_tool_calls: bool = True
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """A one-line message and the top-level parameter for pydantic's errors."""
    e = errors[0]
    if e.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg', ''))}", None
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    param = loc[0] if loc else None
    msg = e.get("msg", "invalid value")
    if e.get("type") != "missing" and "input" in e:
        msg += f" (got {repr(e['input'])[:80]})"
    if len(errors) > 1:
        msg += f"; and {len(errors) - 1} more problem(s)"
    return (f"{'.'.join(loc)}: {msg}" if loc else msg), param


GUIDED_KINDS = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice",
                "guided_grammar": "grammar"}


def body_grammar(body: SamplingBody, engine) -> str | None:
    """The llguidance grammar a body asks for (response_format or one guided_* field), checked
    against the engine's tokenizer (RequestError naming the field and the library's complaint:
    a 400), or None."""
    from lmsys.serve.constrained import request_grammar

    asked = []
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        asked.append(("response_format", "json_schema", {"type": "object"}))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise APIError(400, "response_format: type json_schema needs a json_schema object "
                                "({\"name\": ..., \"schema\": {...}})", param="response_format")
        asked.append(("response_format", "json_schema", fmt.json_schema.schema_))
    asked += [(name, kind, getattr(body, name)) for name, kind in GUIDED_KINDS.items()
              if getattr(body, name) is not None]
    if not asked:
        return None
    if len(asked) > 1:
        raise APIError(400, f"ask for one output constraint, got {', '.join(a[0] for a in asked)}",
                       param=asked[1][0])
    name, kind, spec = asked[0]
    check_text(spec, name)
    try:
        grammar = request_grammar(kind, spec)
    except ImportError as e:
        raise APIError(400, f"{name}: structured output needs llguidance on the server "
                            "(pip install 'lmsys[structured]')", param=name) from e
    except RequestError as e:
        raise APIError(400, f"{name}: {str(e).split(': ', 1)[-1]}", param=name, code=e.code) from None
    engine.grammar_state(grammar, name)  # the library's verdict, cached per grammar text
    return grammar
