"""Tests for lmsys.data: corpus reading, tokenizers, token cache, packing, shuffling, sharding."""

import json
import os
import pathlib
import re

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

import lmsys.data.packing
import lmsys.data.tokenizer
from lmsys.data import (
    build_dataset,
    builtin_corpus_files,
    eos_id,
    iter_documents,
    load_tokenizer,
    pad_id,
)

BUILTIN_DOCS = 40
BUILTIN_VOCAB = 512
WORDS = ["</s>", "<pad>", "a", "b", "c", "d", "e", "f", "g"]  # ids 0..8


def _word_tokenizer(directory: pathlib.Path, words: list[str] = WORDS) -> pathlib.Path:
    """Saves a whitespace word-level tokenizer (HF tokenizer.json format) in `directory`."""
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


def _tiny_corpus(directory: pathlib.Path) -> pathlib.Path:
    """a.txt: 'a b c d'; b.jsonl: 'e f', 'g'. Token stream: 2 3 4 5 0 | 6 7 0 | 8 0."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "a.txt").write_text("a b c d")
    records = [{"text": "e f", "id": 1}, {"text": "g", "id": 2}]
    (directory / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return directory


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def builtin_tokenizer(cache_dir: str) -> Tokenizer:
    return load_tokenizer("builtin", BUILTIN_VOCAB, cache_dir=cache_dir, max_documents=BUILTIN_DOCS)


@pytest.fixture(scope="module")
def builtin_dataset_args(cache_dir: str, builtin_tokenizer: Tokenizer) -> dict:
    return dict(
        source="builtin",
        tokenizer=builtin_tokenizer,
        seq_len=64,
        max_documents=BUILTIN_DOCS,
        cache_dir=cache_dir,
    )


@pytest.fixture
def word_tokenizer(tmp_path: pathlib.Path) -> Tokenizer:
    return load_tokenizer(str(_word_tokenizer(tmp_path / "hf")), vocab_size=len(WORDS))


# Corpus


def test_builtin_corpus_files() -> None:
    files = builtin_corpus_files()
    assert len(files) > 500
    assert files == sorted(files)
    assert all(f.endswith(".py") for f in files)
    assert not any("site-packages" in f or "dist-packages" in f for f in files)
    assert os.path.join(os.path.dirname(os.__file__), "os.py") in files


def test_iter_documents_builtin_limit() -> None:
    documents = list(iter_documents("builtin", max_documents=3))
    files = builtin_corpus_files()[:3]
    assert documents == [pathlib.Path(f).read_bytes().decode("utf-8", "replace") for f in files]


def test_iter_documents_files_and_directories(tmp_path: pathlib.Path) -> None:
    corpus = _tiny_corpus(tmp_path / "corpus")
    (corpus / "sub").mkdir()
    (corpus / "sub" / "c.md").write_text("# md")
    (corpus / "ignored.csv").write_text("x,y")
    assert list(iter_documents(str(corpus))) == ["a b c d", "e f", "g", "# md"]
    files = f"{corpus / 'b.jsonl'}, {corpus / 'a.txt'}"
    assert list(iter_documents(files)) == ["e f", "g", "a b c d"]
    assert list(iter_documents(files, max_documents=1)) == ["e f"]


def test_iter_documents_text_field(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"body": "x"}\n\n{"body": "y"}\n')
    assert list(iter_documents(str(path), text_field="body")) == ["x", "y"]


def test_missing_path_raises(tmp_path: pathlib.Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.txt.*does not exist"):
        list(iter_documents(str(tmp_path / "nope.txt")))


def test_bad_jsonl_raises(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        list(iter_documents(str(bad)))
    bad.write_text('{"text": "ok"}\n{"content": "x"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: record has no field 'text'"):
        list(iter_documents(str(bad)))


# Tokenizer


def test_builtin_tokenizer(builtin_tokenizer: Tokenizer) -> None:
    assert builtin_tokenizer.get_vocab_size() <= BUILTIN_VOCAB
    assert eos_id(builtin_tokenizer) == 0 and pad_id(builtin_tokenizer) == 1
    snippet = 'def f(x: int) -> str:\n    """Dö ✓."""\n\treturn {"k": [x ** 2]}\n'
    ids = builtin_tokenizer.encode(snippet).ids
    assert len(ids) < len(snippet.encode())
    assert builtin_tokenizer.decode(ids) == snippet


def test_builtin_tokenizer_cached(
    cache_dir: str, builtin_tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert list(pathlib.Path(cache_dir).glob("tokenizers/*/tokenizer.json"))

    def no_training(*args: object) -> None:
        raise AssertionError("tokenizer retrained instead of loaded from cache")

    monkeypatch.setattr(lmsys.data.tokenizer, "_train_bpe", no_training)
    again = load_tokenizer(
        "builtin", BUILTIN_VOCAB, cache_dir=cache_dir, max_documents=BUILTIN_DOCS
    )
    assert again.get_vocab() == builtin_tokenizer.get_vocab()


def test_tokenizer_from_file_and_directory(tmp_path: pathlib.Path) -> None:
    directory = _word_tokenizer(tmp_path / "hf")
    for spec in (directory, directory / "tokenizer.json"):
        tokenizer = load_tokenizer(str(spec), vocab_size=16)
        assert tokenizer.encode("a g").ids == [2, 8]
        assert eos_id(tokenizer) == 0 and pad_id(tokenizer) == 1


def test_tokenizer_larger_than_model_vocab_raises(tmp_path: pathlib.Path) -> None:
    directory = _word_tokenizer(tmp_path / "hf")
    message = re.escape(
        f"tokenizer {directory} has 9 tokens but model.vocab_size is 5; set model.vocab_size >= 9"
    )
    with pytest.raises(ValueError, match=message):
        load_tokenizer(str(directory), vocab_size=5)


def test_tokenizer_errors(tmp_path: pathlib.Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such tokenizer.json"):
        load_tokenizer(str(tmp_path), vocab_size=100)
    no_eos = load_tokenizer(str(_word_tokenizer(tmp_path / "x", ["a", "b"])), vocab_size=100)
    with pytest.raises(ValueError, match="no end-of-text token"):
        eos_id(no_eos)


# Packing


def test_packed_rows_exact(tmp_path: pathlib.Path, word_tokenizer: Tokenizer) -> None:
    corpus = _tiny_corpus(tmp_path / "corpus")
    ds = build_dataset(
        str(corpus), word_tokenizer, seq_len=3, seed=0, cache_dir=tmp_path, shuffle=False
    )
    assert (ds.num_tokens, ds.num_rows, ds.seq_len) == (10, 3, 3)
    assert ds.tokenizer is word_tokenizer
    expected = {  # stream: 2 3 4 5 0 | 6 7 0 | 8 0
        "tokens": [[2, 3, 4], [5, 0, 6], [7, 0, 8]],
        "targets": [[3, 4, 5], [0, 6, 7], [0, 8, 0]],
        "positions": [[0, 1, 2], [0, 1, 0], [0, 1, 0]],
        "segment_ids": [[1, 1, 1], [1, 1, 2], [1, 1, 2]],
        "loss_mask": [[1, 1, 1], [1, 0, 1], [1, 0, 1]],
    }
    batch = ds.batch(0, 3)
    dtypes = {"loss_mask": np.float32}
    for key, value in expected.items():
        np.testing.assert_array_equal(batch[key], value, err_msg=key)
        assert batch[key].dtype == dtypes.get(key, np.int32), key
    # Same corpus given as a comma-separated file list packs identically.
    files = f"{corpus / 'a.txt'},{corpus / 'b.jsonl'}"
    same = build_dataset(
        files, word_tokenizer, seq_len=3, seed=0, cache_dir=tmp_path, shuffle=False
    )
    np.testing.assert_array_equal(same.batch(0, 3)["tokens"], expected["tokens"])


def test_row_invariants(builtin_dataset_args: dict) -> None:
    ds = build_dataset(**builtin_dataset_args, seed=0)
    eos = eos_id(ds.tokenizer)
    for index in range(ds.num_rows):
        row = ds.row(index)
        np.testing.assert_array_equal(row["targets"][:-1], row["tokens"][1:])
        # The loss is masked exactly where the input is a document's final EOS.
        np.testing.assert_array_equal(row["loss_mask"] == 0, row["tokens"] == eos)
        new_segment = np.diff(row["segment_ids"]) == 1
        np.testing.assert_array_equal(new_segment, row["tokens"][:-1] == eos)
        np.testing.assert_array_equal(row["positions"][1:][new_segment], 0)
        assert row["segment_ids"][0] == 1 and row["positions"][0] == 0


def test_token_cache(
    tmp_path: pathlib.Path, builtin_dataset_args: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = build_dataset(**builtin_dataset_args, seed=0)
    files = list(pathlib.Path(builtin_dataset_args["cache_dir"]).glob("tokens/*/tokens.npy"))
    assert len(files) == 1 and np.load(files[0], mmap_mode="r").dtype == np.uint16

    def no_tokenizing(*args: object) -> None:
        raise AssertionError("documents re-tokenized instead of loaded from cache")

    monkeypatch.setattr(lmsys.data.packing, "tokenize_documents", no_tokenizing)
    second = build_dataset(**builtin_dataset_args, seed=0)
    assert second.num_tokens == first.num_tokens
    np.testing.assert_array_equal(second.batch(0, 4)["tokens"], first.batch(0, 4)["tokens"])


def test_special_token_text_is_plain_text(
    tmp_path: pathlib.Path, builtin_tokenizer: Tokenizer
) -> None:
    (tmp_path / "doc.txt").write_text("x = '<|endoftext|>'\n" * 4)
    ds = build_dataset(str(tmp_path / "doc.txt"), builtin_tokenizer, 4, 0, cache_dir=tmp_path)
    tokens = np.concatenate([ds.row(i)["tokens"] for i in range(ds.num_rows)])
    assert eos_id(builtin_tokenizer) not in tokens


def test_corpus_too_short_raises(tmp_path: pathlib.Path, word_tokenizer: Tokenizer) -> None:
    corpus = _tiny_corpus(tmp_path / "corpus")
    with pytest.raises(ValueError, match="corpus has 10 tokens, fewer than seq_len"):
        build_dataset(str(corpus), word_tokenizer, seq_len=10, seed=0, cache_dir=tmp_path)


# Shuffling and sharding


def _row_order(ds: lmsys.data.PackedDataset, start: int, count: int) -> list[int]:
    return [ds.row_index(g) for g in range(start, start + count)]


def test_shuffle_is_a_seeded_permutation_per_epoch(builtin_dataset_args: dict) -> None:
    ds = build_dataset(**builtin_dataset_args, seed=0)
    n = ds.num_rows
    epoch0, epoch1 = _row_order(ds, 0, n), _row_order(ds, n, n)
    assert sorted(epoch0) == list(range(n)) and sorted(epoch1) == list(range(n))
    assert epoch0 != list(range(n)) and epoch1 != epoch0
    for g in (0, 1, n + 5):
        np.testing.assert_array_equal(ds.sample(g)["tokens"], ds.row(ds.row_index(g))["tokens"])
    same = build_dataset(**builtin_dataset_args, seed=0)
    assert _row_order(same, 0, n) == epoch0
    other = build_dataset(**builtin_dataset_args, seed=1)
    assert _row_order(other, 0, n) not in (epoch0, epoch1)
    unshuffled = build_dataset(**builtin_dataset_args, seed=0, shuffle=False)
    assert _row_order(unshuffled, 0, 2 * n) == list(range(n)) * 2


def test_batches_deterministic(builtin_dataset_args: dict) -> None:
    a = build_dataset(**builtin_dataset_args, seed=7).batch(40, 8)
    b = build_dataset(**builtin_dataset_args, seed=7).batch(40, 8)
    c = build_dataset(**builtin_dataset_args, seed=8).batch(40, 8)
    assert a.keys() == b.keys() == {"tokens", "targets", "positions", "segment_ids", "loss_mask"}
    for key in a:
        assert a[key].shape == (8, 64)
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["tokens"], c["tokens"])


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_sharding(builtin_dataset_args: dict, process_count: int) -> None:
    ds = build_dataset(**builtin_dataset_args, seed=3)
    full = ds.batch(13, 8)
    shards = [ds.batch(13, 8, p, process_count) for p in range(process_count)]
    for key, value in full.items():
        assert all(s[key].shape == (8 // process_count, 64) for s in shards)
        np.testing.assert_array_equal(np.concatenate([s[key] for s in shards]), value)


def test_bad_batch_arguments(builtin_dataset_args: dict) -> None:
    ds = build_dataset(**builtin_dataset_args, seed=0)
    with pytest.raises(ValueError, match="multiple of the process count 4"):
        ds.batch(0, 6, 0, 4)
    with pytest.raises(ValueError, match="process_index 2"):
        ds.batch(0, 4, 2, 2)
