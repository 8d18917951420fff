"""Multi-process start-up: `jax.distributed.initialize` from config keys or the cluster's
environment (SLURM, Open MPI, multi-host Cloud TPU), before any JAX computation runs.

Each process then owns its local devices; the mesh spans all of them, each process reads only
its share of the data, only process 0 prints and writes metrics, and Orbax checkpoints are
written by all processes together.
"""

from __future__ import annotations

import os

import jax

from lmsys.config import DistributedConfig


def cluster_detected() -> str | None:
    """The name of a multi-process launcher whose environment this process runs in, if any."""
    env = os.environ
    if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1"))) > 1:
        return "SLURM"
    if "OMPI_MCA_orte_hnp_uri" in env or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "Open MPI"
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return "Cloud TPU"
    return None


def initialize(cfg: DistributedConfig) -> None:
    """Joins the job's processes: explicitly when `distributed.coordinator_address` is set, by
    JAX's cluster auto-detection when a launcher's environment is present, else stays a single
    process. Safe to call twice."""
    if jax.distributed.is_initialized():
        return
    if cfg.coordinator_address:
        jax.distributed.initialize(
            coordinator_address=cfg.coordinator_address,
            num_processes=cfg.num_processes or None,
            process_id=None if cfg.process_id < 0 else cfg.process_id)
    elif cluster_detected():
        jax.distributed.initialize()
