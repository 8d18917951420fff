"""Preference data for DPO: JSONL pairs rendered with the model's chat template like chat data
(lmsys.data.chat), one sequence per row, the chosen and the rejected answer of a pair in
consecutive rows.

    ds = build_preference_dataset("prefs.jsonl", tokenizer, chat_template, seq_len=1024, seed=0)
    ds.batch(0, 8)   # rows 0, 2, 4, 6: chosen; 1, 3, 5, 7: their rejected; loss_mask = the answer

Each line is `{"prompt": "...", "chosen": "...", "rejected": "..."}` (the prompt a user turn), or
`{"messages": [{role, content}, ...], "chosen": ..., "rejected": ...}` (the conversation so far);
`chosen` / `rejected` are a string (an assistant turn), a message, or a list of messages (TRL's
conversational format). Prompt + answer is rendered as one conversation; the answer's assistant
tokens (and its end-of-turn token) have loss mask 1: the tokens whose log-probabilities DPO sums.
A sequence longer than seq_len + 1 tokens is truncated at the end. Pairs are shuffled per epoch
(Grain); a batch of an even number of samples starting at an even index holds whole pairs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import grain
import numpy as np
from tokenizers import Tokenizer

from lmsys.data.cache import atomic_save_npy, atomic_write_text, cache_key, cache_root, cached_sha256
from lmsys.data.chat import ChatRenderer, _special_tokens, iter_jsonl, tokenize_conversations
from lmsys.data.corpus import source_fingerprint
from lmsys.data.packing import RowDataset, Sample, _grain_seed
from lmsys.data.tokenizer import fill_id


def _messages(value, key: str, where: str) -> list[dict]:
    if isinstance(value, str):
        value = [{"role": "assistant", "content": value}]
    elif isinstance(value, dict):
        value = [value]
    ok = isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)
    if not ok:
        raise ValueError(f"{where}: '{key}' must be a string, a {{role, content}} message or a list of them")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def iter_pairs(source: str, max_pairs: int = 0) -> Iterator[tuple[str, list[dict], list[dict], list[dict]]]:
    """(where, prompt messages, chosen messages, rejected messages) for each line of the .jsonl
    files of `source`, checked."""
    count = 0
    for where, record in iter_jsonl(source, "preference"):
        if not isinstance(record, dict) or not ({"prompt", "messages"} & record.keys()) \
                or not {"chosen", "rejected"} <= record.keys():
            raise ValueError(f"{where}: expected an object with 'prompt' (or 'messages'), 'chosen' "
                             f"and 'rejected'")
        if "messages" in record:
            prompt = _messages(record["messages"], "messages", where)
        elif isinstance(record["prompt"], str):
            prompt = [{"role": "user", "content": record["prompt"]}]
        else:
            prompt = _messages(record["prompt"], "prompt", where)
        yield (where, prompt, _messages(record["chosen"], "chosen", where),
               _messages(record["rejected"], "rejected", where))
        count += 1
        if max_pairs and count >= max_pairs:
            return


def _conversations(pairs) -> Iterator[tuple[str, list[dict]]]:
    for where, prompt, chosen, rejected in pairs:
        for answer in (chosen, rejected):
            if not any(m["role"] == "assistant" for m in answer):
                raise ValueError(f"{where}: an answer needs an assistant message")
            yield where, prompt + answer  # the prompt's own assistant turns are unmasked in `row`


class PreferenceDataset(RowDataset):
    """Sequences of `seq_len` (prompt + answer), chosen and rejected of pair i in rows 2i and
    2i+1; sample g is row 2 x pair(g // 2) + g % 2 with pairs in a seeded per-epoch order."""

    def __init__(self, tokens: np.ndarray, labels: np.ndarray, starts: np.ndarray, prompt_ends: np.ndarray,
                 tokenizer: Tokenizer, seq_len: int, seed: int, shuffle: bool = True, *, source: str = "",
                 sha256: str | None = None):
        self._tokens, self._labels, self._starts = tokens, labels, starts
        self._prompt_ends = prompt_ends
        self._ends = np.append(starts[1:], len(tokens))
        self._tokenizer, self._seq_len = tokenizer, seq_len
        self._pad = fill_id(tokenizer)
        self._source, self._sha256 = source, sha256
        pairs = grain.MapDataset.range(self.num_pairs)
        if shuffle:
            pairs = pairs.shuffle(seed=_grain_seed(seed))
        self._pair_indices = pairs.repeat()

    def _content(self) -> tuple[np.ndarray, ...]:
        return self._tokens, self._labels, self._starts

    @property
    def num_pairs(self) -> int:
        return len(self._starts) // 2

    @property
    def num_rows(self) -> int:
        return len(self._starts)

    @property
    def num_documents(self) -> int:
        return self.num_pairs

    def row_index(self, global_index: int) -> int:
        if global_index < 0:
            raise IndexError(f"global sample index must be >= 0, got {global_index}")
        return 2 * int(self._pair_indices[global_index // 2]) + global_index % 2

    def sample(self, global_index: int) -> Sample:
        return self.row(self.row_index(global_index))

    def row(self, index: int) -> Sample:
        """Row `index` (sequence `index`: pair index // 2, chosen when even) as [seq_len] arrays."""
        if not 0 <= index < self.num_rows:
            raise IndexError(f"row {index} out of range [0, {self.num_rows})")
        T = self._seq_len
        start = self._starts[index]
        end = min(self._ends[index], start + T + 1)
        x = np.asarray(self._tokens[start:end], np.int32)
        n = len(x) - 1
        out = {"tokens": np.full(T, self._pad, np.int32), "targets": np.full(T, self._pad, np.int32),
               "positions": np.zeros(T, np.int32), "segment_ids": np.zeros(T, np.int32),
               "loss_mask": np.zeros(T, np.float32)}
        out["tokens"][:n], out["targets"][:n] = x[:-1], x[1:]
        out["positions"][:n], out["segment_ids"][:n] = np.arange(n), 1
        labels = np.array(self._labels[start + 1:end], np.float32)
        labels[: max(int(self._prompt_ends[index]) - start - 1, 0)] = 0  # the prompt's own turns
        out["loss_mask"][:n] = labels
        return out


def build_preference_dataset(source: str, tokenizer: Tokenizer, chat_template: str | None, seq_len: int,
                             seed: int, *, tokenizer_spec: str | None = None, max_pairs: int = 0,
                             cache_dir: str | None = None, shuffle: bool = True) -> PreferenceDataset:
    """Renders and tokenizes the pairs of `source` (cached under `cache_dir`) into a
    PreferenceDataset; the chat template and special tokens as in build_chat_dataset."""
    bos, eos = _special_tokens(tokenizer, tokenizer_spec)
    renderer = ChatRenderer(chat_template, bos, eos)
    key = cache_key("preference", source_fingerprint(source), tokenizer.to_str(), renderer.source, bos, eos,
                    max_pairs)
    directory = os.path.join(cache_root(cache_dir), "preference", key)
    names = ("tokens", "labels", "starts", "prompt_ends")
    meta_path = os.path.join(directory, "meta.json")
    if not os.path.isfile(meta_path):
        pairs = list(iter_pairs(source, max_pairs))
        if not pairs:
            raise ValueError(f"data.source={source!r} holds no preference pairs")
        tokens, labels, starts = tokenize_conversations(_conversations(pairs), tokenizer, renderer)
        if len(starts) != 2 * len(pairs):
            raise ValueError("some answers have no trainable token after rendering; check the chat template")
        # where each sequence's answer begins: the prompt rendered with a generation prompt
        prompts = [renderer.render(p, True, w) for w, p, _, _ in pairs]
        lengths = [len(e.ids) for e in tokenizer.encode_batch(prompts, add_special_tokens=False)]
        prompt_ends = starts + np.repeat(np.array(lengths, np.int64), 2)
        for name, array in zip(names, (tokens, labels, starts, prompt_ends)):
            atomic_save_npy(os.path.join(directory, f"{name}.npy"), array)
        atomic_write_text(meta_path, json.dumps({"source": source, "num_pairs": len(pairs)}))
    tokens, labels = (np.load(os.path.join(directory, f"{n}.npy"), mmap_mode="r") for n in names[:2])
    starts, prompt_ends = (np.load(os.path.join(directory, f"{n}.npy")) for n in names[2:])
    sha256 = cached_sha256(meta_path, (tokens, labels, starts))
    return PreferenceDataset(tokens, labels, starts, prompt_ends, tokenizer, seq_len, seed, shuffle,
                             source=source, sha256=sha256)
