"""A run directory belongs to its one training run: readers (load, serve, convert, init_from)
change nothing in it, a save in progress included; a second `lmsys train` on it fails at once
naming the first, and a lock left by a `kill -9`ed run does not block a restart; a run keeps
its own tokenizer (serving a copied run dir needs no tokenizer cache nor corpus) and its
checkpoints record the tokenizer and data they were trained on, so a resume with another
tokenizer or changed data is refused; an unreadable newest checkpoint falls back to the newest
intact step."""

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from common import subprocess_env, tiny_config, write_corpus
from lmsys.checkpoint import FAULT_ENV, CheckpointError, load_model, load_run, open_model
from lmsys.config import from_dict, load_config
from lmsys.train.loop import train
from lmsys.train.run_dir import LOCK_FILE, RunDirInUseError

FSDP8 = {"data": 1, "fsdp": 8, "tensor": 1}
ROOT = Path(__file__).resolve().parents[1]


def _cfg(root, name, steps, **data):
    return tiny_config(FSDP8, steps=steps, run_dir=str(root / name), checkpoint={"every": 2, "keep": 10},
                       data={"source": str(root / "corpus"), "cache_dir": str(root / "cache"), **data},
                       model={"vocab_size": 512})


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_dir")
    write_corpus(root / "corpus")
    return root


@pytest.fixture(scope="module")
def run(root):
    """A 4-step run (checkpoints 2 and 4) with the built-in BPE tokenizer."""
    cfg = _cfg(root, "run", 4)
    train(cfg, progress=False)
    return cfg


def _tree(path: Path) -> dict:
    """Every file and directory below `path` (but the lock, which each training start rewrites)."""
    return {str(p.relative_to(path)): (p.is_dir(), p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.name != LOCK_FILE}


def test_readers_change_nothing_in_a_run_dir(run, root, tmp_path):
    """With a save in progress (Orbax's temporary step directory): loading, opening, export and
    fine-tuning from the run leave every file and directory as it was."""
    from lmsys.interop.convert import lmsys_to_hf
    from lmsys.train.loop import resolve_init_from

    run_dir = Path(run.run_dir)
    writing = run_dir / "checkpoints" / "6.orbax-checkpoint-tmp-1733234567"
    (writing / "state").mkdir(parents=True)
    (writing / "state" / "manifest.ocdbt").write_bytes(b"half-written")
    before = _tree(run_dir)
    _, params, meta = load_run(run_dir)
    model = load_model(run_dir)
    lmsys_to_hf(run_dir, tmp_path / "hf")
    ft = resolve_init_from(from_dict({"init_from": str(run_dir), "run_dir": str(tmp_path / "ft"),
                                      "data": {"source": run.data.source}}))
    assert ft.data.tokenizer == str(run_dir / "tokenizer.json")
    assert _tree(run_dir) == before
    assert meta["step"] == model.step == 4
    shutil.rmtree(writing)


def test_copied_run_dir_serves_with_its_own_tokenizer(run, root, tmp_path, monkeypatch):
    """On a machine without the tokenizer cache nor the corpus (a fresh cache dir), a copied run
    directory loads the tokenizer it was trained with, from its own tokenizer.json."""
    original = load_model(run.run_dir).tokenizer
    copy = tmp_path / "copied"
    shutil.copytree(run.run_dir, copy)
    config = (copy / "config.yaml").read_text()
    (copy / "config.yaml").write_text(config.replace(str(root / "corpus"), str(tmp_path / "no-corpus"))
                                      .replace(str(root / "cache"), str(tmp_path / "fresh-cache")))
    monkeypatch.setenv("LMSYS_CACHE_DIR", str(tmp_path / "fresh-cache"))
    model = load_model(copy)
    assert model.tokenizer.to_str() == original.to_str()
    assert open_model(copy).config.data.tokenizer == str(copy / "tokenizer.json")
    assert not (tmp_path / "fresh-cache").exists()  # nothing retrained, nothing cached


def _other_tokenizer(run_dir: Path, out: Path) -> str:
    """The run's tokenizer with two token ids swapped: the same vocabulary size, other ids."""
    tok = json.loads((run_dir / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[-2:]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    out.write_text(json.dumps(tok))
    return str(out)


def test_resume_with_another_tokenizer_of_equal_vocab_size_is_refused(run, root, tmp_path):
    from lmsys.data import load_tokenizer

    run_dir = Path(run.run_dir)
    other = _other_tokenizer(run_dir, tmp_path / "other.json")
    assert (load_tokenizer(other, 512).get_vocab_size() == load_tokenizer(str(run_dir / "tokenizer.json"), 512)
            .get_vocab_size())
    before = _tree(run_dir)
    with pytest.raises(CheckpointError, match=r"step 4 was trained with another tokenizer \(sha256 \w+\.\.\.; "
                                              r"data\.tokenizer gives \w+\.\.\.\), .*resume with the run's own "
                                              rf"tokenizer \(data\.tokenizer={run_dir}/tokenizer\.json\)"):
        train(_cfg(root, "run", 6, tokenizer=other), progress=False)
    assert _tree(run_dir) == before  # refused before anything was written


def test_changed_data_is_refused_unless_allowed(root, capsys):
    corpus = root / "corpus2"
    shutil.copytree(root / "corpus", corpus)
    cfg = _cfg(root, "data", 4, source=str(corpus))
    train(cfg, progress=False, stop_at=2)
    (corpus / "doc000.txt").write_text((corpus / "doc000.txt").read_text() + "def value return\n")
    with pytest.raises(CheckpointError, match=r"step 2 was trained on other data: data.source .* gave 40 "
                                              r"documents, \d+ tokens .*; its data_index \(16\) would point at "
                                              r"other samples; .*set data.allow_changed_source=true"):
        train(cfg, progress=False)
    allowed = _cfg(root, "data", 4, source=str(corpus), allow_changed_source=True)
    capsys.readouterr()
    assert [h["step"] for h in train(allowed, progress=False)] == [3, 4]
    assert "warning: the data changed since checkpoint" in capsys.readouterr().out


def test_resume_falls_back_past_an_unreadable_checkpoint(root, capsys):
    cfg = _cfg(root, "damaged", 6)
    train(cfg, progress=False, stop_at=4)
    ckpts = Path(cfg.run_dir) / "checkpoints"
    biggest = max((p for p in (ckpts / "4").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[:100])  # a truncated file
    capsys.readouterr()
    history = train(cfg, progress=False)
    out = capsys.readouterr().out
    assert "checkpoint step 4 in" in out and "resuming from step 2, the newest intact one" in out, out
    assert [h["step"] for h in history] == [3, 4, 5, 6]
    kept = [p.name for p in ckpts.iterdir() if p.name.startswith("4.unreadable-")]
    assert len(kept) == 1 and (ckpts / kept[0] / biggest.relative_to(ckpts / "4")).stat().st_size == 100
    assert sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == [2, 4, 6]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serving_during_training_one_writer_and_kill_9(root, tmp_path):
    """`lmsys serve` and in-process readers on a run dir while `lmsys train` saves into it
    asynchronously: training ends with every checkpoint; a second train fails at once naming
    the first; after `kill -9` of a run holding the lock, a restart proceeds."""
    run_dir = tmp_path / "live"
    overrides = [f"run_dir={run_dir}", f"data.source={root / 'corpus'}", f"data.cache_dir={root / 'cache'}",
                 "model.vocab_size=512", "model.n_layers=2", "model.d_model=64", "model.head_dim=16",
                 "model.d_ff=128", "batch_size=4", "seq_len=32", "checkpoint.every=1", "checkpoint.keep=1000",
                 "checkpoint.async_save=true"]
    env = subprocess_env(drop=(FAULT_ENV,))

    def lmsys(*args, **extra):
        return subprocess.Popen([sys.executable, "-m", "lmsys.cli", *args], cwd=ROOT, env={**env, **extra},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    steps = 40
    trainer = lmsys("train", "recipes/configs/tiny.yaml", f"steps={steps}", *overrides, "--no-progress")
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "1").is_dir() and trainer.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    server = lmsys("serve", str(run_dir), "--port", str(_port()), "--max-slots", "2", "--max-seq-len", "64",
                   "--no-progress")
    cfg = load_config(ROOT / "recipes/configs/tiny.yaml", [f"steps={steps + 4}", *overrides])
    t0 = time.perf_counter()
    with pytest.raises(RunDirInUseError, match=rf"run_dir {run_dir} is in use by another `lmsys train` "
                                               rf"\(pid {trainer.pid} on host {socket.gethostname()}"):
        train(cfg, progress=False)
    assert time.perf_counter() - t0 < 5  # at once: before compiling or reading data
    reads = 0
    while trainer.poll() is None:
        load_run(run_dir)  # a reader opening the checkpoints while saves are in flight
        reads += 1
    out, err = trainer.communicate()
    assert trainer.returncode == 0, err[-3000:]
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == list(range(1, steps + 1)) and reads >= 3, (saved, reads)
    assert server.poll() is None, server.communicate()[1][-3000:]  # reading the run dir did not fail
    server.send_signal(signal.SIGTERM)
    server.communicate(timeout=60)

    killed = lmsys("train", "recipes/configs/tiny.yaml", f"steps={steps + 4}", *overrides, "--no-progress",
                   **{FAULT_ENV: f"after_step:{steps + 2}"})
    killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == killed.pid  # the dead run's lock file
    history = train(cfg, progress=False, devices=jax.devices()[:4])  # the restart proceeds
    assert history[0]["step"] <= steps + 2 and history[-1]["step"] == steps + 4
    _, params, meta = load_run(run_dir)
    assert meta["step"] == steps + 4 and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
