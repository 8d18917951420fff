"""Document sources: the built-in Python stdlib corpus, .txt/.jsonl files and directories."""

import json
import os
import sys
from collections.abc import Iterator

BUILTIN = "builtin"
DIRECTORY_EXTENSIONS = (".txt", ".jsonl", ".py", ".md")
_SKIPPED_DIRS = ("site-packages", "dist-packages")


def builtin_corpus_files() -> list[str]:
    """All .py files of the running interpreter's stdlib (no site/dist-packages), sorted."""
    root = os.path.dirname(os.__file__)
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIPPED_DIRS]
        files.extend(os.path.join(dirpath, name) for name in filenames if name.endswith(".py"))
    return sorted(files)


def _directory_files(directory: str) -> list[str]:
    files = []
    for dirpath, _, filenames in os.walk(directory):
        files.extend(
            os.path.join(dirpath, name) for name in filenames if name.endswith(DIRECTORY_EXTENSIONS)
        )
    return sorted(files)


def source_files(source: str) -> list[str]:
    """Resolves a source ("builtin" or comma-separated files/directories) to its files, in order."""
    files: list[str] = []
    for item in (part.strip() for part in source.split(",")):
        if not item:
            continue
        if item == BUILTIN:
            files.extend(builtin_corpus_files())
            continue
        path = os.path.abspath(os.path.expanduser(item))
        if os.path.isdir(path):
            files.extend(_directory_files(path))
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(
                f"data source path {item!r} does not exist (source={source!r}); expected "
                f"'{BUILTIN}' or a comma-separated list of .txt/.jsonl files or directories"
            )
    if not files:
        raise ValueError(f"data source {source!r} contains no documents")
    return files


def source_fingerprint(source: str) -> list[object]:
    """Cheap content identity of a source: Python version, each file's path, size and mtime."""
    fingerprint: list[object] = [source, sys.version]
    for path in source_files(source):
        stat = os.stat(path)
        fingerprint.append([path, stat.st_size, stat.st_mtime_ns])
    return fingerprint


def _read_text(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8", errors="replace")


def _iter_jsonl(path: str, text_field: str) -> Iterator[str]:
    with open(path, "rb") as f:
        for line_number, raw_line in enumerate(f, start=1):
            line = raw_line.decode("utf-8", errors="replace")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_number}: invalid JSON ({e.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                raise ValueError(f"{path}:{line_number}: record has no field {text_field!r}")
            text = record[text_field]
            if not isinstance(text, str):
                raise ValueError(
                    f"{path}:{line_number}: field {text_field!r} is "
                    f"{type(text).__name__}, not a string"
                )
            yield text


def iter_documents(source: str, text_field: str = "text", max_documents: int = 0) -> Iterator[str]:
    """Yields the documents of `source` in a deterministic order (at most `max_documents` if > 0).

    `source` is "builtin" (one document per stdlib .py file) or a comma-separated list of paths:
    .jsonl files (one document per line, from `text_field`), other files (one document each),
    or directories (all .txt/.jsonl/.py/.md files below, sorted).
    """
    count = 0
    for path in source_files(source):
        documents = (
            _iter_jsonl(path, text_field) if path.endswith(".jsonl") else iter([_read_text(path)])
        )
        for document in documents:
            if 0 < max_documents <= count:
                return
            yield document
            count += 1
