"""oneDNN's convolutions, matrix multiplies, LayerNorm and attention as XLA FFI calls on CPU:
building and loading them (the calls themselves are `onednn.py`).

XLA:CPU runs convolutions through Eigen, which on an AVX-512 Xeon reaches a third to a half of
oneDNN's speed on ResNet's 3x3 layers, and its GEMMs copy one operand transposed for every kernel
gradient (docs/performance.md); PyTorch runs all of these through oneDNN. `onednn.cc` wraps
oneDNN's forward, input-gradient and kernel-gradient convolutions, its matrix multiply (dense
layers, attention's batched products) and its LayerNorm for jitted JAX code, spreading each call
over XLA's own intra-op threads. It is compiled with the system's C++ compiler on first use
(about 3 s, `jaxvision/compiled.py`) and reused by every later process.

Needs x86-64 Linux, oneDNN's library and headers (the `cpu` extra installs them from PyPI:
onednn-cpu-gomp, onednn-devel-cpu-gomp) and a C++17 compiler. Where MKL is installed too (the
`mkl` package, also in the extra) float32 products run on its sgemm on Intel CPUs, as PyTorch's
do, and on oneDNN's elsewhere, where it measured faster (an AMD EPYC); `JAXVISION_MKL=1` or `0`
overrides the vendor when the library loads. The custom calls are registered for the CPU platform
only, and XLA does not partition them: `CpuOps` uses them on one-device meshes only.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
import platform
import shutil
import sys

import jax

from jaxvision import compiled
from jaxvision.errors import UserError

INSTALL = "pip install 'jaxvision[cpu]'"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "onednn.cc")
# FFI target -> the symbol of its handler in onednn.cc
TARGETS = {f"jaxvision_{name}": f"Jaxvision{symbol}" for name, symbol in [
    ("conv_fwd", "ConvForward"), ("conv_bwd_data", "ConvBackwardData"), ("conv_bwd_weights", "ConvBackwardWeights"),
    ("matmul", "Matmul"), ("layer_norm_fwd", "LayerNormForward"), ("layer_norm_bwd", "LayerNormBackward"),
    ("attention_fwd", "AttentionForward"), ("attention_bwd", "AttentionBackward")]}


class Unavailable(UserError):
    """oneDNN's kernels cannot be built or loaded here; the message says why and what to do."""


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


def _command(compiler: str, include: str, libdir: str, mkl: str | None):
    def command(out: str) -> list[str]:
        cmd = [compiler, "-O3", "-std=c++17", "-shared", "-fPIC", "-w", SOURCE, f"-I{include}",
               f"-I{jax.ffi.include_dir()}", f"-L{libdir}", "-ldnnl", "-lgomp", f"-Wl,-rpath,{libdir}", "-o", out]
        if mkl:  # linked by file name: the PyPI wheel ships libmkl_rt.so.N without the unversioned link
            folder = os.path.dirname(mkl)
            cmd[-2:-2] = ["-DJAXVISION_MKL", f"-L{folder}", f"-l:{os.path.basename(mkl)}", f"-Wl,-rpath,{folder}"]
        return cmd
    return command


def build(cache_dir: str | None = None) -> str:
    """Path of the compiled kernels in `cache_dir` (default `~/.cache/jaxvision/native`),
    compiling them first unless a build for this source, jax, oneDNN and compiler is there."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise Unavailable(f"the oneDNN kernels are built for x86-64 Linux only, not {platform.system()} "
                          f"{platform.machine()}")
    include, libdir = _find_onednn()
    mkl = _find_mkl(_onednn_roots())
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        raise Unavailable("no C++ compiler (c++, g++ or $CXX) to build the oneDNN kernels: install one "
                          "(Debian/Ubuntu: apt install g++)")
    key = "|".join([jax.__version__, include, os.path.realpath(os.path.join(libdir, "libdnnl.so")), compiler, mkl or ""])
    try:
        return compiled.shared_library(SOURCE, "libjaxvision_onednn.so", _command(compiler, include, libdir, mkl),
                                       key, "the oneDNN CPU kernels", cache_dir)
    except compiled.BuildError as e:
        raise Unavailable(str(e)) from None


@functools.cache
def library() -> ctypes.CDLL:
    """The compiled kernels (`build()`), loaded, with their FFI targets registered."""
    lib = ctypes.CDLL(build())
    for target, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    lib.JaxvisionOnednnInfo.restype = ctypes.c_char_p
    return lib


def unavailable() -> str | None:
    """None when the kernels build and load here, else why not, in one line."""
    try:
        library()
    except Unavailable as e:
        return str(e).splitlines()[0]
    return None


def installed() -> bool:
    """Whether oneDNN's library and headers are installed (the `cpu` extra), without building."""
    try:
        _find_onednn()
    except Unavailable:
        return False
    return platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")


def info() -> str:
    """What the kernels dispatch to, e.g. 'oneDNN 3.2.0 (avx512_core_amx)'."""
    return library().JaxvisionOnednnInfo().decode()
