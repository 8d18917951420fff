"""What a training run keeps in its run directory beside its checkpoints: the lock that makes it
the directory's one writer, its own copy of its tokenizer, and the provenance every checkpoint
records (the tokenizer's sha256 and the data's fingerprint), checked when the run resumes.

    RUN_DIR/train.lock       pid, host and start of the `lmsys train` holding the directory
    RUN_DIR/tokenizer.json   the run's tokenizer (+ tokenizer_config.json, chat template),
                             written when the run starts; serving reads this copy
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from lmsys.checkpoint import CheckpointError, check_model, is_url

LOCK_FILE = "train.lock"


class RunDirInUseError(CheckpointError):
    """Another `lmsys train` holds the run directory; the message names it (pid, host)."""


class RunDirLock:
    """An exclusive flock(2) on RUN_DIR/train.lock, which holds the holder's pid, host and start
    time for the message a second run gets. The kernel drops the lock when its process ends,
    however it ends (kill -9 too), so a lock file left by a dead run never blocks a restart.
    Inactive for a URL run_dir (object stores have no locks) and when `active` is False (the
    processes other than 0 of a multi-process job, which share process 0's directory)."""

    def __init__(self, run_dir, active: bool = True):
        self.run_dir = run_dir
        self.active = active and not is_url(run_dir)
        self._fd: int | None = None

    def __enter__(self) -> RunDirLock:
        if not self.active:
            return self
        path = Path(self.run_dir) / LOCK_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(os.pread(fd, 4096, 0))
            os.close(fd)
            raise RunDirInUseError(
                f"run_dir {self.run_dir} is in use by another `lmsys train` ({holder}; it holds "
                f"{path}); wait for it to finish or stop it, or train into another run_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *_):
        if self._fd is not None:
            os.close(self._fd)  # drops the lock; the file stays (removing it would race a new holder)
            self._fd = None


def _holder(text: bytes) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on host {h['host']}, started {h['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder not yet recorded"


# ----------------------------------------------------------------------------- the tokenizer


def tokenizer_spec(data_tokenizer: str, run_dir) -> str:
    """The tokenizer a run trains with: with data.tokenizer=builtin, the run's own copy once it
    has one (the BPE trained when it started, even after the corpus changed or the cache went);
    else data.tokenizer (a resume checks it against the checkpoints' hash)."""
    from lmsys.data.tokenizer import BUILTIN

    own = run_dir / "tokenizer.json"
    return str(own) if data_tokenizer == BUILTIN and own.is_file() else data_tokenizer


def save_tokenizer(run_dir, data_tokenizer: str, tokenizer) -> None:
    """Writes the run's own copy of its tokenizer files unless it has one: the tokenizer.json
    (a trained builtin BPE's JSON) and the files beside it that say its special tokens and chat
    template (lmsys.data.tokenizer.TOKENIZER_FILES)."""
    from lmsys.data.cache import atomic_write_text
    from lmsys.data.tokenizer import BUILTIN, copy_tokenizer_files, tokenizer_file

    out = run_dir / "tokenizer.json"
    if out.exists():
        return
    if data_tokenizer != BUILTIN:
        src = Path(tokenizer_file(data_tokenizer))
        copy_tokenizer_files(src.parent, run_dir)
        text = src.read_text(encoding="utf-8")
    else:
        text = tokenizer.to_str()
    if is_url(run_dir):
        out.write_text(text)
    else:
        atomic_write_text(str(out), text)


# ----------------------------------------------------------------------------- provenance


def provenance(dataset) -> dict:
    """What each checkpoint of a run records about its data: the tokenizer's sha256 and the
    dataset's fingerprint (lmsys.data.packing.RowDataset.fingerprint); {} for a dataset without
    them (a test's synthetic batches)."""
    from lmsys.data.tokenizer import tokenizer_sha256

    out = {}
    if getattr(dataset, "tokenizer", None) is not None:
        out["tokenizer_sha256"] = tokenizer_sha256(dataset.tokenizer)
    if hasattr(dataset, "fingerprint"):
        out["data"] = dataset.fingerprint()
    return out


def check_provenance(saved: dict, now: dict, where: str, run_dir, allow_changed_source: bool) -> str | None:
    """Refuses (CheckpointError) to resume checkpoint `where` with another tokenizer, or with
    other data unless `allow_changed_source` (then returns the warning to print). Checkpoints
    from before provenance was recorded pass."""
    a, b = saved.get("tokenizer_sha256"), now.get("tokenizer_sha256")
    if a and b and a != b:
        raise CheckpointError(
            f"checkpoint {where} was trained with another tokenizer (sha256 {a[:16]}...; data.tokenizer "
            f"gives {b[:16]}...), whose token ids mean other text; resume with the run's own tokenizer "
            f"(data.tokenizer={run_dir / 'tokenizer.json'}), or train into a new run_dir with "
            f"init_from={run_dir}")
    a, b = saved.get("data"), now.get("data")
    if not (a and b) or a.get("sha256") == b.get("sha256"):
        return None
    change = (f"data.source {a.get('source')!r} gave {a.get('documents')} documents, {a.get('tokens')} tokens "
              f"(sha256 {str(a.get('sha256'))[:16]}...) there; {b['source']!r} gives {b['documents']} "
              f"documents, {b['tokens']} tokens (sha256 {b['sha256'][:16]}...) now")
    if not allow_changed_source:
        raise CheckpointError(
            f"checkpoint {where} was trained on other data: {change}; its data_index "
            f"({saved.get('data_index')}) would point at other samples; restore the data, train into a "
            f"new run_dir, or set data.allow_changed_source=true to go on with the new data")
    return (f"the data changed since checkpoint {where} ({change}); going on from data_index "
            f"{saved.get('data_index')} in the new data (data.allow_changed_source=true)")


def resume(ckpt, abstract_state, cfg, now: dict, run_dir, lead: bool, base: dict | None = None):
    """(state, meta) of the newest checkpoint that reads back and fits this run (model shape,
    tokenizer, data: lmsys.checkpoint.check_model and check_provenance; with LoRA, `base`: the
    frozen base's reference, lmsys.train.adapters.check_base). An unreadable newer step is
    renamed STEP.unreadable-TIME (kept, no longer a step) and the fall-back said."""
    def check(meta, step):
        where = f"{ckpt.directory} step {step}"
        check_model(meta.get("model", {}), cfg.model, where)
        check_provenance(meta, now, where, run_dir, cfg.data.allow_changed_source)
        if base is not None or "base" in meta:
            from lmsys.train.adapters import check_base

            check_base(meta.get("base"), base or {}, where)

    state, meta, skipped = ckpt.restore_intact(abstract_state, check)
    note = check_provenance(meta, now, f"{ckpt.directory} step {meta['step']}", run_dir, True)
    if skipped:
        import jax
        from jax.experimental import multihost_utils

        for step, why in skipped:
            moved = ckpt.set_aside(step) if lead else None
            if lead:
                print(f"checkpoint step {step} in {ckpt.directory} cannot be read ({why}); kept as "
                      f"{moved}; resuming from step {meta['step']}, the newest intact one", flush=True)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("lmsys: unreadable checkpoints set aside")
            if not lead:
                ckpt.manager.reload()
    if note and lead:
        print(f"warning: {note}", flush=True)
    return state, meta
