"""Chat data for fine-tuning: JSONL conversations rendered with the model's chat template, the
loss on assistant tokens only, whole conversations packed into rows.

    ds = build_chat_dataset("chats.jsonl", tokenizer, chat_template, seq_len=2048, seed=0)
    ds.batch(0, 8)   # tokens / targets / positions / segment_ids / loss_mask, like PackedDataset

Each line of a file is `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}]}`.
A conversation is rendered with the template (Hugging Face conventions: `messages`,
`add_generation_prompt`, `bos_token`, `eos_token`) and tokenized once, with offsets. Assistant
spans come from incremental rendering: for assistant message i, its text begins after
render(messages[:i], add_generation_prompt=True) and ends before render(messages[:i+1]); inside
that span the message's content is trainable (loss mask 1), and so is the first special token
after it (the end-of-turn token, e.g. <|im_end|> or <|eot_id|>), if the template writes one.
Everything else (system, user, role headers) has loss mask 0.

Limitations: a template must render a conversation's prefixes as prefixes of the whole (true of
ChatML, Llama 3, Mistral and the default template; not of templates that rewrite earlier turns,
e.g. ones that drop past reasoning); special-token text inside contents is parsed as special
tokens (as transformers does); a conversation longer than seq_len + 1 tokens is truncated.

Conversations are packed whole, in file order, into rows of seq_len (next-fit; a new row starts
when the next one does not fit; the rest of a row is padding with segment id 0 and loss mask 0).
Rows are shuffled per epoch with Grain like PackedDataset. Tokenization is cached by content.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator

import numpy as np
from tokenizers import Tokenizer

from lmsys.data.cache import atomic_save_npy, atomic_write_text, cache_key, cache_root, cached_sha256
from lmsys.data.corpus import source_files, source_fingerprint
from lmsys.data.packing import RowDataset, Sample, _token_dtype
from lmsys.data.chat_template import DEFAULT_CHAT_TEMPLATE, ChatTemplate, token_text
from lmsys.data.tokenizer import BOS_CANDIDATES, EOS_CANDIDATES, fill_id, first_token_id

logger = logging.getLogger(__name__)

_ENCODE_CHUNK = 256


# ----------------------------------------------------------------------------- reading


def iter_jsonl(source: str, what: str) -> Iterator[tuple[str, object]]:
    """(where, record) for each non-empty line of the .jsonl files of `source` (comma-separated
    files/directories); `what` names the format in errors."""
    for path in source_files(source):
        if not path.endswith(".jsonl"):
            raise ValueError(f"data.format={what} reads .jsonl files; {path} is not one (data.source={source!r})")
        with open(path, "rb") as f:
            for line_number, raw in enumerate(f, start=1):
                line = raw.decode("utf-8", errors="replace")
                if not line.strip():
                    continue
                where = f"{path}:{line_number}"
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: invalid JSON ({e.msg})") from None


def iter_conversations(source: str, max_conversations: int = 0) -> Iterator[tuple[str, list[dict]]]:
    """(where, messages) for each conversation of the .jsonl files of `source` (comma-separated
    files/directories), checked: a non-empty list of {role, content} with string values."""
    count = 0
    for where, record in iter_jsonl(source, "chat"):
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: expected an object with a non-empty 'messages' list")
        for m in messages:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)):
                raise ValueError(  # noqa: TRY004 - bad data, not a bad argument
                    f"{where}: each message needs string 'role' and 'content', "
                    f"got {str(m)[:80]}")
        yield where, [{"role": m["role"], "content": m["content"]} for m in messages]
        count += 1
        if max_conversations and count >= max_conversations:
            return


# ----------------------------------------------------------------------------- rendering


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...} in older tokenizer_config.json files
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_tokens(tokenizer: Tokenizer, tokenizer_spec: str | None) -> tuple[str, str]:
    """(bos_token, eos_token) texts for the template: tokenizer_config.json's, else the usual names."""
    bos = eos = None
    if tokenizer_spec:
        path = os.path.expanduser(tokenizer_spec)
        config = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "tokenizer_config.json")
        if os.path.isfile(config):
            with open(config) as f:
                tc = json.load(f)
            bos, eos = _token_text(tc.get("bos_token")), _token_text(tc.get("eos_token"))
    return (bos if bos is not None else token_text(tokenizer, first_token_id(tokenizer, BOS_CANDIDATES)),
            eos if eos is not None else token_text(tokenizer, first_token_id(tokenizer, EOS_CANDIDATES)))


class ChatRenderer:
    """Renders conversations with a chat template (lmsys.data.chat_template's ChatTemplate
    environment, or DEFAULT_CHAT_TEMPLATE) and finds the trainable character spans."""

    def __init__(self, template: str | None, bos_token: str = "", eos_token: str = ""):
        self.source = template or DEFAULT_CHAT_TEMPLATE
        self._chat = ChatTemplate(self.source, bos_token, eos_token)

    def render(self, messages: list[dict], add_generation_prompt: bool, where: str = "") -> str:
        c = self._chat
        try:
            return c.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=c.bos_token, eos_token=c.eos_token)
        except Exception as e:  # noqa: BLE001 - any template error is this conversation's problem
            message = getattr(e, "message", None) or str(e)
            raise ValueError(f"{where}: the chat template failed on this conversation: {message}") from None

    def spans(self, messages: list[dict], where: str = "") -> tuple[str, list[tuple[int, int, int]]]:
        """(text, [(content_start, content_end, turn_end)]) per assistant message: its content's
        characters, and where its turn (incl. an end-of-turn token) ends."""
        text = self.render(messages, False, where)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], True, where)
            through = self.render(messages[: i + 1], False, where)
            if not (through.startswith(before) and text.startswith(through)):
                raise ValueError(
                    f"{where}: the chat template does not render this conversation incrementally "
                    f"(message {i}'s prefix is not a prefix of the whole), so assistant tokens "
                    f"cannot be found; use a template that renders turns in order")
            turn = through[len(before):]
            content = m["content"]
            k = turn.find(content) if content else -1
            if k < 0 and content.strip():
                content = content.strip()  # templates that trim contents
                k = turn.find(content)
            if k < 0:  # the template rewrote the content: train on the whole turn
                k, content = 0, turn
            start = len(before) + k
            spans.append((start, start + len(content), len(through)))
        return text, spans


def _mask_tokens(offsets: list[tuple[int, int]], ids: list[int], spans, special_ids: set[int]) -> np.ndarray:
    """1 on tokens overlapping an assistant content span, and on the first special token after
    the content inside its turn (the end-of-turn token)."""
    mask = np.zeros(len(ids), np.uint8)
    if not spans:
        return mask
    starts = np.array([o[0] for o in offsets])
    ends = np.array([o[1] for o in offsets])
    for c0, c1, turn_end in spans:
        mask[(starts < c1) & (ends > c0) & (ends > starts)] = 1
        for j in np.nonzero((starts >= c1) & (starts < turn_end))[0]:
            if ids[j] in special_ids:
                mask[j] = 1
                break
    return mask


def tokenize_conversations(conversations: Iterator[tuple[str, list[dict]]], tokenizer: Tokenizer,
                           renderer: ChatRenderer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, labels, conv_starts): all conversations in one stream; labels[j] is 1 where token
    j is trained on (assistant content / end of turn). Conversations without a trainable token
    are dropped."""
    dtype = _token_dtype(tokenizer)
    special_ids = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    tokens, labels, lengths = [], [], []
    chunk: list[tuple[str, list]] = []

    def flush():
        encodings = tokenizer.encode_batch([text for text, _ in chunk], add_special_tokens=False)
        for (_, spans), enc in zip(chunk, encodings):
            mask = _mask_tokens(enc.offsets, enc.ids, spans, special_ids)
            if mask[1:].any():  # the first token is never a target
                tokens.append(np.asarray(enc.ids, dtype))
                labels.append(mask)
                lengths.append(len(enc.ids))
        chunk.clear()

    dropped = 0
    for where, messages in conversations:
        text, spans = renderer.spans(messages, where)
        if not spans:
            dropped += 1
            continue
        chunk.append((text, spans))
        if len(chunk) == _ENCODE_CHUNK:
            flush()
    if chunk:
        flush()
    if dropped:
        logger.warning("skipped %d conversations without an assistant message", dropped)
    if not tokens:
        raise ValueError("no conversation has an assistant message to train on")
    lengths = np.array(lengths, np.int64)
    return np.concatenate(tokens), np.concatenate(labels), np.cumsum(lengths) - lengths


# ----------------------------------------------------------------------------- packing


def _pack_rows(conv_starts: np.ndarray, num_tokens: int, seq_len: int) -> np.ndarray:
    """First conversation of each row (next-fit; a conversation of n tokens takes n-1 slots, at
    most seq_len); returns row_starts with a final sentinel = number of conversations."""
    lengths = np.diff(np.append(conv_starts, num_tokens))
    slots = np.minimum(lengths - 1, seq_len)
    row_starts, used = [0], 0
    for c, n in enumerate(slots):
        if used + n > seq_len:
            row_starts.append(c)
            used = 0
        used += n
    row_starts.append(len(slots))
    return np.array(row_starts, np.int64)


class ChatDataset(RowDataset):
    """Whole conversations packed into rows of `seq_len`; an infinite, seeded sequence of samples
    with PackedDataset's interface (`batch`, `sample`, `row`)."""

    def __init__(self, tokens: np.ndarray, labels: np.ndarray, conv_starts: np.ndarray,
                 tokenizer: Tokenizer, seq_len: int, seed: int, shuffle: bool = True, *,
                 source: str = "", sha256: str | None = None):
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self._tokens, self._labels, self._conv_starts = tokens, labels, conv_starts
        self._ends = np.append(conv_starts[1:], len(tokens))
        self._tokenizer, self._seq_len = tokenizer, seq_len
        self._pad = fill_id(tokenizer)
        self._row_starts = _pack_rows(conv_starts, len(tokens), seq_len)
        self._source, self._sha256 = source, sha256
        self._start_sampling(seed, shuffle)

    def _content(self) -> tuple[np.ndarray, ...]:
        return self._tokens, self._labels, self._conv_starts

    @property
    def num_rows(self) -> int:
        return len(self._row_starts) - 1

    @property
    def num_documents(self) -> int:
        return len(self._conv_starts)

    def row(self, index: int) -> Sample:
        """Row `index` (unshuffled) as arrays of shape [seq_len]."""
        if not 0 <= index < self.num_rows:
            raise IndexError(f"row {index} out of range [0, {self.num_rows})")
        T = self._seq_len
        out = {"tokens": np.full(T, self._pad, np.int32), "targets": np.full(T, self._pad, np.int32),
               "positions": np.zeros(T, np.int32), "segment_ids": np.zeros(T, np.int32),
               "loss_mask": np.zeros(T, np.float32)}
        at = 0
        for segment, c in enumerate(range(self._row_starts[index], self._row_starts[index + 1]), 1):
            start = self._conv_starts[c]
            end = min(self._ends[c], start + T + 1)
            x = np.asarray(self._tokens[start:end], np.int32)
            n = len(x) - 1
            out["tokens"][at:at + n] = x[:-1]
            out["targets"][at:at + n] = x[1:]
            out["positions"][at:at + n] = np.arange(n)
            out["segment_ids"][at:at + n] = segment
            out["loss_mask"][at:at + n] = self._labels[start + 1:end]
            at += n
        return out


def build_chat_dataset(source: str, tokenizer: Tokenizer, chat_template: str | None, seq_len: int,
                       seed: int, *, tokenizer_spec: str | None = None, max_conversations: int = 0,
                       cache_dir: str | None = None, shuffle: bool = True) -> ChatDataset:
    """Renders and tokenizes the conversations of `source` (cached under `cache_dir`) and packs
    them into a ChatDataset. `chat_template` None: DEFAULT_CHAT_TEMPLATE (lmsys.data.chat_template);
    `tokenizer_spec` (the tokenizer.json path) locates tokenizer_config.json's bos/eos tokens."""
    bos, eos = _special_tokens(tokenizer, tokenizer_spec)
    renderer = ChatRenderer(chat_template, bos, eos)
    key = cache_key("chat", source_fingerprint(source), tokenizer.to_str(), renderer.source, bos, eos,
                    max_conversations)
    directory = os.path.join(cache_root(cache_dir), "chat", key)
    names = ("tokens", "labels", "conv_starts")
    meta_path = os.path.join(directory, "meta.json")
    if not os.path.isfile(meta_path):
        begin = time.perf_counter()
        arrays = tokenize_conversations(iter_conversations(source, max_conversations), tokenizer, renderer)
        for name, array in zip(names, arrays):
            atomic_save_npy(os.path.join(directory, f"{name}.npy"), array)
        meta = {"source": source, "num_tokens": len(arrays[0]), "num_conversations": len(arrays[2])}
        atomic_write_text(meta_path, json.dumps(meta))
        logger.info("tokenized %d conversations into %d tokens in %.1fs (cached in %s)", len(arrays[2]),
                    len(arrays[0]), time.perf_counter() - begin, directory)
    tokens, labels = (np.load(os.path.join(directory, f"{n}.npy"), mmap_mode="r") for n in names[:2])
    conv_starts = np.load(os.path.join(directory, "conv_starts.npy"))
    sha256 = cached_sha256(meta_path, (tokens, labels, conv_starts))
    return ChatDataset(tokens, labels, conv_starts, tokenizer, seq_len, seed, shuffle, source=source,
                       sha256=sha256)
