"""The held-out split of a text source, by document, and evaluation rows with their byte counts.

A document is held out when a hash of its text falls below `fraction`: deterministic,
independent of the seed, the shuffle and the number of processes, and identical documents are
always on the same side (no copy of a held-out document is trained on). `build_dataset(...,
holdout=f)` trains on the rest; `eval_rows` packs evaluation documents into rows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer

from lmsys.data.packing import PackedDataset
from lmsys.data.tokenizer import eos_id


def is_heldout(text: str, fraction: float) -> bool:
    """Whether a document belongs to the held-out `fraction` of its source."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(b"lmsys-heldout\0" + text.encode("utf-8", errors="replace")).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < fraction


def split_documents(documents: Iterable[str], fraction: float, heldout: bool) -> Iterator[str]:
    """The held-out documents (`heldout=True`) or the training ones."""
    return (d for d in documents if is_heldout(d, fraction) == heldout)


def _token_bytes(text: str, ends: list[int]) -> np.ndarray:
    """UTF-8 bytes per token from the tokens' end character offsets: token j covers the text
    between the furthest end before it and its own, so the counts sum to the text's UTF-8
    length (when the last token ends the text) whatever the tokenizer."""
    code_points = np.frombuffer(text.encode("utf-32-le", errors="replace"), np.uint32)
    char_bytes = 1 + (code_points >= 0x80) + (code_points >= 0x800) + (code_points >= 0x10000)
    cum = np.concatenate([[0], np.cumsum(char_bytes)])
    reach = np.maximum.accumulate(np.asarray(ends, np.int64)) if ends else np.zeros(0, np.int64)
    return np.diff(cum[np.concatenate([[0], reach])])


class EvalRows(PackedDataset):
    """Documents packed into rows of seq_len, unshuffled; each document follows an end-of-text
    token, so its first token is predicted too, and within the document only (the loss mask
    drops targets in another document). `target_bytes(rows)` counts the UTF-8 bytes of the text
    the masked-in targets of those rows stand for (bits per byte)."""

    def __init__(self, tokens, doc_starts, byte_counts, tokenizer, seq_len: int):
        super().__init__(tokens, doc_starts, tokenizer, seq_len, seed=0, shuffle=False)
        self._bytes = byte_counts

    def target_bytes(self, first_row: int, n_rows: int) -> int:
        total = 0
        for index in range(first_row, first_row + n_rows):
            start = index * self.seq_len
            mask = self.row(index)["loss_mask"] > 0
            total += int(self._bytes[start + 1:start + 1 + self.seq_len][mask].sum())
        return total


def eval_rows(documents: Iterable[str], tokenizer: Tokenizer, seq_len: int, rows: int) -> EvalRows:
    """The first `rows` rows (fewer when the documents run out) of `documents` for evaluation."""
    eos = eos_id(tokenizer)
    tokens, starts, counts, total = [], [], [], 0
    need = rows * seq_len + 1
    for text in documents:
        if not text:
            continue
        enc = tokenizer.encode(text, add_special_tokens=False)
        if not enc.ids:
            continue
        starts.append(total)
        tokens += [eos] + enc.ids
        counts.append(np.concatenate([[0], _token_bytes(text, [e for _, e in enc.offsets])]))
        total += len(enc.ids) + 1
        if total >= need:
            break
    if total < seq_len + 1:
        raise ValueError(f"the evaluation documents hold {total} tokens, fewer than one row of "
                         f"seq_len + 1 = {seq_len + 1}")
    usable = min(need, total)
    return EvalRows(np.asarray(tokens[:usable], np.int32), np.asarray(starts, np.int64),
                    np.concatenate(counts)[:usable], tokenizer, seq_len)
