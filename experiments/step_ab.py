"""One lever of the CPU backend, on and off, in the same process: training (or inference)
images/s of both.

    python experiments/step_ab.py [--lever kernel-gradient-operand] [--models resnet50 ...] [--rounds 4]
                                  [--mode inference]

Builds jaxvision's jitted train step (as experiments/bench.py does, batch 16, 224 px, float32, on
the CPU backend `jaxvision.backends.cpu`) twice per model, once as the code is and once with the
lever switched off while tracing, then alternates timed steps of the two (one untimed step before
each turn) and prints the medians. Levers (modules of jaxvision.backends.cpu):
  kernel-gradient-operand: `conv.feature_matmul`'s backward (the operand with fewer features on
      the left of the kernel-gradient GEMM) against autodiff's own (the output gradient there).
  max-pool-gradient: `layers.max_pool`'s backward (to the first maximum, from an index saved by
      the forward) against autodiff of its chain of maxima.
  subsample: the strided 1x1 convolutions' `conv.subsample` (a reduce_window) against a slice.
  attention: ViT's `attention.fused_attention` (heads ahead of tokens, the softmax normalised after
      the product with v, FlashAttention's backward) against `jax.nn.dot_product_attention`.
  bf16-accumulate (with --dtype bfloat16): `conv.feature_matmul`'s half-precision GEMMs with
      float32 results cast back, against a bfloat16 result.
  gelu-erf: `layers.gelu` (PyTorch's erf form) against `nn.gelu(approximate=False)` (erfc).
  depthwise-gradient: `conv.depthwise`'s backward (the kernel gradient as one variadic reduction
      for all taps, the input gradient of 5x5 kernels by the rotated kernel) against autodiff's.
  winograd: stride-1 3x3 convolutions by `winograd.conv3x3` against XLA's direct convolution.
  patch-embedding: convolutions whose stride is their kernel by `conv.patch_matmul` (a reshape
      and a GEMM) against XLA's convolution.
  im2col: 3x3 convolutions with a stride or on maps up to 7x7 as one GEMM on their patches
      (`conv.as_im2col`) against XLA's convolution (im2col kept only for 1x1 and 2x2 outputs).
  onednn: oneDNN's kernels (`CpuOps(native=True)`, needs the `cpu` extra) against the XLA:CPU
      rewrites alone (all the levers above).
  backend: the whole CPU backend (`CpuOps`) against the portable ops (`Ops()`).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import unittest.mock

import flax.linen as nn
from bench import JaxBench, timed
from jax import lax

from jaxvision import backends
from jaxvision.backends.cpu import attention, conv, hostmem, layers, winograd
from jaxvision.backends.cpu.ops import CpuOps
from jaxvision.models.ops import PORTABLE, Ops


def _im2col_off():
    """`conv.as_im2col` with no output features counted: only 1x1 and tiny outputs stay im2col."""
    original = conv.as_im2col
    return unittest.mock.patch.object(conv, "as_im2col", lambda kernel, strides, out, _: original(kernel, strides, out, 0))


# lever -> (a context that switches it off while tracing, or the ops without it)
LEVERS = {
    # the same forward without its custom backward: autodiff's operand order
    "kernel-gradient-operand": lambda: unittest.mock.patch.object(conv, "feature_matmul", conv.feature_matmul.fun),
    "max-pool-gradient": lambda: unittest.mock.patch.object(layers, "_max_pool", layers._max_pool.fun),
    "subsample": lambda: unittest.mock.patch.object(conv, "subsample", lambda x, s: x[:, ::s[0], ::s[1], :]),
    "attention": lambda: unittest.mock.patch.object(attention, "fused_attention", lambda qkv, native: PORTABLE.attention(qkv)),
    "bf16-accumulate": lambda: unittest.mock.patch.object(
        conv, "_dot", lambda a, b, dims, precision: lax.dot_general(a, b, dims, precision=precision)),
    "gelu-erf": lambda: unittest.mock.patch.object(layers, "gelu", functools.partial(nn.gelu, approximate=False)),
    "depthwise-gradient": lambda: unittest.mock.patch.object(conv, "depthwise", conv._depthwise),
    "winograd": lambda: unittest.mock.patch.object(winograd, "block_size", lambda x_shape, w_shape: None),
    "patch-embedding": lambda: unittest.mock.patch.object(
        conv, "patch_matmul", lambda x, k, precision=None, native=False: lax.conv_general_dilated(
            x, k, k.shape[:2], "VALID", dimension_numbers=conv.NHWC, precision=precision)),
    "im2col": lambda: _im2col_off(),
    "onednn": lambda: CpuOps(native=False),
    "backend": lambda: PORTABLE,
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lever", choices=sorted(LEVERS), default="kernel-gradient-operand")
    parser.add_argument("--models", nargs="+", default=["resnet50", "efficientnet_b0", "mobilenetv3_large_100",
                                                       "vit_small_patch16_224"])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--mode", choices=("train", "inference"), default="train")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()
    print(f"# `python experiments/step_ab.py --lever {args.lever} --mode {args.mode} --dtype {args.dtype} "
          f"--rounds {args.rounds}`: "
          f"{args.mode} img/s, batch 16, 224 px, {args.dtype}, same process\n")
    print("| model | lever off | lever on | ratio |\n|---|---:|---:|---:|")
    for name in args.models:
        benches = {}
        for on in (True, False):
            off = None if on else LEVERS[args.lever]()
            ops = off if isinstance(off, Ops) else backends.ops_for("cpu")
            with off if isinstance(off, contextlib.AbstractContextManager) else contextlib.nullcontext():
                benches[on] = getattr(JaxBench(name, 16, 224, args.dtype, ops), args.mode)  # the train step compiles here
                benches[on]()  # (inference is traced at its first call: inside the lever's context too)
        times = {True: [], False: []}
        for r in range(args.rounds):
            for on in ((True, False) if r % 2 else (False, True)):
                benches[on]()
                times[on].append(timed(benches[on], 2))
        off, on = (16 / statistics.median(times[k]) for k in (False, True))
        print(f"| {name} | {off:.2f} | {on:.2f} | {on / off:.2f} |", flush=True)
        del benches


if __name__ == "__main__":
    hostmem.relaunch()
    main()
