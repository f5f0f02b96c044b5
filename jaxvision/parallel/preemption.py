"""Stop cleanly at a step boundary when the job is told to go (SIGTERM: Cloud TPU preemption,
SLURM's time limit or `scancel`, Kubernetes eviction), so a checkpoint is written, the process
exits with `EXIT_CODE` (75, EX_TEMPFAIL: a scheduler requeues on it), and the next launch resumes
with nothing lost.

One process: a SIGTERM handler sets a flag the loop reads after each step (no device sync).
Several processes under `jax.distributed`: JAX's preemption service spreads the notice from
whichever process got it and agrees on the step at which all of them stop
(`multihost_utils.reached_preemption_sync_point`). Several processes without that service: each
catches SIGTERM itself, and every `agree_every` steps they gather their flags, so all stop at the
same step once any of them was told.
"""

from __future__ import annotations

import os
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

EXIT_CODE = getattr(os, "EX_TEMPFAIL", 75)


class PreemptionWatch:
    def __init__(self, agree_every: int = 10):
        self._flag = threading.Event()
        self._multi = jax.process_count() > 1
        self._service = (self._multi and jax.distributed.is_initialized()
                         and jax.config.jax_enable_preemption_service)
        self._every = max(1, agree_every)
        self._previous = None
        if not self._service and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self._flag.set())

    def reached(self, step: int) -> bool:
        """True when every process should save and stop after `step` (call it at every step, on
        every process)."""
        if self._service:
            return multihost_utils.reached_preemption_sync_point(step)
        if self._multi:
            if step % self._every:
                return False
            flags = multihost_utils.process_allgather(np.int32(self._flag.is_set()))
            return bool(np.any(flags))
        return self._flag.is_set()

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
