"""Two processes on this machine (4 emulated CPU devices each, joined by
jax.distributed over loopback) train exactly like one process with 8 devices, write one
checkpoint together that a single process restores, and resume what a single process saved."""

import json
import os
import shutil
import socket
import subprocess
import time
import sys
from pathlib import Path

import jax
import numpy as np

from common import write_corpus
from lmsys.checkpoint import Checkpointer
from lmsys.config import load_config
from lmsys.parallel import Rules, build_mesh
from lmsys.train import Trainer
from lmsys.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = ["model.preset=tiny", "model.vocab_size=512", "model.n_layers=2", "model.d_model=64",
             "model.head_dim=16", "model.d_ff=128", "batch_size=8", "seq_len=32", "mesh.fsdp=4",
             "mesh.data=2", "checkpoint.every=2", "checkpoint.async_save=false", "optimizer.warmup_steps=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_two(*overrides):
    """`lmsys train` as 2 processes x 4 emulated CPU devices joined over loopback."""
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    return [subprocess.Popen(
        [sys.executable, "-m", "lmsys.cli", "train", "recipes/configs/tiny.yaml", *OVERRIDES, *overrides,
         f"distributed.coordinator_address=127.0.0.1:{port}", "distributed.num_processes=2",
         f"distributed.process_id={i}", "--no-progress"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]


def _wait(procs, timeout=600):
    """Both processes' (stdout, stderr), after checking they exited 0."""
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return outs


def test_two_processes_train_like_one_and_checkpoint_together(tmp_path):
    data = [f"data.source={write_corpus(tmp_path / 'corpus')}", f"data.cache_dir={tmp_path / 'cache'}"]
    two = tmp_path / "two"
    outs = _wait(_start_two(*data, "steps=6", f"run_dir={two}"))
    assert "step 6: loss" in outs[0][0] and "loss" not in outs[1][0]  # only process 0 reports
    two_losses = [json.loads(line)["loss"] for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert (two / "checkpoints" / "6").is_dir()

    # the same run in this one process with 8 devices
    one_cfg = load_config(ROOT / "recipes/configs/tiny.yaml", [*OVERRIDES, *data, "steps=6",
                                                               f"run_dir={tmp_path / 'one'}"])
    one = train(one_cfg, progress=False)
    np.testing.assert_allclose(two_losses, [r["loss"] for r in one], rtol=1e-5)

    # one process restores what two processes saved
    trainer = Trainer(one_cfg, Rules(build_mesh(one_cfg.mesh)))
    states = []
    for run in (two, tmp_path / "one"):
        ckpt = Checkpointer(run / "checkpoints")
        states.append(jax.device_get(ckpt.restore(trainer.abstract_state, one_cfg.model)[0]))
        ckpt.close()
    assert states[0]["step"] == states[1]["step"] == 6
    for a, b in zip(jax.tree.leaves(states[0]["params"]), jax.tree.leaves(states[1]["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)

    # and two processes resume what one process saved: steps 7-8 as one process continues
    shutil.copytree(tmp_path / "one", tmp_path / "one_then_two")
    outs = _wait(_start_two(*data, "steps=8", f"run_dir={tmp_path / 'one_then_two'}"))
    assert "resuming" in outs[0][0]
    resumed = [json.loads(line) for line in (tmp_path / "one_then_two" / "metrics.jsonl").read_text().splitlines()]
    alone = train(load_config(ROOT / "recipes/configs/tiny.yaml",
                              [*OVERRIDES, *data, "steps=8", f"run_dir={tmp_path / 'one'}"]),
                  progress=False)
    assert [r["step"] for r in resumed[-2:]] == [r["step"] for r in alone] == [7, 8]
    np.testing.assert_allclose([r["loss"] for r in resumed[-2:]], [r["loss"] for r in alone], rtol=1e-5)


def test_sigterm_to_one_process_stops_all_after_the_same_step(tmp_path):
    import signal

    data = [f"data.source={write_corpus(tmp_path / 'corpus')}", f"data.cache_dir={tmp_path / 'cache'}"]
    run_dir = tmp_path / "run"
    procs = _start_two(*data, "steps=100000", f"run_dir={run_dir}", "checkpoint.every=0")
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)  # only the second process is preempted
    outs = _wait(procs, timeout=300)
    last = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert f"stopped after step {last} with a checkpoint" in outs[0][0]
    steps = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()]
    assert steps == [str(last)]
