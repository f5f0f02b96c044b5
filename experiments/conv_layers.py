"""Single convolutions: XLA:CPU's `lax.conv_general_dilated`, the CPU backend's rewrites
(`jaxvision/backends/cpu/conv.py`: 1x1 as a GEMM, depthwise as shifted multiply-adds, stride-1 3x3
by Winograd's algorithm), oneDNN's kernels (`jaxvision/backends/cpu/native.py`, with the `cpu`
extra) and torch.

    python experiments/conv_layers.py            # 1x1, 3x3 and depthwise: XLA, jaxvision, oneDNN, torch
    python experiments/conv_layers.py --dense    # dense 3x3, 7x7, patch embeddings: lax.conv, one GEMM, oneDNN, torch

Batch 16, float32, channels-last in both frameworks, best of 5 calls after warm-up, host memory in
the allocator of `jaxvision.backends.cpu.hostmem` as in training. Prints forward and forward+backward milliseconds
per layer shape (ResNet-50 and EfficientNet-B0 shapes).
Needs the `parity` extra (torch).
"""

from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp
from jax import lax

import functools

from jaxvision.backends.cpu import conv, hostmem, native

# (height, channels in, channels out, kernel, stride, groups): groups == channels is depthwise.
SHAPES = [(56, 64, 64, 1, 1, 1), (56, 256, 64, 1, 1, 1), (14, 256, 1024, 1, 1, 1), (56, 256, 512, 1, 2, 1),
          (56, 64, 64, 3, 1, 1), (28, 128, 128, 3, 1, 1), (14, 256, 256, 3, 1, 1), (7, 512, 512, 3, 1, 1),
          (112, 32, 32, 3, 1, 32), (56, 144, 144, 3, 1, 144), (28, 240, 240, 5, 1, 240),
          (112, 96, 96, 3, 2, 96)]


def best_ms(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def jax_ms(impl, x, w, stride, groups):
    def f(x, w):
        return impl(x, w, (stride, stride), "SAME", dimension_numbers=conv.NHWC, feature_group_count=groups)

    fwd = jax.jit(f)
    both = jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w) ** 2), argnums=(0, 1)))
    return (best_ms(lambda: fwd(x, w).block_until_ready()),
            best_ms(lambda: jax.block_until_ready(both(x, w))))


def lowering_ms(kernels: str, impl, x, w, stride, groups):
    """`jax_ms` of jaxvision's `conv.conv_general_dilated`: 'xla' for the XLA:CPU rewrites,
    'onednn' for oneDNN's kernels (None where they do not load)."""
    if kernels == "onednn" and native.unavailable():
        return None
    return jax_ms(functools.partial(impl, native=kernels == "onednn"), x, w, stride, groups)


def cell(times) -> str:
    return "-" if times is None else f"{times[0]:.1f} / {times[1]:.1f}"


def torch_ms(h, cin, cout, k, stride, groups, padding=None):
    import torch

    x = torch.randn(16, cin, h, h).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(cout, cin // groups, k, k, requires_grad=True)
    padding = k // 2 if padding is None else padding
    f = lambda: torch.nn.functional.conv2d(x, w, stride=stride, padding=padding, groups=groups)

    def both():
        y = f()
        (y * y).sum().backward()

    with torch.no_grad():
        fwd = best_ms(f)
    return fwd, best_ms(both)


DENSE_SHAPES = [(56, 128, 128, 3, 2), (28, 256, 256, 3, 2), (14, 512, 512, 3, 2), (8, 256, 256, 3, 2),
                (32, 32, 32, 3, 2), (224, 3, 16, 3, 2), (224, 3, 32, 3, 2), (224, 3, 64, 7, 2), (4, 512, 512, 3, 1),
                (7, 512, 512, 3, 1), (8, 512, 512, 3, 1), (10, 256, 256, 3, 1), (14, 256, 256, 3, 1),
                (224, 3, 384, 16, 16), (224, 3, 96, 4, 4)]  # stride = kernel: `conv.patch_matmul`


def dense():
    """Dense convolutions as XLA's convolution and as one GEMM on the patches (`conv.im2col`,
    which `conv.as_im2col` picks for the stride-2 3x3 rows and the stride-1 ones up to 7x7; for
    the last two rows, patch embeddings, `conv.patch_matmul`)."""
    import torch

    torch.set_num_threads(os.cpu_count())
    print(f"oneDNN: {native.unavailable() or native.info()}\n")
    print("| layer (batch 16) | lax.conv fwd / fwd+bwd ms | im2col GEMM fwd / fwd+bwd ms | "
          "oneDNN fwd / fwd+bwd ms | torch fwd / fwd+bwd ms |\n|---|---:|---:|---:|---:|")
    for h, cin, cout, k, stride in DENSE_SHAPES:
        x = jax.random.normal(jax.random.key(0), (16, h, h, cin))
        w = 0.05 * jax.random.normal(jax.random.key(1), (k, k, cin, cout))
        p = 0 if k == stride else k // 2  # PyTorch's symmetric padding, as the zoo's CNNs
        pads = ((p, p), (p, p))
        gemm = (lambda x, w, s, _, **kw: conv.patch_matmul(x, w)) if k == stride else (
            lambda x, w, s, _, **kw: conv.im2col(x, w, s, pads))
        cells = [jax_ms(lambda x, w, s, _, **kw: lax.conv_general_dilated(x, w, s, pads, **kw), x, w, stride, 1),
                 jax_ms(gemm, x, w, stride, 1),
                 lowering_ms("onednn", lambda x, w, s, _, native, **kw: conv.conv_general_dilated(
                     x, w, s, pads, native=native, **kw), x, w, stride, 1),
                 torch_ms(h, cin, cout, k, stride, 1, p)]
        print(f"| {k}x{k}/{stride}, {h}x{h}, {cin}->{cout} | " + " | ".join(map(cell, cells)) + " |", flush=True)


def main():
    if "--dense" in sys.argv:
        return dense()
    import torch

    torch.set_num_threads(os.cpu_count())
    print(f"oneDNN: {native.unavailable() or native.info()}\n")
    print("| layer (batch 16) | XLA conv fwd / fwd+bwd ms | jaxvision's XLA lowering fwd / fwd+bwd ms | "
          "oneDNN fwd / fwd+bwd ms | torch fwd / fwd+bwd ms |\n|---|---:|---:|---:|---:|")
    for h, cin, cout, k, stride, groups in SHAPES:
        x = jax.random.normal(jax.random.key(0), (16, h, h, cin))
        w = 0.05 * jax.random.normal(jax.random.key(1), (k, k, cin // groups, cout))
        kind = "depthwise" if groups > 1 else f"{cin}->{cout}"
        cells = [jax_ms(lax.conv_general_dilated, x, w, stride, groups),
                 lowering_ms("xla", conv.conv_general_dilated, x, w, stride, groups),
                 lowering_ms("onednn", conv.conv_general_dilated, x, w, stride, groups),
                 torch_ms(h, cin, cout, k, stride, groups)]
        print(f"| {k}x{k}/{stride}, {h}x{h}, {kind} | " + " | ".join(map(cell, cells)) + " |", flush=True)


if __name__ == "__main__":
    hostmem.relaunch()  # as `jaxvision.main` and bench.py run
    main()
