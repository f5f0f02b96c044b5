"""A training run's hold on its workdir: the directory must be writable, and one run at a time
trains in it (WORKDIR/run.lock, naming the host and pid that hold it).

The lock is an exclusive `flock` on the file, which the kernel drops when its process dies, so a
lock left by a killed run is taken over (with a warning naming it); a live holder is named in the
error. Only process 0 of a multi-process run takes it, and tells the others the outcome.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxvision.errors import UserError

LOCK = "run.lock"
log = logging.getLogger("jaxvision")


class WorkdirError(UserError):
    """The workdir cannot be used for this run; the message says why."""


def prepare(workdir: str) -> str:
    """The absolute workdir, created and checked writable."""
    path = os.path.abspath(os.path.expanduser(workdir))
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise WorkdirError(f"cannot write to the workdir {path} ({e.strerror}); choose a writable --workdir") from None
    return path


class RunLock:
    """Held for the life of a training run (`with RunLock(workdir):`)."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK)
        self._file = None

    def __enter__(self):
        problem = self._acquire() if jax.process_index() == 0 else ""
        if jax.process_count() > 1:
            held = multihost_utils.broadcast_one_to_all(np.int32(bool(problem)))
            problem = problem or (f"{self.path} is held by another run" if held else "")
        if problem:
            raise WorkdirError(problem)
        return self

    def _acquire(self) -> str:
        """'' once held, else why not."""
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = self._holder()
            self._file.close()
            self._file = None
            return (f"another run is training in {os.path.dirname(self.path)} ({holder}); wait for it, "
                    "stop it, or use another --workdir")
        previous = self._holder()
        if previous:
            log.warning("jaxvision: took over the lock of a run that is gone (%s)", previous)
        self._file.seek(0)
        self._file.truncate()
        json.dump({"host": socket.gethostname(), "pid": os.getpid(),
                   "started": time.strftime("%Y-%m-%d %H:%M:%S")}, self._file)
        self._file.flush()
        return ""

    def _holder(self) -> str:
        try:
            self._file.seek(0)
            info = json.loads(self._file.read() or "{}")
        except (OSError, ValueError):
            return ""
        return f"host {info['host']}, pid {info['pid']}, started {info['started']}" if info else ""

    def __exit__(self, *_):
        if self._file is not None:
            self._file.seek(0)
            self._file.truncate()
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
