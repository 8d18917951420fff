"""The quickstart as a user runs it: `lmsys train recipes/configs/tiny.yaml steps=50` on the CPU,
on the built-in corpus, learns; re-running the command resumes instead of starting over; then
`lmsys generate` serves the trained run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _lmsys(*args, cwd):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one plain CPU device
    return subprocess.run([sys.executable, "-m", "lmsys.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_tiny_quickstart_learns_and_resumes(tmp_path):
    config = str(ROOT / "recipes/configs/tiny.yaml")
    run = _lmsys("train", config, "steps=50", f"run_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    run_dir = tmp_path / "run"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 51))
    losses = [r["loss"] for r in records]
    assert sum(losses[-10:]) / 10 <= losses[0] - 1.0, losses
    assert all(r["tokens_per_second"] > 0 and r["grad_norm"] > 0 for r in records)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["steps"] == 50 and saved["model"]["preset"] == "tiny" and saved["data"]["source"] == "builtin"
    assert list((run_dir / "tensorboard").iterdir())
    assert (run_dir / "checkpoints" / "50").is_dir()

    again = _lmsys("train", config, "steps=50", f"run_dir={run_dir}", "--no-progress", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming" in again.stdout and "already at step 50" in again.stdout

    # the trained run serves: greedy generation through the engine, streamed to stdout
    gen = _lmsys("generate", str(run_dir), "--prompt", "import os", "--max-tokens", "16", cwd=tmp_path)
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert gen.stdout.startswith("import os") and len(gen.stdout.strip()) > len("import os")
    again = _lmsys("generate", str(run_dir), "--prompt", "import os", "--max-tokens", "16", cwd=tmp_path)
    assert again.stdout == gen.stdout  # greedy is deterministic
    bad = _lmsys("generate", str(tmp_path), "--prompt", "x", cwd=tmp_path)
    assert bad.returncode == 2 and "is not a training run directory" in bad.stderr
