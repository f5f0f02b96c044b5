"""Small C/C++ libraries compiled with the system's compiler on first use and cached.

The oneDNN kernels (`backends/cpu/native.py`) and the crop-window JPEG decoder (`data/jpeg.py`)
link against libraries found at run time (oneDNN from PyPI, libjpeg-turbo from the system), so
they are built where they run rather than shipped as wheels: once per source, compiler and
dependency, into `~/.cache/jaxvision/native/<hash>/`, under a file lock so that processes starting
together (grain workers, a multi-process test) build once.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import subprocess
import tempfile
import time
from typing import Callable

log = logging.getLogger(__name__)


class BuildError(RuntimeError):
    """The compiler failed; the message holds its command and the end of its output."""


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxvision", "native")


def shared_library(source: str, name: str, command: Callable[[str], list[str]], key: str, what: str,
                   root: str | None = None) -> str:
    """Path of `name` built from `source` by `command(output_path)`, under `root` (default
    `cache_dir()`); rebuilt only when the source or `key` (the compiler, the libraries linked)
    changes. `what` names it in the one-line messages around a build."""
    with open(source, "rb") as f:
        digest = hashlib.sha256(f.read() + key.encode()).hexdigest()[:16]
    folder = os.path.join(root or cache_dir(), digest)
    path = os.path.join(folder, name)
    if os.path.exists(path):
        return path
    os.makedirs(folder, exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(path):
            return path
        log.warning("jaxvision: compiling %s once into %s", what, folder)
        start = time.perf_counter()
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".so")
        os.close(fd)
        try:
            cmd = command(tmp)
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise BuildError(f"compiling {source} failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        log.warning("jaxvision: %s built in %.1f s", what, time.perf_counter() - start)
    return path
