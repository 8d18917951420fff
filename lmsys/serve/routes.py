"""The OpenAI endpoints' request handling: /v1/models, /v1/completions, /v1/chat/completions.

A `Routes` object turns a checked request body (lmsys.serve.api) into engine requests, one per
prompt and choice (`n`), runs them as one `Run` (lmsys.serve.http_run: their events merged on one asyncio queue) and
answers with OpenAI's JSON, or server-sent events when `stream` is set. `add_routes` puts the
endpoints on an app (lmsys.serve.server.create_app). The checks against the server's Limits,
chat rendering and tokenizing run off the event loop, in the same worker-thread trip that
queues the requests (a full queue is refused before any of it). A chat request is rendered with
the model's chat template (lmsys.data.chat_template); a template that fails on the messages is a
400. A client that disconnects has its requests aborted; a request past the request timeout is
aborted with a 408. Tokens are counted in the metrics and against the request's API key.
"""

from __future__ import annotations

import json
import logging
import secrets
import time

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import StreamingResponse

from lmsys.data.chat_template import DEFAULT_CHAT_TEMPLATE, ChatTemplate, ChatTemplateError
from lmsys.serve.api import (
    APIError,
    ChatBody,
    CompletionBody,
    EngineFailure,
    Limits,
    SamplingBody,
    body_grammar,
    check_fields,
    check_text,
)
from lmsys.serve import activations, tools
from lmsys.serve.engine import Engine
from lmsys.serve.http_run import Choice, Run
from lmsys.serve.scheduler import GenerationOptions

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------- the endpoints


class Routes:
    """The /v1 endpoints over one engine (`app.state.server` of lmsys.serve.server's app):
    requests go to the engine through `loop` (the app's EngineLoop: submit, abort) and are
    counted in `metrics` (the app's Metrics)."""

    def __init__(self, engine: Engine, model_name: str, tokenizer, chat_template: str | None, loop, metrics,
                 limits: Limits | None = None, keys=None):
        self.engine, self.model_name, self.tokenizer = engine, model_name, tokenizer
        self.loop, self.metrics, self.limits, self.keys = loop, metrics, limits or Limits(), keys
        self.created = int(time.time())
        self.card_extra: dict = {}  # the base's card: the registry version served (lmsys.serve.follow)
        self.activations = activations.Activations(engine)
        self.tool_style = tools.style(chat_template or DEFAULT_CHAT_TEMPLATE, tokenizer)
        self.chat = ChatTemplate.for_model(chat_template, tokenizer, engine.eos_token_id)

    # -------------------------------------------------------------- shared pieces

    def adapter_names(self) -> list[str]:
        """The LoRA adapters a request's `model` may name besides the base (lmsys.serve.lora)."""
        return sorted(self.engine.adapters.names) if self.engine.adapters else []

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name and name not in self.adapter_names():
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                                f"{', '.join(repr(n) for n in [self.model_name, *self.adapter_names()])}",
                           param="model", code="model_not_found")

    def served(self, body) -> str:
        """The name a response reports: the adapter the request named, else the base's."""
        return body.model if body.model in self.adapter_names() else self.model_name

    def options(self, body: SamplingBody, max_tokens: int, seed: int, **kw) -> GenerationOptions:
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        adapter = body.model if body.model in self.adapter_names() else ""
        return GenerationOptions(max_tokens=max_tokens, temperature=body.temperature,
                                 top_k=max(body.top_k, 0), top_p=body.top_p, seed=seed,
                                 stop=tuple(s for s in stop if s), ignore_eos=body.ignore_eos,
                                 grammar=kw.pop("grammar", None) or body_grammar(body, self.engine),
                                 adapter=adapter, cache_salt=body.cache_salt or "", **kw)

    @staticmethod
    def seeds(body: SamplingBody) -> list[int]:
        base = body.seed if body.seed is not None else secrets.randbits(31)
        return [(base + i) % 2**32 for i in range(body.n)]

    def token_str(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def sse(self, gen, include_done: bool = True):
        """Server-sent events of `gen`'s chunks; any error mid-stream becomes an error event
        (OpenAI's error JSON, no internal text), and the stream still ends with [DONE]."""
        async def stream():
            try:
                async for chunk in gen:
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            except EngineFailure as e:
                yield f"data: {json.dumps(e.error().body())}\n\n"
            except APIError as e:
                yield f"data: {json.dumps(e.body())}\n\n"
            except Exception:  # noqa: BLE001 - the client gets an error event, the log the details
                log.exception("a streamed response failed")
                error = APIError(500, "internal server error; the server logged it", type="server_error")
                yield f"data: {json.dumps(error.body())}\n\n"
            if include_done:
                yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -------------------------------------------------------------- completions

    def completion_logprobs(self, c: Choice, echo: bool, tokens: list[int], lps: list[float],
                            tops: list[dict[int, float]], offset: int) -> dict:
        """OpenAI's legacy logprobs object; with echo (first chunk / whole answer) the prompt's
        tokens come first."""
        ids, lp, top = [], [], []
        if echo:
            ids += c.req.prompt_ids
            lp += c.req.prompt_token_logprobs or [None] * len(c.req.prompt_ids)
            top += c.req.prompt_top_logprobs or [None] * len(c.req.prompt_ids)
        ids += tokens
        lp += lps
        top += tops
        strs, offsets = [], []
        for t in ids:
            offsets.append(offset)
            s = self.token_str(t)
            strs.append(s)
            offset += len(s)
        return {"tokens": strs, "token_logprobs": lp,
                "top_logprobs": [None if d is None else {self.token_str(k): v for k, v in d.items()} for d in top],
                "text_offset": offsets}

    def check_sampling(self, body: SamplingBody, choices: int) -> None:
        """The limits every request shares (api.Limits): fields, stop strings, prompts x n."""
        check_fields(body)
        limits = self.limits
        stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
        if len(stop) > limits.max_stop:
            raise APIError(400, f"stop: at most {limits.max_stop} stop strings, got {len(stop)}", param="stop")
        if any(len(s) > limits.max_stop_chars for s in stop):
            raise APIError(400, f"stop: a stop string has at most {limits.max_stop_chars} characters",
                           param="stop")
        check_text(stop, "stop")
        if choices * body.n > limits.max_choices:
            raise APIError(400, f"{choices} prompt(s) x n={body.n} = {choices * body.n} choices; this server "
                                f"answers at most {limits.max_choices} per request", param="n")

    async def completions(self, body: CompletionBody, http: HTTPRequest):
        self.check_model(body.model)
        run = Run(self, http)
        lengths = await run.submit(lambda: self._completion_items(body))
        rid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": self.served(body)}
        with_logprobs = body.logprobs is not None
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return self.sse(self._stream_completions(run, head, body.echo, with_logprobs, include_usage, lengths))
        await run.finish()
        choices = []
        for c in run.choices:
            r = c.req
            text = (c.prompt_text if body.echo else "") + r.text
            lp = None
            if with_logprobs:
                lp = self.completion_logprobs(c, body.echo, r.generated[:len(r.token_logprobs)],
                                              r.token_logprobs, r.top_logprobs, 0)
            choices.append({"index": c.index, "text": text, "logprobs": lp, "finish_reason": r.finish_reason})
        await activations.attach(self.activations, body.return_hidden_states, [c.req for c in run.choices], choices)
        return {**head, "choices": choices, "usage": run.usage(lengths)}

    def _completion_items(self, body: CompletionBody):
        """Checks and tokenizes a completions body (off the event loop): the engine requests
        (prompt ids, prompt text, options), one per choice, and the prompts' lengths."""
        prompts = body.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts or any(len(p) == 0 for p in prompts):
            raise APIError(400, "prompt is empty; send a string, a list of token ids or a list of those",
                           param="prompt")
        self.check_sampling(body, len(prompts))
        if body.max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens: 0 generates nothing; it is for scoring a prompt with "
                                "echo: true (and logprobs)", param="max_tokens")
        check_text(prompts, "prompt")
        vocab = self.engine.model.vocab_size
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        prompt_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
        items, lengths = [], []
        for p in prompts:
            if not isinstance(p, str) and any(t >= vocab for t in p):
                raise APIError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
            ids = self.engine.encode(p) if isinstance(p, str) else list(p)
            self.engine.scheduler.check_fits(len(ids), max_tokens)  # before any more work on it
            text = p if isinstance(p, str) else self.tokenizer.decode(ids)
            lengths.append(len(ids))
            for seed in self.seeds(body):
                items.append((ids, text, self.options(body, max_tokens, seed, logprobs=body.logprobs,
                                                      prompt_logprobs=prompt_logprobs)))
        activations.check(body, self.engine, self.limits, lengths, max_tokens)
        return items, lengths

    async def _stream_completions(self, run: Run, head: dict, echo: bool, with_logprobs: bool,
                                  include_usage: bool, lengths: list[int]):
        offsets = {}
        async for c, ev in run.events():
            text, lp = ev.text, None
            first = not c.started
            c.started = True
            if first and echo:
                text = c.prompt_text + text
            if with_logprobs:
                start = offsets.get(c.index, 0)
                lp = self.completion_logprobs(c, first and echo, ev.token_ids, ev.logprobs, ev.top_logprobs, start)
                offsets[c.index] = start + sum(len(s) for s in lp["tokens"])
            if not (text or ev.token_ids or ev.finish_reason or first):
                continue
            chunk = {**head, "choices": [{"index": c.index, "text": text, "logprobs": lp,
                                          "finish_reason": ev.finish_reason}]}
            if include_usage:
                chunk["usage"] = None
            yield chunk
        if include_usage:
            yield {**head, "choices": [], "usage": run.usage(lengths)}

    # -------------------------------------------------------------- chat

    def chat_logprobs(self, tokens: list[int], lps: list[float], tops: list[dict[int, float]]) -> dict:
        def entry(t, lp):
            s = self.token_str(t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

        return {"content": [{**entry(t, lp), "top_logprobs": [entry(k, v) for k, v in top.items()]}
                            for t, lp, top in zip(tokens, lps, tops)]}

    async def chat_completions(self, body: ChatBody, http: HTTPRequest):
        self.check_model(body.model)
        run = Run(self, http)
        ids = await run.submit(lambda: self._chat_items(body))
        rid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        head = {"id": rid, "object": "chat.completion", "created": created, "model": self.served(body)}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return self.sse(self._stream_chat(run, {**head, "object": "chat.completion.chunk"}, body.logprobs,
                                              include_usage, [len(ids)], bool(tools.chosen_tools(body))))
        await run.finish()
        choices = []
        for c in run.choices:
            r = c.req
            lp = (self.chat_logprobs(r.generated[:len(r.token_logprobs)], r.token_logprobs, r.top_logprobs)
                  if body.logprobs else None)
            message, finish = ((tools.answer(r.text, r.finish_reason, self.tool_style, r.generated))
                               if tools.chosen_tools(body)
                               else ({"role": "assistant", "content": r.text}, r.finish_reason))
            choices.append({"index": c.index, "message": message, "logprobs": lp, "finish_reason": finish})
        await activations.attach(self.activations, body.return_hidden_states, [c.req for c in run.choices], choices)
        return {**head, "choices": choices, "usage": run.usage([len(ids)])}

    def _chat_items(self, body: ChatBody):
        """Checks, renders and tokenizes a chat body (off the event loop): the engine requests,
        one per choice, and the prompt's ids."""
        self.check_sampling(body, 1)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if len(body.messages) > self.limits.max_messages:
            raise APIError(400, f"messages: at most {self.limits.max_messages} messages, got "
                                f"{len(body.messages)}", param="messages")
        messages = []
        for i, m in enumerate(body.messages):
            content = m.content
            if content is None and m.role != "assistant":
                raise APIError(400, f"messages[{i}].content is required for a {m.role} message",
                               param="messages")
            if isinstance(content, list):
                content = "".join(part.text for part in content)
            messages.append({**(m.model_extra or {}), "role": m.role, "content": content or "",
                             **({"name": m.name} if m.name else {})})
        check_text(messages, "messages")
        chosen = tools.chosen_tools(body)
        if (grammar := tools.tool_grammar(body, chosen, self.tool_style)) and body_grammar(body, self.engine):
            raise APIError(400, "tool_choice required or a function constrains the output already; "
                                "drop response_format / guided_*", param="tool_choice")
        try:
            prompt = self.chat.render(tools.template_messages(messages, self.tool_style), tools=chosen)
        except ChatTemplateError as e:
            raise APIError(400, e.message, param="messages") from e
        ids = self.engine.encode(prompt)
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:  # as much as the context leaves
            max_tokens = max(1, self.engine.cfg.max_seq_len - len(ids))
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        activations.check(body, self.engine, self.limits, [len(ids)], max_tokens)
        keep = bool(chosen) and self.tool_style.keeps_special_tokens  # the call marker is a special token
        items = [(ids, prompt, self.options(body, max_tokens, seed, logprobs=logprobs, grammar=grammar,
                                            skip_special_tokens=not keep))
                 for seed in self.seeds(body)]
        return items, ids

    async def _stream_chat(self, run: Run, head: dict, with_logprobs: bool, include_usage: bool,
                           lengths: list[int], with_tools: bool = False):
        extra = {"usage": None} if include_usage else {}
        for c in run.choices:  # the first chunk of each choice carries the role
            yield {**head, "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}], **extra}
        streams = {}  # choice index -> tools.ToolStream
        async for c, ev in run.events():
            if with_tools:  # content until a tool call may start, the calls whole at the end
                for delta, finish in tools.stream_deltas(streams, c.index, self.tool_style, ev.text, ev.token_ids,
                                                         ev.finish_reason):
                    yield {**head, "choices": [{"index": c.index, "delta": delta, "logprobs": None,
                                                "finish_reason": finish}], **extra}
                continue
            if ev.text or ev.token_ids:
                lp = self.chat_logprobs(ev.token_ids, ev.logprobs, ev.top_logprobs) if with_logprobs else None
                yield {**head, "choices": [{"index": c.index, "delta": {"content": ev.text},
                                            "logprobs": lp, "finish_reason": None}], **extra}
            if ev.finish_reason is not None:
                yield {**head, "choices": [{"index": c.index, "delta": {}, "logprobs": None,
                                            "finish_reason": ev.finish_reason}], **extra}
        if include_usage:
            yield {**head, "choices": [], "usage": run.usage(lengths)}

    # -------------------------------------------------------------- models

    def model_card(self, name: str | None = None) -> dict:
        """The base's card, or a LoRA adapter's (`name`; its `parent` the base)."""
        card = {"id": name or self.model_name, "object": "model", "created": self.created, "owned_by": "lmsys",
                "max_model_len": self.engine.cfg.max_seq_len}
        return {**card, **self.card_extra} if not name or name == self.model_name else {**card, "parent": self.model_name}


def add_routes(app: FastAPI, routes: Routes) -> None:
    """The /v1 endpoints of `routes` on `app`."""

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [routes.model_card(), *map(routes.model_card, routes.adapter_names())]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str):
        routes.check_model(model)
        return routes.model_card(model)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: HTTPRequest):
        return await routes.completions(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: HTTPRequest):
        return await routes.chat_completions(body, request)
