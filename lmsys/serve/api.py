"""The OpenAI API's request bodies and error shape, as the server checks and answers them.

    CompletionBody   POST /v1/completions       (prompt, logprobs, echo + the shared fields)
    ChatBody         POST /v1/chat/completions  (messages of Message / TextPart, logprobs,
                                                 top_logprobs, max_completion_tokens + shared)
    SamplingBody     the shared fields: model, max_tokens, temperature, top_p, top_k, n, stream,
                     stream_options (StreamOptions), stop, seed, ignore_eos

Bodies are strict ("10" is not an int) and ignore unknown OpenAI fields. Errors are OpenAI's
JSON `{"error": {"message", "type", "param", "code"}}` (APIError); `validation_message` turns
pydantic's errors into its one-line message. The routes are in lmsys.serve.routes, the app in
lmsys.serve.server.
"""

from __future__ import annotations

from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from lmsys.serve.scheduler import MAX_TOP_LOGPROBS


# ---------------------------------------------------------------------------------- errors


class APIError(Exception):
    """An error answered as OpenAI's error JSON."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


class EngineFailure(Exception):
    """The engine raised while running a request (delivered to the request's queue)."""


# ---------------------------------------------------------------------------------- request bodies


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class SamplingBody(BaseModel):
    """The fields both endpoints share: the model, sampling, stops, streaming."""

    # strict: "10" is not an int, 1 is not a str; unknown OpenAI fields (user, penalties...) ignored
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # extension; 0 or -1 = off
    n: int = Field(1, ge=1, le=64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False  # extension


class CompletionBody(SamplingBody):
    prompt: str | list[int] | list[str | list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    max_tokens: int | None = Field(16, ge=1)


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatBody(SamplingBody):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    max_completion_tokens: int | None = Field(None, ge=1)


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
