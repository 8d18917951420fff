"""Multi-process start-up: `jax.distributed.initialize` from config keys, JAX's environment
variables or a launcher's environment, before any JAX computation runs.

Where the coordinator, process count and process id come from, first match wins:

1. `distributed.coordinator_address` (with `distributed.num_processes` / `process_id`, each
   left unset taken from `$JAX_NUM_PROCESSES` / `$JAX_PROCESS_ID`, Open MPI's
   `OMPI_COMM_WORLD_SIZE` / `_RANK`, or JAX's launcher detection);
2. `$JAX_COORDINATOR_ADDRESS` (+ `$JAX_NUM_PROCESSES`, `$JAX_PROCESS_ID`), as Kubeflow
   Trainer's JAX runtime sets them (JAX itself reads only the address);
3. a launcher JAX detects by itself: SLURM (a task started by `srun` of a multi-task step),
   Open MPI (`mpirun`, 4.x: `OMPI_MCA_orte_hnp_uri`), a Cloud TPU VM or GKE TPU slice, a
   Kubernetes Indexed Job pod (JAX asks the Kubernetes API; needs the `kubernetes` package);
4. otherwise one process (also with `distributed.num_processes=1`).

Each process then owns its local devices; the mesh spans all of them, each process reads only
its share of the data, only process 0 prints and writes metrics, and Orbax checkpoints are
written by all processes together.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import jax

from lmsys.config import ConfigError, DistributedConfig


@dataclass(frozen=True)
class Launch:
    """How this process joins the job: `source` names where the settings come from, `kwargs`
    go to `jax.distributed.initialize` (empty: JAX detects the launcher itself)."""

    source: str
    kwargs: dict = field(default_factory=dict)


def _int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "")
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name} = {value!r}: not an integer") from None


def detect_launcher(env: Mapping[str, str], on_cloud_tpu: bool = False) -> str | None:
    """The launcher whose multi-process environment this process runs in, if any, by the same
    rules as JAX's cluster detection (`jax._src.clusters`); None for one process."""
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(k in env for k in slurm):  # set for each task that srun starts
        return "SLURM" if (_int(env, "SLURM_NTASKS") or 1) > 1 else None
    if "OMPI_MCA_orte_hnp_uri" in env:
        return "Open MPI" if (_int(env, "OMPI_COMM_WORLD_SIZE") or 1) > 1 else None
    tpu_hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
    if on_cloud_tpu and (tpu_hosts or "TPU_SKIP_MDS_QUERY" not in env):
        # a GKE TPU slice lists its hosts; on a TPU VM, JAX reads the hosts from the VM metadata
        return "Cloud TPU" if tpu_hosts is None or "," in tpu_hosts else None
    if "KUBERNETES_SERVICE_HOST" in env and "JOB_COMPLETION_INDEX" in env:
        return "Kubernetes"
    return None


def launch_plan(cfg: DistributedConfig, env: Mapping[str, str], on_cloud_tpu: bool = False) -> Launch | None:
    """Decides how this process joins the job (see the module docstring), without connecting.
    None: a single process. A setting that cannot work raises ConfigError naming it."""
    launcher = detect_launcher(env, on_cloud_tpu)
    address = cfg.coordinator_address or env.get("JAX_COORDINATOR_ADDRESS", "")
    mpi5 = "OMPI_MCA_orte_hnp_uri" not in env and (_int(env, "OMPI_COMM_WORLD_SIZE") or 1) > 1
    if address:
        source = "distributed.coordinator_address" if cfg.coordinator_address else "JAX_COORDINATOR_ADDRESS"
        num = cfg.num_processes or _int(env, "JAX_NUM_PROCESSES")
        pid = cfg.process_id if cfg.process_id >= 0 else _int(env, "JAX_PROCESS_ID")
        if mpi5:  # Open MPI 5 (PMIx) gives JAX no coordinator, but its ranks are still there
            num = num or _int(env, "OMPI_COMM_WORLD_SIZE")
            pid = pid if pid is not None else _int(env, "OMPI_COMM_WORLD_RANK")
        if (num is None or pid is None) and launcher is None:
            missing = "distributed.num_processes" if num is None else "distributed.process_id"
            raise ConfigError(
                f"{source} = {address!r} is set but {missing} is not, and no launcher (SLURM, Open MPI, "
                f"Cloud TPU, Kubernetes) gives it; set {missing} (or $JAX_NUM_PROCESSES / $JAX_PROCESS_ID)")
        if num is not None and pid is not None and not 0 <= pid < num:
            raise ConfigError(f"process id {pid} is not below the number of processes {num} "
                              f"(distributed.process_id / distributed.num_processes); ids run 0..{num - 1}")
        return Launch(source if launcher is None else f"{source} + {launcher}",
                      {"coordinator_address": address, "num_processes": num, "process_id": pid})
    if cfg.num_processes == 1:
        return None  # explicitly one process, whatever the environment says
    if cfg.num_processes > 1 or cfg.process_id >= 0:
        raise ConfigError(f"distributed.num_processes = {cfg.num_processes} / distributed.process_id = "
                          f"{cfg.process_id} need distributed.coordinator_address=HOST:PORT (process 0's host "
                          f"and a free port), unless a launcher (SLURM, Open MPI, Cloud TPU) sets them all")
    if mpi5:
        raise ConfigError(
            "running under Open MPI without OMPI_MCA_orte_hnp_uri (Open MPI 5 / PMIx): JAX cannot find "
            "process 0 there; set distributed.coordinator_address=HOST:PORT with the host of rank 0 "
            "(the process count and id come from OMPI_COMM_WORLD_SIZE / OMPI_COMM_WORLD_RANK)")
    return Launch(launcher) if launcher else None


def _on_cloud_tpu() -> bool:
    """True on a Cloud TPU VM (JAX's own check, made when jax is imported)."""
    try:
        from jax._src import cloud_tpu_init
    except ImportError:
        return False
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def initialize(cfg: DistributedConfig) -> str | None:
    """Joins the job's processes as `launch_plan` decides; returns where the settings came from
    (None: one process). Safe to call twice."""
    if jax.distributed.is_initialized():
        return "already initialized"
    plan = launch_plan(cfg, os.environ, _on_cloud_tpu())
    if plan is None:
        return None
    if plan.source == "Kubernetes" and importlib.util.find_spec("kubernetes") is None:
        raise ConfigError(
            "this pod belongs to an Indexed Job (JOB_COMPLETION_INDEX is set): JAX finds the other pods "
            "through the Kubernetes API, which needs the `kubernetes` package (pip install 'jax[k8s]') and "
            "permission to read pods and jobs; or pass distributed.coordinator_address / num_processes / "
            "process_id as recipes/launch/k8s does (distributed.num_processes=1 for a single process)")
    jax.distributed.initialize(**plan.kwargs)
    return plan.source
