"""Stop cleanly at a step boundary when the job is told to go (SIGTERM: Cloud TPU preemption,
SLURM's time limit or `scancel`, Kubernetes eviction), so a checkpoint is written and the next
launch resumes with nothing lost.

One process: a SIGTERM handler sets a flag the loop reads after each step (no device sync).
Several processes: JAX's preemption service (`jax.distributed`) spreads the notice and agrees on
the step at which all of them stop (`multihost_utils.reached_preemption_sync_point`).
"""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class PreemptionWatch:
    def __init__(self):
        self._flag = threading.Event()
        self._multi = jax.process_count() > 1
        self._previous = None
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self._flag.set())

    def reached(self, step: int) -> bool:
        """True when every process should save and stop after `step`."""
        if self._multi:
            return multihost_utils.reached_preemption_sync_point(step)
        return self._flag.is_set()

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
