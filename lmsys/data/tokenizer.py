"""Tokenizers: a byte-level BPE trained on a corpus (cached), or a tokenizer.json from disk."""

import os
from collections.abc import Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmsys.data.cache import atomic_write_text, cache_key, cache_root
from lmsys.data.corpus import iter_documents, source_fingerprint

BUILTIN = "builtin"
ENDOFTEXT = "<|endoftext|>"
PAD = "<|pad|>"
EOS_CANDIDATES = (ENDOFTEXT, "</s>", "<|end_of_text|>", "<|im_end|>", "<eos>")
PAD_CANDIDATES = (PAD, "<pad>", "[PAD]")
BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
# A tokenizer's files in a model directory: the vocabulary, and beside it what says its special
# tokens and chat template. A run directory holds its own copies (lmsys.train.run_dir).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json")


def _train_bpe(documents: Iterator[str], vocab_size: int) -> Tokenizer:
    """Trains a byte-level BPE with <|endoftext|> (id 0) and <|pad|> (id 1)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return tokenizer


def _builtin_tokenizer(
    vocab_size: int, source: str, cache_dir: str | None, max_documents: int, text_field: str
) -> Tokenizer:
    """Loads the trained BPE from the cache, training and caching it on a miss."""
    key = cache_key("bpe", source_fingerprint(source), vocab_size, max_documents, text_field)
    path = os.path.join(cache_root(cache_dir), "tokenizers", key, "tokenizer.json")
    if os.path.isfile(path):
        return Tokenizer.from_file(path)
    tokenizer = _train_bpe(iter_documents(source, text_field, max_documents), vocab_size)
    atomic_write_text(path, tokenizer.to_str())
    return tokenizer


def copy_tokenizer_files(src_dir, out_dir) -> list[str]:
    """Copies the tokenizer files (TOKENIZER_FILES) found in `src_dir` into `out_dir` (a local
    path, or an etils.epath.Path for a URL); returns their names."""
    from pathlib import Path

    out = out_dir if hasattr(out_dir, "joinpath") else Path(out_dir)
    copied = []
    for name in TOKENIZER_FILES:
        src, dst = Path(src_dir) / name, out / name
        if src.is_file() and not (isinstance(dst, Path) and dst.exists() and os.path.samefile(src, dst)):
            dst.write_bytes(src.read_bytes())
        if src.is_file():
            copied.append(name)
    return copied


def tokenizer_file(spec: str) -> str:
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"tokenizer {spec!r}: no such tokenizer.json file (give '{BUILTIN}', a tokenizer.json "
            "file or a directory containing one)"
        )
    return path


def load_tokenizer(
    spec: str,
    vocab_size: int,
    source: str = "builtin",
    cache_dir: str | None = None,
    max_documents: int = 0,
    *,
    text_field: str = "text",
) -> Tokenizer:
    """Returns the tokenizer named by `spec`, checking it fits a model with `vocab_size` tokens.

    `spec` is "builtin" (a byte-level BPE of `vocab_size` tokens trained on `source` and cached
    under `cache_dir`) or a path to a tokenizer.json file or a directory containing one.
    """
    if spec == BUILTIN:
        tokenizer = _builtin_tokenizer(vocab_size, source, cache_dir, max_documents, text_field)
    else:
        tokenizer = Tokenizer.from_file(tokenizer_file(spec))
    return _check_size(tokenizer, spec, vocab_size)


def tokenizer_from_json(data: bytes, spec: str, vocab_size: int) -> Tokenizer:
    """A tokenizer from the bytes of a tokenizer.json (`spec` names it in errors), checked to fit
    a model with `vocab_size` tokens: for readers that hash what they load."""
    try:
        tokenizer = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # noqa: BLE001 - tokenizers raises bare Exceptions; bad UTF-8 too
        raise ValueError(f"tokenizer {spec} is not a valid tokenizer.json ({str(e)[:200]})") from None
    return _check_size(tokenizer, spec, vocab_size)


def tokenizer_sha256(tokenizer: Tokenizer) -> str:
    """sha256 of a tokenizer's canonical JSON (the same for the same vocabulary, merges and
    special tokens, however its file was formatted)."""
    import hashlib

    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()


def _check_size(tokenizer: Tokenizer, spec: str, vocab_size: int) -> Tokenizer:
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:
        raise ValueError(
            f"tokenizer {spec} has {size} tokens but model.vocab_size is {vocab_size}; "
            f"set model.vocab_size >= {size}"
        )
    return tokenizer


def tokenizer_for(data, vocab_size: int) -> Tokenizer:
    """The tokenizer a config's data section names (`data`: an lmsys.config.DataConfig)."""
    return load_tokenizer(data.tokenizer, vocab_size, source=data.source,
                          cache_dir=data.cache_dir or None, max_documents=data.max_documents,
                          text_field=data.text_field)


def first_token_id(tokenizer: Tokenizer, candidates: tuple[str, ...]) -> int | None:
    """The id of the first of `candidates` (EOS_CANDIDATES, PAD_CANDIDATES, BOS_CANDIDATES...)
    that the tokenizer has; None if it has none. `tokenizer.id_to_token(id)` is its text."""
    for token in candidates:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    return None


def eos_id(tokenizer: Tokenizer) -> int:
    """The end-of-document token id (<|endoftext|>, </s>, <|end_of_text|>, <|im_end|> or <eos>)."""
    token_id = first_token_id(tokenizer, EOS_CANDIDATES)
    if token_id is None:
        raise ValueError(
            f"tokenizer has no end-of-text token; looked for {', '.join(EOS_CANDIDATES)}"
        )
    return token_id


def pad_id(tokenizer: Tokenizer) -> int:
    """The padding token id (<|pad|>, <pad> or [PAD]), else the end-of-text id."""
    token_id = first_token_id(tokenizer, PAD_CANDIDATES)
    return eos_id(tokenizer) if token_id is None else token_id


def fill_id(tokenizer: Tokenizer) -> int:
    """The id of a row's loss-masked filler positions: `pad_id`, or 0 for a tokenizer with
    neither a padding nor an end-of-text token."""
    try:
        return pad_id(tokenizer)
    except ValueError:
        return 0
