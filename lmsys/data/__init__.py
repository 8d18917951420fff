"""Data pipeline: document sources, tokenizers, token cache and packed, shuffled batches."""

from lmsys.data.chat import ChatDataset, build_chat_dataset
from lmsys.data.corpus import builtin_corpus_files, iter_documents
from lmsys.data.packing import PackedDataset, build_dataset, tokenize_documents
from lmsys.data.tokenizer import eos_id, load_tokenizer, pad_id, tokenizer_for

__all__ = [
    "ChatDataset",
    "PackedDataset",
    "build_chat_dataset",
    "build_dataset",
    "builtin_corpus_files",
    "eos_id",
    "iter_documents",
    "load_tokenizer",
    "tokenizer_for",
    "pad_id",
    "tokenize_documents",
]
