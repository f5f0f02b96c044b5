"""Host memory that stays mapped from one step to the next (the buffers of XLA:CPU, the input
pipeline's batches).

XLA:CPU mallocs every intermediate of a step and frees it at the end. glibc serves blocks above
its mmap threshold (at most 32 MiB) with a fresh mapping and unmaps it on free, so every step
faults its gigabytes of temporaries in again and the kernel zeroes each page: on this project's
2-core VM, 500,000 page faults and 0.8 s of kernel time per EfficientNet-B0 training step of
1.2 s (`python experiments/host_memory.py`). An allocator that keeps freed memory removes both.

`JAXVISION_MALLOC` picks how, when an entry point calls `relaunch()` (the environment of the
dynamic loader and of glibc is read only at process start, so the process restarts itself once):
  auto      tcmalloc if the system has it (Debian/Ubuntu: `apt install libtcmalloc-minimal4`),
            else `huge`; the default
  tcmalloc  LD_PRELOAD tcmalloc with TCMALLOC_RELEASE_RATE=0: freed memory is kept and reused,
            no page faults after the first steps (training 1.23x ViT-S, 1.79x EfficientNet-B0)
  huge      glibc with 2 MiB transparent huge pages (glibc.malloc.hugetlb=1, glibc >= 2.35):
            500x fewer faults, but the kernel still zeroes every page of every step
  system    leave the process as it is
glibc alone cannot keep the memory: its mmap threshold stops at 32 MiB, and serving every block
from its main heap (mmap_max=0, arena_max=1, no trimming) fragments it, up to 12 GiB for
ResNet-50's 2.5 GiB step (experiments/PERF.md).
"""

from __future__ import annotations

import ctypes.util
import os
import sys

MODES = ("auto", "tcmalloc", "huge", "system")
TCMALLOC_LIBRARIES = ("tcmalloc_minimal", "tcmalloc")
HUGE_PAGES = "glibc.malloc.hugetlb=1"
MARK = "JAXVISION_MALLOC_APPLIED"  # set in the restarted process: restart only once


def _glibc_version() -> tuple[int, ...]:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (AttributeError, ValueError, OSError):  # not glibc (musl, macOS, Windows)
        return ()
    return tuple(int(p) for p in version.split(".")[:2]) if name == "glibc" else ()


def find_tcmalloc() -> str | None:
    """The soname of a tcmalloc the dynamic loader can find, or None."""
    return next(filter(None, map(ctypes.util.find_library, TCMALLOC_LIBRARIES)), None)


def malloc_env(env: dict, tcmalloc: str | None, glibc: tuple[int, ...]) -> dict | None:
    """`env` for the restarted process, or None when nothing is to change: mode `system`, already
    applied, the user's own LD_PRELOAD or GLIBC_TUNABLES for malloc (their choice stands), not
    glibc, or a mode this system cannot give (tcmalloc missing, glibc < 2.35 for `huge`)."""
    mode = env.get("JAXVISION_MALLOC", "auto")
    if mode not in MODES:
        raise ValueError(f"JAXVISION_MALLOC={mode!r}: expected one of {', '.join(MODES)}")
    preload, tunables = env.get("LD_PRELOAD", ""), env.get("GLIBC_TUNABLES", "")
    if mode == "system" or MARK in env or "malloc" in preload or "glibc.malloc" in tunables or not glibc:
        return None
    if mode == "auto":
        mode = "tcmalloc" if tcmalloc else "huge"
    if mode == "tcmalloc":
        if not tcmalloc:
            return None
        return {**env, MARK: mode, "LD_PRELOAD": f"{tcmalloc}:{preload}" if preload else tcmalloc,
                "TCMALLOC_RELEASE_RATE": env.get("TCMALLOC_RELEASE_RATE", "0")}
    if glibc < (2, 35):  # the first glibc with the hugetlb tunable
        return None
    return {**env, MARK: mode, "GLIBC_TUNABLES": f"{tunables}:{HUGE_PAGES}" if tunables else HUGE_PAGES}


def relaunch() -> None:
    """Replace this process by the same command line in the environment `JAXVISION_MALLOC` asks
    for, when it changes anything. Call it first thing in an entry point: nothing before it
    survives (the pid does)."""
    if sys.platform != "linux":
        return
    tcmalloc = find_tcmalloc()
    if os.environ.get("JAXVISION_MALLOC") == "tcmalloc" and not tcmalloc and MARK not in os.environ:
        print("jaxvision: JAXVISION_MALLOC=tcmalloc but no tcmalloc library was found; running with "
              "the system allocator (Debian/Ubuntu: apt install libtcmalloc-minimal4)", file=sys.stderr)
    env = malloc_env(dict(os.environ), tcmalloc, _glibc_version())
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, env)
