"""Which `Ops` (jaxvision.models.ops) a computation runs on, chosen for the platform it is
compiled for: the one place where a platform's own implementations are picked.

    ops = backends.ops_for("tpu")                       # what a TPU program should trace with
    ops = backends.for_mesh(mesh)                       # the platform of the mesh's devices
    model = models.create("resnet50", ops=ops)

`backend` (the config's `backend`):
  auto      cpu: the CPU backend (`jaxvision.backends.cpu`) when the `cpu` extra is installed,
            with oneDNN's kernels on one-device meshes, else the portable ops with a one-line
            note; cuda: the portable ops with cuDNN attention where it applies; others portable
  portable  `Ops()` on every platform
  cpu       the CPU backend (cpu targets only); without oneDNN's kernels, where they cannot load,
            with a one-line note saying why

The choice is a static `Ops` object inside the model, so jit keys on it; nothing here is read
while tracing.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

from jaxvision.errors import UserError

if TYPE_CHECKING:
    from jaxvision.models.ops import Ops

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
BACKENDS = ("auto", "portable", "cpu")
log = logging.getLogger("jaxvision")


def check_platform(platform: str, what: str = "platform") -> str:
    if platform not in PLATFORMS:
        raise UserError(f"{what} must be one of {', '.join(PLATFORMS)}, not {platform!r}")
    return platform


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise UserError(f"config.backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    return backend


def ops_for(platform: str, backend: str = "auto", devices: int = 1) -> Ops:
    """The ops for a computation compiled for `platform` over `devices` devices."""
    from jaxvision.models.ops import PORTABLE, Ops  # (the package stays light for hostmem)

    check_platform(platform)
    check_backend(backend)
    if backend == "portable" or (platform != "cpu" and backend == "auto"):
        return Ops(cudnn_attention=True) if platform == "cuda" and backend == "auto" else PORTABLE
    if platform != "cpu":
        raise UserError(f"config.backend=cpu compiles for CPU only, not {platform}: use backend=auto or portable")
    from jaxvision.backends.cpu import native
    from jaxvision.backends.cpu.ops import CpuOps

    if backend == "auto" and not native.installed():
        _note(f"jaxvision: portable ops on CPU (the CPU backend is not installed: {native.INSTALL}, "
              "on x86-64 Linux)")
        return PORTABLE
    if devices != 1:
        return CpuOps(native=False)  # XLA would not partition the kernels' custom calls
    reason = native.unavailable()
    if reason:
        _note(f"jaxvision: the CPU backend without oneDNN's kernels ({reason})")
        return CpuOps(native=False)
    return CpuOps(native=True)


def platform_of(devices) -> str:
    """The compile platform of these devices: 'cpu', 'tpu', 'cuda' or 'rocm'."""
    device = next(iter(devices))
    if device.platform != "gpu":
        return device.platform
    return "rocm" if "rocm" in device.client.platform_version.lower() else "cuda"


def for_mesh(mesh, backend: str = "auto") -> Ops:
    """The ops for computations over `mesh`'s devices."""
    return ops_for(platform_of(mesh.devices.flat), backend, mesh.devices.size)


@functools.cache
def _note(message: str) -> None:
    log.warning(message)
