"""On-disk cache helpers: cache location, content keys and atomic writes."""

import hashlib
import json
import os
import tempfile
from typing import Any

import numpy as np

FORMAT_VERSION = 1


def cache_root(cache_dir: str | None = None) -> str:
    """Returns the cache directory: `cache_dir`, else $LMSYS_CACHE_DIR, else ~/.cache/lmsys."""
    if cache_dir is None:
        cache_dir = os.environ.get("LMSYS_CACHE_DIR") or os.path.join("~", ".cache", "lmsys")
    return os.path.abspath(os.path.expanduser(str(cache_dir)))


def cache_key(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable `parts` (plus the cache format version)."""
    blob = json.dumps([FORMAT_VERSION, *parts], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def _atomic_write(path: str, write: Any) -> None:
    """Calls `write(file)` on a temp file next to `path`, then renames it onto `path`."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Writes `text` (utf-8) to `path` so that readers never see a partial file."""
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_save_npy(path: str, array: np.ndarray) -> None:
    """Saves `array` as .npy to `path` so that readers never see a partial file."""
    _atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def arrays_sha256(*arrays: np.ndarray, chunk: int = 1 << 24) -> str:
    """sha256 over arrays' dtypes, shapes and bytes (memory-mapped ones streamed in chunks)."""
    h = hashlib.sha256()
    for a in arrays:
        flat = np.asarray(a).reshape(-1)
        h.update(f"{flat.dtype.str}{a.shape}".encode())
        for i in range(0, len(flat), chunk):
            h.update(np.ascontiguousarray(flat[i:i + chunk]).tobytes())
    return h.hexdigest()


def cached_sha256(meta_path: str, arrays: tuple[np.ndarray, ...]) -> str:
    """The `sha256` of a cache entry's arrays, kept in its meta.json (computed once, when the
    entry is written or first asked for)."""
    with open(meta_path) as f:
        meta = json.load(f)
    if "sha256" not in meta:
        meta["sha256"] = arrays_sha256(*arrays)
        atomic_write_text(meta_path, json.dumps(meta))
    return meta["sha256"]
