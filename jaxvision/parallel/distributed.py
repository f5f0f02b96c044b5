"""Multi-process start-up with JAX's own runtime (`jax.distributed`).

`config.distributed`:
  auto   (default) `jax.distributed.initialize()` and JAX's own cluster detection: Cloud TPU VM
         pods (through the metadata server), SLURM, Open MPI, Kubernetes/GKE, or the coordinator
         that `JAX_COORDINATOR_ADDRESS` names (with `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`, as
         `launch/local.py` sets them). Where JAX detects no cluster, a single process runs.
  true   the same, and no cluster detected is an error
  false  never: one process, whatever the environment says
"""

from __future__ import annotations

import os

import jax
from absl import logging

from jaxvision.errors import UserError

MODES = ("auto", "true", "false")


def initialize(config) -> bool:
    """Joins the cluster as `config.distributed` says; True when jax.distributed is initialized."""
    mode = str(config.distributed).lower()
    if mode not in MODES:
        raise UserError(f"config.distributed must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "false":
        return False
    explicit = {}
    if os.environ.get("JAX_NUM_PROCESSES"):
        explicit = {"num_processes": int(os.environ["JAX_NUM_PROCESSES"]),
                    "process_id": int(os.environ["JAX_PROCESS_ID"])}
    try:
        jax.distributed.initialize(**explicit)
    except ValueError as e:
        # JAX's detection found no cluster: initialize then lacks the coordinator's address.
        if "coordinator_address" not in str(e):
            raise
        if mode == "true":
            raise UserError("config.distributed=true but JAX detects no cluster (TPU pod, SLURM, Open MPI, "
                            "Kubernetes) and JAX_COORDINATOR_ADDRESS is not set") from None
        return False
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
    return True
