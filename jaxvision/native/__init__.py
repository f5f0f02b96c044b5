"""Native CPU kernels: oneDNN's convolutions, matrix multiplies and LayerNorm as XLA FFI calls.

XLA:CPU runs convolutions through Eigen, which on an AVX-512 Xeon reaches a third to a half of
oneDNN's speed on ResNet's 3x3 layers, and its GEMMs copy one operand transposed for every kernel
gradient (experiments/PERF.md); PyTorch runs all of these through oneDNN. `onednn.cc` wraps
oneDNN's forward, input-gradient and kernel-gradient convolutions, its matrix multiply (dense
layers, attention's batched products) and its LayerNorm for jitted JAX code, spreading each call
over XLA's own intra-op threads. It is compiled with the system's C++ compiler on first use
(about 3 s) into `~/.cache/jaxvision/native/<hash>/` and reused by every later process.

Needs oneDNN's library and headers, which jaxvision installs from PyPI on x86-64 Linux
(onednn-cpu-gomp, onednn-devel-cpu-gomp), and a C++17 compiler. Where MKL is installed too (the
`mkl` package, also a dependency there) float32 products run on its sgemm on Intel CPUs, as
PyTorch's do, and on oneDNN's elsewhere, where it measured faster (an AMD EPYC);
`JAXVISION_MKL=1` or `0` overrides the vendor. `JAXVISION_CPU_KERNELS` chooses:
  auto   (default) oneDNN when it can be built and JAX has one CPU device, else XLA's own;
  onednn always on CPU, and an error naming the fix when it cannot be built;
  xla    never.
With several devices the custom call would not be partitioned (XLA replicates its operands), so
`auto` leaves multi-device programs, such as the tests' 8 virtual devices, to XLA. Export
(`portable()`) never uses it: the artifact must run where jaxvision is not installed. The choice
is made while tracing: a function jax has already traced keeps the kernels it was traced with.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import glob
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import jax

from jaxvision import tracing
from jaxvision.errors import UserError

INSTALL = "pip install onednn-cpu-gomp==2023.2.0 onednn-devel-cpu-gomp==2023.2.0"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "onednn.cc")
# FFI target -> the symbol of its handler in onednn.cc
TARGETS = {f"jaxvision_{name}": f"Jaxvision{symbol}" for name, symbol in [
    ("conv_fwd", "ConvForward"), ("conv_bwd_data", "ConvBackwardData"), ("conv_bwd_weights", "ConvBackwardWeights"),
    ("matmul", "Matmul"), ("layer_norm_fwd", "LayerNormForward"), ("layer_norm_bwd", "LayerNormBackward"),
    ("attention_fwd", "AttentionForward"), ("attention_bwd", "AttentionBackward")]}
MODES = ("auto", "onednn", "xla")
_PORTABLE = contextvars.ContextVar("jaxvision_portable", default=False)
_MODE = contextvars.ContextVar("jaxvision_cpu_kernels", default=None)
log = logging.getLogger(__name__)


class Unavailable(UserError):
    """oneDNN's kernels cannot be built or loaded here; the message says why and what to do."""


def mode() -> str:
    """`use()`'s mode inside it, else `JAXVISION_CPU_KERNELS`'s."""
    value = _MODE.get() or os.environ.get("JAXVISION_CPU_KERNELS", "auto").strip().lower() or "auto"
    if value not in MODES:
        raise UserError(f"JAXVISION_CPU_KERNELS must be one of {', '.join(MODES)}, not {value!r}")
    return value


@contextlib.contextmanager
def use(value: str):
    """While tracing inside this context, `mode()` is `value` (auto, onednn or xla)."""
    with tracing.scoped(_MODE, value):
        mode()
        yield


def portable():
    """While tracing inside this context no custom call is emitted (jax.export, ONNX)."""
    return tracing.scoped(_PORTABLE, True)


def _onednn_roots() -> list[str]:
    """Where oneDNN may be: `DNNLROOT` (oneAPI's variable), the Python prefix (where pip puts the
    PyPI package's lib/ and include/), the system's."""
    return list(filter(None, [os.environ.get("DNNLROOT"), sys.prefix, sys.base_prefix, "/usr/local", "/usr"]))


def _find_onednn() -> tuple[str, str]:
    """(include dir, library dir) of oneDNN 3."""
    roots = _onednn_roots()
    for root in roots:
        include = os.path.join(root, "include")
        if not os.path.exists(os.path.join(include, "oneapi", "dnnl", "dnnl.hpp")):
            continue
        for lib in ("lib", "lib64", os.path.join("lib", f"{platform.machine()}-linux-gnu")):
            if os.path.exists(os.path.join(root, lib, "libdnnl.so")):
                return include, os.path.join(root, lib)
    raise Unavailable(f"oneDNN's headers and library were not found under {', '.join(roots)}: "
                      f"{INSTALL} (or set DNNLROOT to an installation of oneDNN 3)")


def _find_mkl(roots: list[str]) -> str | None:
    """Path of MKL's single dynamic library (libmkl_rt), if installed: the float32 products then
    run on its sgemm (onednn.cc)."""
    for root in roots:
        for lib in ("lib", "lib64"):
            found = sorted(glob.glob(os.path.join(root, lib, "libmkl_rt.so*")), key=len)
            if found:
                return found[0]
    return None


def _cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxvision", "native")


def _compile(out: str, compiler: str, include: str, libdir: str, mkl: str | None) -> None:
    cmd = [compiler, "-O3", "-std=c++17", "-shared", "-fPIC", "-w", SOURCE, f"-I{include}",
           f"-I{jax.ffi.include_dir()}", f"-L{libdir}", "-ldnnl", "-lgomp", f"-Wl,-rpath,{libdir}", "-o", out]
    if mkl:  # linked by file name: the PyPI wheel ships libmkl_rt.so.N without the unversioned link
        folder = os.path.dirname(mkl)
        cmd[-2:-2] = ["-DJAXVISION_MKL", f"-L{folder}", f"-l:{os.path.basename(mkl)}", f"-Wl,-rpath,{folder}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise Unavailable(f"compiling {SOURCE} failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")


def build(cache_dir: str | None = None) -> str:
    """Path of the compiled kernels in `cache_dir` (default `~/.cache/jaxvision/native`),
    compiling them first unless a build for this source, jax, oneDNN and compiler is there."""
    if platform.system() != "Linux":
        raise Unavailable(f"the oneDNN kernels are built for Linux only, not {platform.system()}")
    include, libdir = _find_onednn()
    mkl = _find_mkl(_onednn_roots())
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        raise Unavailable("no C++ compiler (c++, g++ or $CXX) to build the oneDNN kernels: install one, "
                          "or set JAXVISION_CPU_KERNELS=xla")
    with open(SOURCE, "rb") as f:
        key = hashlib.sha256(f.read() + "|".join([jax.__version__, include, os.path.realpath(
            os.path.join(libdir, "libdnnl.so")), compiler, mkl or ""]).encode()).hexdigest()[:16]
    folder = os.path.join(cache_dir or _cache_dir(), key)
    path = os.path.join(folder, "libjaxvision_onednn.so")
    if os.path.exists(path):
        return path
    import fcntl
    os.makedirs(folder, exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build when several processes start together
        if not os.path.exists(path):
            log.warning("jaxvision: compiling the oneDNN CPU kernels once (a few seconds) into %s", folder)
            start = time.perf_counter()
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".so")
            os.close(fd)
            try:
                _compile(tmp, compiler, include, libdir, mkl)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
            log.warning("jaxvision: oneDNN CPU kernels built in %.1f s", time.perf_counter() - start)
    return path


@functools.cache
def library() -> ctypes.CDLL:
    """The compiled kernels (`build()`), loaded, with their FFI targets registered."""
    lib = ctypes.CDLL(build())
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    lib.JaxvisionOnednnInfo.restype = ctypes.c_char_p
    return lib


def _why_not() -> str | None:
    """None when convolutions traced now go to oneDNN, else the reason they do not."""
    if _PORTABLE.get():
        return "exporting"
    if jax.default_backend() != "cpu":
        return f"backend {jax.default_backend()}"
    wanted = mode()
    if wanted == "xla":
        return "JAXVISION_CPU_KERNELS=xla"
    if wanted == "auto" and jax.device_count() != 1:
        return f"{jax.device_count()} devices; JAXVISION_CPU_KERNELS=onednn forces it"
    if wanted == "onednn":
        library()
        return None
    try:
        library()
    except Unavailable as e:
        _note_once(str(e))
        return str(e).splitlines()[0]
    return None


def enabled() -> bool:
    """Whether convolutions and dense layers traced now go to oneDNN: on the CPU backend, outside
    `portable()`, by `JAXVISION_CPU_KERNELS` (see the module docstring). `onednn` raises
    `Unavailable` when the kernels cannot be built; `auto` then quietly keeps XLA's."""
    return _why_not() is None


def describe() -> str:
    """What convolutions traced now run on, for logs and summaries: 'oneDNN 3.2.0
    (avx512_core_amx)', or 'XLA (why not oneDNN)'."""
    reason = _why_not()
    return library().JaxvisionOnednnInfo().decode() if reason is None else f"XLA ({reason})"


@functools.cache
def _note_once(reason: str) -> None:
    log.info("jaxvision: XLA's CPU convolutions (oneDNN's unavailable: %s)", reason)
