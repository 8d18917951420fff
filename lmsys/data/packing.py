"""Token cache and packing of documents into fixed-length rows, shuffled with Grain."""

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator

import grain
import numpy as np
from tokenizers import Tokenizer

from lmsys.data.cache import atomic_save_npy, atomic_write_text, cache_key, cache_root, cached_sha256
from lmsys.data.corpus import iter_documents, source_fingerprint
from lmsys.data.tokenizer import eos_id

logger = logging.getLogger(__name__)

_ENCODE_CHUNK_DOCUMENTS = 256
Sample = dict[str, np.ndarray]


def _token_dtype(tokenizer: Tokenizer) -> type[np.unsignedinteger]:
    return np.uint16 if tokenizer.get_vocab_size(with_added_tokens=True) <= 2**16 else np.uint32


def _chunks(documents: Iterator[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for document in documents:
        chunk.append(document)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def tokenize_documents(
    documents: Iterator[str], tokenizer: Tokenizer
) -> tuple[np.ndarray, np.ndarray]:
    """Encodes documents into one stream, EOS after each; returns (tokens, doc_starts).

    Empty documents are skipped. Special-token text inside documents is encoded as plain text.
    """
    eos, dtype = eos_id(tokenizer), _token_dtype(tokenizer)
    token_chunks: list[np.ndarray] = []
    doc_lengths: list[int] = []
    encode_special_tokens = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True
    try:
        for chunk in _chunks(documents, _ENCODE_CHUNK_DOCUMENTS):
            for encoding in tokenizer.encode_batch_fast(chunk, add_special_tokens=False):
                if encoding.ids:
                    token_chunks.append(np.array(encoding.ids + [eos], dtype=dtype))
                    doc_lengths.append(len(encoding.ids) + 1)
    finally:
        tokenizer.encode_special_tokens = encode_special_tokens
    tokens = np.concatenate(token_chunks) if token_chunks else np.zeros(0, dtype)
    lengths = np.array(doc_lengths, dtype=np.int64)
    return tokens, np.cumsum(lengths) - lengths


def _training_documents(source: str, text_field: str, max_documents: int, holdout: float):
    """The documents to train on: all of the source, or those outside its held-out split."""
    documents = iter_documents(source, text_field, max_documents)
    if holdout <= 0:
        return documents
    from lmsys.data.heldout import split_documents

    return split_documents(documents, holdout, heldout=False)


def _cached_token_stream(
    source: str, tokenizer: Tokenizer, text_field: str, max_documents: int, cache_dir: str | None,
    holdout: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Returns (tokens, doc_starts, their sha256) from the cache (tokens memory-mapped),
    tokenizing on a miss; with `holdout` > 0, without the held-out documents."""
    key = cache_key(
        "tokens", source_fingerprint(source), tokenizer.to_str(), text_field, max_documents,
        *([f"holdout={holdout!r}"] if holdout > 0 else []),
    )
    directory = os.path.join(cache_root(cache_dir), "tokens", key)
    tokens_path = os.path.join(directory, "tokens.npy")
    doc_starts_path = os.path.join(directory, "doc_starts.npy")
    meta_path = os.path.join(directory, "meta.json")
    if not os.path.isfile(meta_path):
        begin = time.perf_counter()
        tokens, doc_starts = tokenize_documents(
            _training_documents(source, text_field, max_documents, holdout), tokenizer
        )
        atomic_save_npy(tokens_path, tokens)
        atomic_save_npy(doc_starts_path, doc_starts)
        meta = {"source": source, "num_tokens": len(tokens), "num_documents": len(doc_starts)}
        atomic_write_text(meta_path, json.dumps(meta))
        logger.info(
            "tokenized %d documents into %d tokens in %.1fs (cached in %s)",
            len(doc_starts),
            len(tokens),
            time.perf_counter() - begin,
            directory,
        )
    tokens, doc_starts = np.load(tokens_path, mmap_mode="r"), np.load(doc_starts_path)
    return tokens, doc_starts, cached_sha256(meta_path, (tokens, doc_starts))


def _grain_seed(seed: int) -> int:
    """Hashes `seed` so nearby seeds don't share epochs (Grain reshuffles with seed + epoch)."""
    return int.from_bytes(hashlib.sha256(f"lmsys-shuffle-{seed}".encode()).digest()[:4], "little")


class RowDataset:
    """Rows of `seq_len` tokens drawn as an infinite, seeded sequence of samples: global sample
    `g` is a row picked by a per-epoch permutation (Grain), or row `g % num_rows` unshuffled, so
    batches depend only on global sample indices. Subclasses set `_tokens`, `_tokenizer`,
    `_seq_len`, give `num_rows` and `row(index)`, and call `_start_sampling`."""

    def _start_sampling(self, seed: int, shuffle: bool) -> None:
        rows = grain.MapDataset.range(self.num_rows)
        if shuffle:
            rows = rows.shuffle(seed=_grain_seed(seed))
        self._row_indices = rows.repeat()
        self._samples = self._row_indices.map(self.row)

    @property
    def num_rows(self) -> int:
        raise NotImplementedError

    def row(self, index: int) -> Sample:
        raise NotImplementedError

    @property
    def num_tokens(self) -> int:
        return len(self._tokens)

    def fingerprint(self) -> dict:
        """What global sample indices point at: the source, its document and token counts and a
        sha256 of the tokenized stream (so an edited corpus, or another tokenizer, differs).
        Recorded in checkpoints; a resume compares it."""
        if getattr(self, "_sha256", None) is None:
            from lmsys.data.cache import arrays_sha256

            self._sha256 = arrays_sha256(*self._content())
        return {"source": getattr(self, "_source", ""), "documents": int(self.num_documents),
                "tokens": int(self.num_tokens), "sha256": self._sha256}

    def _content(self) -> tuple[np.ndarray, ...]:
        raise NotImplementedError

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def seq_len(self) -> int:
        return self._seq_len

    def row_index(self, global_index: int) -> int:
        """The row that global sample `global_index` reads."""
        if global_index < 0:
            raise IndexError(f"global sample index must be >= 0, got {global_index}")
        return self._row_indices[global_index]

    def sample(self, global_index: int) -> Sample:
        """Global sample `global_index` (any index >= 0; later epochs are reshuffled)."""
        if global_index < 0:
            raise IndexError(f"global sample index must be >= 0, got {global_index}")
        return self._samples[global_index]

    def batch(
        self, start: int, global_batch_size: int, process_index: int = 0, process_count: int = 1
    ) -> dict[str, np.ndarray]:
        """This process's slice of the global batch of samples start .. start+global_batch_size-1.

        Process `p` gets samples start + p*b .. start + (p+1)*b - 1 where
        b = global_batch_size // process_count.
        """
        if global_batch_size < 1 or global_batch_size % process_count:
            raise ValueError(
                f"global batch size {global_batch_size} must be a positive multiple of "
                f"the process count {process_count}"
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        local_batch_size = global_batch_size // process_count
        first = start + process_index * local_batch_size
        samples = [self.sample(g) for g in range(first, first + local_batch_size)]
        return {key: np.stack([s[key] for s in samples]) for key in samples[0]}


class PackedDataset(RowDataset):
    """Documents packed into rows of `seq_len` tokens; an infinite, seeded sequence of samples.

    Row `i` covers stream tokens [i*seq_len, (i+1)*seq_len + 1): inputs are the first seq_len,
    targets the last seq_len. Global sample `g` is a row chosen by a seeded per-epoch permutation
    (or row `g % num_rows` without shuffling), so batches depend only on global sample indices.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        doc_starts: np.ndarray,
        tokenizer: Tokenizer,
        seq_len: int,
        seed: int,
        shuffle: bool = True,
        *,
        source: str = "",
        sha256: str | None = None,
    ):
        """`source` and `sha256` (of tokens and doc_starts; None: computed when asked) describe
        the data in `fingerprint()`."""
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        num_rows = (len(tokens) - 1) // seq_len
        if num_rows < 1:
            raise ValueError(
                f"the corpus has {len(tokens)} tokens, fewer than seq_len+1 = {seq_len + 1}; "
                "use more documents or a shorter seq_len"
            )
        self._tokens = tokens
        self._doc_starts = doc_starts
        self._tokenizer = tokenizer
        self._seq_len = seq_len
        self._num_rows = num_rows
        self._source, self._sha256 = source, sha256
        self._start_sampling(seed, shuffle)

    def _content(self) -> tuple[np.ndarray, ...]:
        return self._tokens, self._doc_starts

    @property
    def num_rows(self) -> int:
        return self._num_rows

    @property
    def num_documents(self) -> int:
        return len(self._doc_starts)

    def row(self, index: int) -> Sample:
        """Row `index` (unshuffled) as arrays of shape [seq_len]."""
        if not 0 <= index < self._num_rows:
            raise IndexError(f"row {index} out of range [0, {self._num_rows})")
        seq_len = self._seq_len
        start = index * seq_len
        offsets_T1 = np.arange(start, start + seq_len + 1)
        window_T1 = np.asarray(self._tokens[start : start + seq_len + 1], dtype=np.int32)
        doc_T1 = np.searchsorted(self._doc_starts, offsets_T1, side="right") - 1
        doc_T = doc_T1[:-1]
        segment_start_T = np.maximum(self._doc_starts[doc_T], start)
        return {
            "tokens": window_T1[:-1],
            "targets": window_T1[1:],
            "positions": (offsets_T1[:-1] - segment_start_T).astype(np.int32),
            "segment_ids": (doc_T - doc_T[0] + 1).astype(np.int32),
            "loss_mask": (doc_T == doc_T1[1:]).astype(np.float32),
        }

def build_dataset(
    source: str,
    tokenizer: Tokenizer,
    seq_len: int,
    seed: int,
    *,
    text_field: str = "text",
    max_documents: int = 0,
    cache_dir: str | None = None,
    shuffle: bool = True,
    holdout: float = 0.0,
) -> PackedDataset:
    """Tokenizes `source` (cached under `cache_dir`) and packs it into a PackedDataset; with
    `holdout` > 0, without the held-out documents (lmsys.data.heldout)."""
    tokens, doc_starts, sha256 = _cached_token_stream(
        source, tokenizer, text_field, max_documents, cache_dir, holdout
    )
    return PackedDataset(tokens, doc_starts, tokenizer, seq_len, seed, shuffle, source=source,
                         sha256=sha256)
