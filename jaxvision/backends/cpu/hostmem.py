"""Host memory that stays mapped from one step to the next, for runs on XLA:CPU.

XLA:CPU mallocs every intermediate of a step and frees it at the end. glibc serves blocks above
its mmap threshold (at most 32 MiB) with a fresh mapping and unmaps it on free, so every step
faults its gigabytes of temporaries in again and the kernel zeroes each page: on this project's
2-core VM, 500,000 page faults and 0.8 s of kernel time per EfficientNet-B0 training step of
1.2 s (`python experiments/host_memory.py`). An allocator that keeps freed memory removes both.

`JAXVISION_MALLOC` picks how, when an entry point calls `relaunch()` (the environment of the
dynamic loader and of glibc is read only at process start, so the process restarts itself once,
saying so in one line). It acts only where the run's devices are CPU: with an accelerator, host
memory is not the step's working memory.
  auto      the first of tcmalloc, tbbmalloc, huge that this host has; the default
  tcmalloc  LD_PRELOAD the system's tcmalloc (Debian/Ubuntu: `apt install libtcmalloc-minimal4`)
            with TCMALLOC_RELEASE_RATE=0: freed memory is kept and reused
  tbbmalloc LD_PRELOAD oneTBB's malloc from the Python environment (the `tbb` package, which
            the `cpu` extra installs) with TBB_MALLOC_SET_HUGE_SIZE_THRESHOLD=1 MiB: freed blocks
            above it are kept for reuse (by default it keeps none above a few MiB)
  huge      glibc with 2 MiB transparent huge pages (glibc.malloc.hugetlb=1, glibc >= 2.35):
            500x fewer faults, but the kernel still zeroes every page of every step
  system    leave the process as it is (switches the restart off)
glibc alone cannot keep the memory: its mmap threshold stops at 32 MiB, and serving every block
from its main heap (mmap_max=0, arena_max=1, no trimming) fragments it, up to 12 GiB for
ResNet-50's 2.5 GiB step (docs/performance.md).

The restarted process puts the variables back as they were, so the processes it starts (grain's
workers, compilers) run on the system's allocator. This module imports neither jax nor numpy: it
runs before them.
"""

from __future__ import annotations

import ctypes.util
import glob
import importlib.metadata
import json
import os
import sys

MODES = ("auto", "tcmalloc", "tbbmalloc", "huge", "system")
TCMALLOC_LIBRARIES = ("tcmalloc_minimal", "tcmalloc")
HUGE_PAGES = "glibc.malloc.hugetlb=1"
TBB_THRESHOLD = "TBB_MALLOC_SET_HUGE_SIZE_THRESHOLD"
MARK = "JAXVISION_MALLOC_APPLIED"  # set for the restarted process: restart only once
SAVED = "JAXVISION_MALLOC_SAVED"  # the variables the restart changed, as they were (JSON)
ACCELERATOR_PLUGINS = ("jax-cuda", "jax_cuda", "jax-rocm", "jax_rocm", "libtpu")
ACCELERATOR_DEVICES = ("/dev/nvidia0", "/dev/kfd", "/dev/accel0", "/dev/vfio/0")
_applied: str | None = None


def _glibc_version() -> tuple[int, ...]:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (AttributeError, ValueError, OSError):  # not glibc (musl, macOS, Windows)
        return ()
    return tuple(int(p) for p in version.split(".")[:2]) if name == "glibc" else ()


def find_tcmalloc() -> str | None:
    """The soname of a tcmalloc the dynamic loader can find, or None."""
    return next(filter(None, map(ctypes.util.find_library, TCMALLOC_LIBRARIES)), None)


def find_tbbmalloc() -> str | None:
    """oneTBB's malloc and its malloc proxy in this Python environment (the `tbb` wheel), as an
    LD_PRELOAD list (the proxy has no search path for the library), or None."""
    found = [sorted(glob.glob(os.path.join(sys.prefix, "lib", f"{name}.so.*")), key=len)
             for name in ("libtbbmalloc", "libtbbmalloc_proxy")]
    return ":".join(paths[0] for paths in found) if all(found) else None


def cpu_run(env: dict) -> bool:
    """Whether JAX will run on CPU, judged before it starts: JAX_PLATFORMS names cpu first, or no
    accelerator plugin is installed, or its device is absent (JAX then falls back to CPU)."""
    platforms = [p.strip() for p in env.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return platforms[0] == "cpu"
    names = {(d.metadata["Name"] or "").lower() for d in importlib.metadata.distributions()}
    plugins = any(n.startswith(ACCELERATOR_PLUGINS) for n in names)
    return not (plugins and any(os.path.exists(d) for d in ACCELERATOR_DEVICES))


def _preload(env: dict, mode: str, library: str, extra: dict) -> dict:
    preload = env.get("LD_PRELOAD", "")
    return {**env, MARK: mode, "LD_PRELOAD": f"{library}:{preload}" if preload else library, **extra}


def malloc_env(env: dict, tcmalloc: str | None, tbbmalloc: str | None, glibc: tuple[int, ...]) -> dict | None:
    """`env` for the restarted process, or None when nothing is to change: mode `system`, already
    applied, the user's own LD_PRELOAD or GLIBC_TUNABLES for malloc (their choice stands), not
    glibc, or a mode this system cannot give (the library missing, glibc < 2.35 for `huge`)."""
    mode = env.get("JAXVISION_MALLOC", "auto")
    if mode not in MODES:
        raise ValueError(f"JAXVISION_MALLOC={mode!r}: expected one of {', '.join(MODES)}")
    preload, tunables = env.get("LD_PRELOAD", ""), env.get("GLIBC_TUNABLES", "")
    if mode == "system" or MARK in env or "malloc" in preload or "glibc.malloc" in tunables or not glibc:
        return None
    if mode == "auto":
        mode = "tcmalloc" if tcmalloc else "tbbmalloc" if tbbmalloc else "huge"
    if mode == "tcmalloc":
        return tcmalloc and _preload(env, mode, tcmalloc,
                                     {"TCMALLOC_RELEASE_RATE": env.get("TCMALLOC_RELEASE_RATE", "0")})
    if mode == "tbbmalloc":
        return tbbmalloc and _preload(env, mode, tbbmalloc, {TBB_THRESHOLD: env.get(TBB_THRESHOLD, str(2 ** 20))})
    if glibc < (2, 35):  # the first glibc with the hugetlb tunable
        return None
    return {**env, MARK: mode, "GLIBC_TUNABLES": f"{tunables}:{HUGE_PAGES}" if tunables else HUGE_PAGES}


def applied() -> str:
    """The allocator this process runs on: a mode `relaunch()` applied, else 'system'."""
    return _applied or "system"


def _restore() -> None:
    """In the restarted process: the changed variables back as they were, for child processes."""
    global _applied
    _applied = os.environ.pop(MARK)
    for key, value in json.loads(os.environ.pop(SAVED, "{}")).items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def relaunch() -> None:
    """Replace this process by the same command line in the environment `JAXVISION_MALLOC` asks
    for, when it changes anything and the run is on CPU. Call it first thing in an entry point:
    nothing before it survives (the pid does)."""
    if MARK in os.environ:
        _restore()
        return
    if sys.platform != "linux" or not cpu_run(os.environ):
        return
    mode = os.environ.get("JAXVISION_MALLOC")
    libraries = {"tcmalloc": find_tcmalloc(), "tbbmalloc": find_tbbmalloc()}
    if mode in libraries and not libraries[mode]:
        hint = "apt install libtcmalloc-minimal4" if mode == "tcmalloc" else "pip install 'jaxvision[cpu]'"
        print(f"jaxvision: JAXVISION_MALLOC={mode} but no {mode} library was found; running with "
              f"the system allocator ({hint})", file=sys.stderr)
    env = malloc_env(dict(os.environ), libraries["tcmalloc"], libraries["tbbmalloc"], _glibc_version())
    if env is None:
        return
    changed = [k for k in ("LD_PRELOAD", "GLIBC_TUNABLES", "TCMALLOC_RELEASE_RATE", TBB_THRESHOLD)
               if env.get(k) != os.environ.get(k)]
    env[SAVED] = json.dumps({k: os.environ.get(k) for k in changed})
    print(f"jaxvision: restarting on the {env[MARK]} allocator, which keeps XLA:CPU's step memory mapped "
          "(JAXVISION_MALLOC=system to run as started)", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
