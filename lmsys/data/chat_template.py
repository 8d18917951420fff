"""Chat templates: finding a model's template beside its tokenizer and rendering messages with it.

    template = load_chat_template("path/to/tokenizer.json") or DEFAULT_CHAT_TEMPLATE
    prompt = ChatTemplate(template, bos_token="<s>", eos_token="</s>").render(messages)

A template is rendered with jinja2 as Hugging Face does (`messages`, `add_generation_prompt`,
`bos_token`, `eos_token`, `raise_exception`, `strftime_now`, a `tojson` filter) in a sandboxed
environment. A model without one gets DEFAULT_CHAT_TEMPLATE: each message as
`<|role|>\\ncontent\\n`, then `<|assistant|>\\n`. A template that fails on some messages (its
own `raise_exception`, or any jinja error) raises ChatTemplateError, which the server answers
with a 400. Used by the HTTP server and by chat-format training (lmsys.data.chat).
"""

from __future__ import annotations

import json
import os
import time

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class ChatTemplateError(ValueError):
    """A chat template failed on the messages it was given."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def load_chat_template(tokenizer_spec: str, read=None) -> str | None:
    """The chat template beside a tokenizer.json (file or directory): chat_template.jinja, else
    `chat_template` of tokenizer_config.json; None if neither (then DEFAULT_CHAT_TEMPLATE).
    `read(path) -> bytes` reads the file (default: from disk; a registered model's reader hashes
    what it reads)."""
    if read is None:
        def read(p):
            with open(p, "rb") as f:
                return f.read()
    path = os.path.expanduser(tokenizer_spec)
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    if not directory:
        return None
    jinja = os.path.join(directory, "chat_template.jinja")  # where transformers 5 saves it
    if os.path.isfile(jinja):
        return read(jinja).decode("utf-8") or None
    config = os.path.join(directory, "tokenizer_config.json")
    if not os.path.isfile(config):
        return None
    template = json.loads(read(config)).get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default") or next(iter(named.values()), None)
    return template or None


def token_text(tokenizer, token_id: int | None) -> str:
    """A token's text for a template's `bos_token` / `eos_token`; "" for None (or an unknown id).
    The id is e.g. `lmsys.data.tokenizer.first_token_id(tokenizer, BOS_CANDIDATES)`."""
    return "" if token_id is None else tokenizer.id_to_token(token_id) or ""


class ChatTemplate:
    def __init__(self, source: str, bos_token: str, eos_token: str):
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ChatTemplateError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
        self.template = env.from_string(source)
        self.bos_token, self.eos_token = bos_token, eos_token

    @classmethod
    def for_model(cls, template: str | None, tokenizer, eos_token_id: int | None) -> "ChatTemplate":
        """A model's template (DEFAULT_CHAT_TEMPLATE for None) with its tokenizer's begin- and
        end-of-text tokens as `bos_token` / `eos_token`: how the server and `lmsys eval` render."""
        from lmsys.data.tokenizer import BOS_CANDIDATES, first_token_id

        return cls(template or DEFAULT_CHAT_TEMPLATE, token_text(tokenizer, first_token_id(tokenizer, BOS_CANDIDATES)),
                   token_text(tokenizer, eos_token_id))

    def render(self, messages: list[dict], tools: list[dict] | None = None,
               add_generation_prompt: bool = True) -> str:
        """The prompt for `messages` (and `tools`, OpenAI's function list, as transformers passes
        them), ending with the assistant's turn opened (unless `add_generation_prompt` is False);
        ChatTemplateError if the template fails on them."""
        try:
            return self.template.render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except ChatTemplateError:
            raise
        except Exception as e:
            raise ChatTemplateError(f"chat template failed on these messages: {e}") from e
