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


def _tokenizer_file(spec: str) -> str:
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
        tokenizer = Tokenizer.from_file(_tokenizer_file(spec))
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
