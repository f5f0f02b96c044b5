"""Multi-process start-up with JAX's own runtime (`jax.distributed`)."""

from __future__ import annotations

import os

import jax
from absl import logging

# Environment variables that mean "this process is one of several" for the launchers JAX knows.
_CLUSTER_HINTS = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES",
                  "MEGASCALE_COORDINATOR_ADDRESS", "OMPI_COMM_WORLD_SIZE")


def _in_cluster() -> bool:
    if os.environ.get("SLURM_NTASKS") and int(os.environ["SLURM_NTASKS"]) < 2:
        return False
    return any(os.environ.get(k) for k in _CLUSTER_HINTS)


def initialize(config) -> None:
    """`jax.distributed.initialize()` when `config.distributed` is "true", or "auto" and the
    environment describes a multi-process job (TPU pod, SLURM, Open MPI, or
    `JAX_COORDINATOR_ADDRESS` with `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID` as `launch/local.py`
    sets them; on Kubernetes set `config.distributed=true`). JAX detects the cluster's
    coordinator, process count and rank itself."""
    mode = str(config.distributed).lower()
    if mode in ("false", "off") or (mode == "auto" and not _in_cluster()):
        return
    explicit = {}
    if os.environ.get("JAX_NUM_PROCESSES"):
        explicit = {"num_processes": int(os.environ["JAX_NUM_PROCESSES"]),
                    "process_id": int(os.environ["JAX_PROCESS_ID"])}
    jax.distributed.initialize(**explicit)
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
