"""The launch recipes in recipes/launch (SLURM, Kubernetes, Cloud TPU VM) cannot run here, but
their structure can be checked: every YAML parses with the expected kinds and apiVersions, the
coordinator DNS names agree with the objects that create them, the shell scripts pass `bash -n`,
and the `lmsys train` command of every recipe uses only config keys lmsys accepts (so renaming a
config key breaks this test, not a user's job)."""

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from lmsys.config import load_config

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "recipes" / "launch"
TINY = ROOT / "recipes" / "configs" / "tiny.yaml"

# Values the scheduler or runtime puts into the environment, for checking the commands.
RUNTIME_ENV = {
    "JAX_COORDINATOR_ADDRESS": "lmsys-train-node-0-0.lmsys-train:6666",  # Kubeflow Trainer's JAX runtime
    "JAX_NUM_PROCESSES": "2",
    "JAX_PROCESS_ID": "1",
    "JOB_COMPLETION_INDEX": "1",  # Kubernetes Indexed Job
}
FLAGS = {"--no-progress"}  # `lmsys train` flags the recipes may pass besides key=value


def _assignments(script: str) -> dict[str, str]:
    """`NAME=value` shell assignments at the start of a line (comments stripped)."""
    found = {}
    for line in script.splitlines():
        m = re.match(r"\s*(?:export\s+)?([A-Z_][A-Z0-9_]*)=(\S*)", line)
        if m:
            found[m.group(1)] = m.group(2).strip("\"'")
    return found


def _expand(text: str, env: dict[str, str]) -> str:
    """Substitutes $NAME / ${NAME}; a name with no value fails the test."""
    def one(m):
        name = m.group(1) or m.group(2)
        assert name in env, f"the command uses ${name}, which the recipe does not define"
        return env[name]
    for _ in range(5):  # values may refer to other variables
        text = re.sub(r"\$\{([A-Za-z_]\w*)\}|\$([A-Za-z_]\w*)", one, text)
    return text


def train_commands(script: str) -> list[tuple[str, list[str]]]:
    """(config, [key=value, ...]) of each `lmsys train` command in a shell script, with the
    script's own variables and the runtime's environment substituted."""
    env = {**RUNTIME_ENV, **_assignments(script)}
    joined = re.sub(r"\\\n\s*", " ", script)  # backslash-newline continuations
    commands = []
    for line in joined.splitlines():
        if "lmsys train" not in line or line.lstrip().startswith("#"):
            continue
        rest = line.split("lmsys train", 1)[1]
        rest = re.split(r"[>&;|<#]", rest, maxsplit=1)[0]  # up to the first shell operator / comment
        tokens = [t.strip("\"'") for t in _expand(rest, env).split()]
        config, args = tokens[0], tokens[1:]
        for arg in args:
            assert "=" in arg or arg in FLAGS, f"unexpected argument {arg!r} in {line.strip()!r}"
        commands.append((config, [a for a in args if a not in FLAGS]))
    return commands


def _yaml_docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((LAUNCH / "k8s" / name).read_text()) if d]


def _script_of(container: dict) -> str:
    assert container["command"] == ["bash", "-c"]
    return container["args"][0]


def _checked(script: str) -> list[str]:
    """Validates the script's one `lmsys train` command against lmsys's config and returns its
    overrides."""
    (config, overrides), = train_commands(script)
    assert config.endswith(".yaml")
    load_config(TINY, overrides)  # raises ConfigError on a renamed or mistyped key
    return overrides


def _value(overrides: list[str], key: str) -> str:
    values = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0] == key]
    assert len(values) == 1, f"{key} set {len(values)} times"
    return values[0]


def test_the_extraction_catches_a_renamed_key():
    with pytest.raises(ValueError, match="unknown config key"):
        load_config(TINY, train_commands("lmsys train c.yaml mesh.fsdpp=8 &\n")[0][1])
    with pytest.raises(AssertionError, match="does not define"):
        train_commands("lmsys train c.yaml run_dir=$NOWHERE\n")


def test_slurm_recipe():
    path = LAUNCH / "slurm" / "train_gpu.sbatch"
    text = path.read_text()
    overrides = _checked(text)
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, flags=re.M))
    # one process per GPU: JAX's SLURM detection gives each process the GPU SLURM_LOCALID
    assert directives["ntasks-per-node"] == directives["gpus-per-node"] == _assignments(text)["GPUS_PER_NODE"]
    assert directives["signal"].startswith("B:USR1@") and "requeue" in directives
    assert not any(o.startswith("distributed.") for o in overrides)  # JAX reads SLURM's environment
    assert _value(overrides, "run_dir").startswith("/shared/")


def _slurm_port_job_id() -> int:
    """A SLURM job id whose coordinator port (JAX: job id % 4096 + 61440) is free here."""
    import random
    import socket

    for job_id in random.Random(os.getpid()).sample(range(10_000, 20_000), 200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", job_id % 4096 + 61440))
            except OSError:
                continue
        return job_id
    pytest.skip("no free port in JAX's SLURM port range 61440-65535")


def test_slurm_recipe_runs_as_two_local_tasks(tmp_path):
    """The command the recipe's `srun` starts, run as 2 local tasks with the environment srun
    gives each task (one node, 127.0.0.1): JAX's SLURM detection alone joins them (the command
    has no distributed.* keys), and they train exactly like one process with all 8 devices.
    The script's GPU-specific exports are left out; its own variables are substituted, RUN_DIR
    and GPUS_PER_NODE (4 emulated CPU devices per task) replaced, and small sizes appended."""
    from common import write_corpus
    from test_multihost import ROOT as root, _start, _wait
    from lmsys.train.loop import train

    script = re.sub(r"\\\n\s*", " ", (LAUNCH / "slurm" / "train_gpu.sbatch").read_text())
    (srun_line,) = [line for line in script.splitlines() if line.lstrip().startswith("srun ")]
    env = {**_assignments(script), "RUN_DIR": str(tmp_path / "run"), "GPUS_PER_NODE": "4"}
    command = _expand(re.split(r"[>&;|<#]", srun_line.split("lmsys train", 1)[1], maxsplit=1)[0], env).split()
    small = ["model.vocab_size=512", "model.n_layers=2", "model.d_model=64", "model.head_dim=16",
             "model.d_ff=128", "batch_size=8", "seq_len=32", "steps=4", "log_every=1",
             f"data.source={write_corpus(tmp_path / 'corpus')}", f"data.cache_dir={tmp_path / 'cache'}"]
    job_id = _slurm_port_job_id()
    slurm = {"SLURM_JOB_ID": str(job_id), "SLURM_JOB_NODELIST": "127.0.0.1", "SLURM_STEP_NODELIST": "127.0.0.1",
             "SLURM_NTASKS": "2", "SLURM_STEP_NUM_NODES": "1", "SLURM_NNODES": "1", "SLURM_NODEID": "0"}
    clean = {k: None for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}
    flags = [a for a in command if a in FLAGS]
    command = [a for a in command if a not in FLAGS]
    outs = _wait(_start(*[(command + small + flags, {**clean, **slurm, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)})
                          for i in range(2)]))
    assert "2 processes joined (SLURM): 8 devices, 4 per process" in outs[0][0], outs[0]
    assert "joined" not in outs[1][0]
    two = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]

    one = train(load_config(root / command[0], [*command[1:], *small, f"run_dir={tmp_path / 'one'}"]), progress=False)
    assert len(two) == 4
    np.testing.assert_allclose(two, [r["loss"] for r in one], rtol=1e-5)


def test_kubeflow_trainjob():
    (job,) = _yaml_docs("trainjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
    assert job["spec"]["runtimeRef"]["name"] == "jax-distributed"
    trainer = job["spec"]["trainer"]
    assert isinstance(trainer["numNodes"], int) and trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 8
    script = _script_of(trainer)
    overrides = _checked(script)
    # the runtime's environment, mapped to lmsys's keys
    for key, var in [("distributed.coordinator_address", "JAX_COORDINATOR_ADDRESS"),
                     ("distributed.num_processes", "JAX_NUM_PROCESSES"),
                     ("distributed.process_id", "JAX_PROCESS_ID")]:
        assert f"{key}=${var}" in script
        assert _value(overrides, key) == RUNTIME_ENV[var]
    patch = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert patch["name"] == "node"
    pod = patch["template"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "node"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert any(_value(overrides, "run_dir").startswith(m + "/") for m in mounts)  # run_dir on the shared volume


def _coordinated(pod_spec: dict, n: int, coordinator: str) -> list[str]:
    (container,) = pod_spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert pod_spec["restartPolicy"] == "Never" and pod_spec["terminationGracePeriodSeconds"] >= 120
    overrides = _checked(_script_of(container))
    assert _value(overrides, "distributed.coordinator_address") == coordinator
    assert _value(overrides, "distributed.num_processes") == str(n)
    assert _value(overrides, "distributed.process_id") == RUNTIME_ENV["JOB_COMPLETION_INDEX"]
    assert "distributed.process_id=$JOB_COMPLETION_INDEX" in _script_of(container)
    port = int(coordinator.rsplit(":", 1)[1])
    assert port in [p["containerPort"] for p in container["ports"]]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert any(_value(overrides, "run_dir").startswith(m + "/") for m in mounts)
    return overrides


def test_indexed_job_and_headless_service():
    service, job = _yaml_docs("indexed-job.yaml")
    assert (service["apiVersion"], service["kind"]) == ("v1", "Service")
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    assert service["spec"]["clusterIP"] == "None"
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    pod = spec["template"]["spec"]
    name, svc = job["metadata"]["name"], service["metadata"]["name"]
    assert pod["subdomain"] == svc
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": name}
    # pod 0 of Job <name> is <name>-0.<service>
    port = service["spec"]["ports"][0]["port"]
    _coordinated(pod, spec["completions"], f"{name}-0.{svc}:{port}")


def test_jobset():
    (js,) = _yaml_docs("jobset.yaml")
    assert (js["apiVersion"], js["kind"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet")
    spec = js["spec"]
    assert spec["network"]["enableDNSHostnames"] is True and spec["failurePolicy"]["maxRestarts"] >= 1
    subdomain = spec["network"].get("subdomain", js["metadata"]["name"])
    (rjob,) = spec["replicatedJobs"]
    job = rjob["template"]["spec"]
    assert rjob["replicas"] == 1 and job["completionMode"] == "Indexed"
    assert job["completions"] == job["parallelism"] and job["backoffLimit"] == 0
    # pod 0 of job 0 of replicated job <r> in JobSet <js> is <js>-<r>-0-0.<subdomain>
    _coordinated(job["template"]["spec"], job["completions"],
                 f"{js['metadata']['name']}-{rjob['name']}-0-0.{subdomain}:1234")


def test_tpu_vm_recipe():
    text = (LAUNCH / "tpu" / "train_tpu_vm.sh").read_text()
    overrides = _checked(text)
    assert not any(o.startswith("distributed.") for o in overrides)  # the TPU runtime finds the hosts
    assert _assignments(text)["ACCELERATOR_TYPE"] == "v5p-32"
    assert "--worker=all" in text and "'.[tpu]'" in text
    assert _value(overrides, "run_dir").startswith(_assignments(text)["MOUNT"] + "/")


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("script", ["slurm/train_gpu.sbatch", "tpu/train_tpu_vm.sh"])
def test_shell_syntax(script):
    subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True)


def _scripts(name: str) -> list[str]:
    """The `bash -c` scripts of every container in a k8s recipe."""
    out = []

    def walk(node):
        if isinstance(node, dict):
            if node.get("command") == ["bash", "-c"]:
                out.append(node["args"][0])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    for doc in _yaml_docs(name):
        walk(doc)
    return out


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("name", ["trainjob.yaml", "indexed-job.yaml", "jobset.yaml"])
def test_k8s_scripts_are_valid_bash(name, tmp_path):
    (script,) = _scripts(name)
    f = tmp_path / "script.sh"
    f.write_text(script)
    subprocess.run(["bash", "-n", str(f)], check=True)


FAKE_LMSYS = """#!/bin/bash
# stands in for lmsys: records its arguments, and on SIGTERM "checkpoints" and exits 0
trap 'echo TERM >> "$FAKE_DIR/signals"; exit 0' TERM
echo "$@" > "$FAKE_DIR/args"
[ -n "${FAKE_FINISH:-}" ] && exit 0
while true; do sleep 0.02; done
"""


def _run_wrapper(tmp_path, finish: bool):
    """Runs the jobset recipe's container script with a fake `lmsys`; SIGTERMs it unless the
    fake finishes by itself. Returns (exit code, signals the fake received)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "lmsys").write_text(FAKE_LMSYS)
    (bin_dir / "lmsys").chmod(0o755)
    (script,) = _scripts("jobset.yaml")
    script = re.sub(r"cd /opt/lmsys[^\n]*", "true", script)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_DIR": str(tmp_path),
           "JOB_COMPLETION_INDEX": "0", **({"FAKE_FINISH": "1"} if finish else {})}
    p = subprocess.Popen(["bash", "-c", script], env=env)
    if not finish:
        deadline = time.time() + 5
        while not (tmp_path / "args").exists() and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)  # let the wrapper reach `wait` (a signal before `child=$!` is not forwarded)
        p.send_signal(signal.SIGTERM)  # what the kubelet sends on preemption / eviction
    rc = p.wait(timeout=5)
    signals = (tmp_path / "signals").read_text().split() if (tmp_path / "signals").exists() else []
    return rc, signals


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_k8s_wrapper_forwards_one_sigterm_and_reports_unfinished(tmp_path):
    rc, signals = _run_wrapper(tmp_path, finish=False)
    assert signals == ["TERM"]  # exactly one: a second SIGTERM would stop lmsys without a checkpoint
    assert rc == 143  # not 0: Kubernetes must not count a stopped run as complete


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_k8s_wrapper_passes_a_finished_run_through(tmp_path):
    rc, signals = _run_wrapper(tmp_path, finish=True)
    assert (rc, signals) == (0, [])
    assert "distributed.process_id=0" in (tmp_path / "args").read_text()


# ---------------------------------------------------------------- run_dir on object storage

def test_a_gs_run_dir_reaches_orbax_as_a_url(monkeypatch):
    """pathlib would turn gs://bucket/run into gs:/bucket/run; the URL must reach Orbax intact
    (it writes gs:// through tensorstore), while local run dirs stay absolute paths."""
    import lmsys.checkpoint as checkpoint
    from lmsys.train.loop import train

    seen = []

    class Stop(Exception):
        pass

    def manager(directory, *args, **kwargs):
        seen.append(str(directory))
        raise Stop

    monkeypatch.setattr(checkpoint.ocp, "CheckpointManager", manager)
    cfg = load_config(TINY, ["run_dir=gs://my-bucket/runs/exp1", "model.vocab_size=512", "model.n_layers=1",
                             "model.d_model=32", "model.head_dim=8", "model.d_ff=64", "seq_len=16"])
    with pytest.raises(Stop):
        train(cfg, progress=False, dataset=object())
    with pytest.raises(Stop):
        checkpoint.Checkpointer("runs/local/checkpoints")
    assert seen == ["gs://my-bucket/runs/exp1/checkpoints", str(Path("runs/local/checkpoints").absolute())]


def test_metrics_on_object_storage_are_rewritten_whole(tmp_path, monkeypatch):
    """Object stores cannot append: the writer keeps the lines and rewrites metrics.jsonl, and a
    resumed run continues the file. (A local directory stands in for the bucket.)"""
    import lmsys.checkpoint as checkpoint
    from lmsys.train.metrics import MetricsWriter

    monkeypatch.setattr(checkpoint, "is_url", lambda path: True)
    w = MetricsWriter(str(tmp_path))
    assert w.file is None  # no append handle
    w.write({"step": 1, "loss": 2.5})
    w.close()
    w = MetricsWriter(str(tmp_path))
    w.write({"step": 2, "loss": 2.25})
    w.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.25}]
