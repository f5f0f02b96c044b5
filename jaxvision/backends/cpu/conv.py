"""Convolutions and dense layers for XLA's CPU backend: the `conv_general_dilated` and
`dot_general` of `CpuOps`' Conv and Dense layers.

With oneDNN's kernels (`native=True`: `jaxvision.backends.cpu.native`, one-device meshes), every
convolution and dense layer goes to them, except patch embeddings (stride = kernel), whose
reshape-and-GEMM below has the faster backward. Otherwise:

XLA:CPU hands a convolution to its Eigen kernels, which are fast for dense 3x3 convolutions on
feature maps of 7x7 and up but slow for these (measured in docs/performance.md):
  * 1x1 (pointwise) convolutions: 5-8x slower than the same product written as a matrix
    multiply, which XLA:CPU runs as one GEMM;
  * dense convolutions with a tiny output (at most 2x2, the last stage of a ResNet at 64 px):
    3-35x slower (3x3, 512 channels, 2x2 map: 138 ms against 4 ms) than one GEMM on the
    patches (im2col), and 3x3 convolutions with stride 2 or on maps of at most 7x7 (ResNet-50's
    downsampling and layer4 convolutions): up to 1.7x slower forward and backward than im2col;
  * depthwise convolutions (one group per channel): 30x slower than k*k shifted multiply-adds,
    which XLA fuses into a single elementwise loop (and whose gradient is elementwise too);
  * convolutions whose stride is their kernel (patch embeddings): 1.4-2x slower forward, and
    far slower backward, than a reshape into patches and one GEMM;
  * stride-1 3x3 convolutions on maps of 14x14 and up in float32 (ResNet layers 1-3): Winograd's
    F(4x4, 3x3) or F(2x2, 3x3) (`winograd.py`), 1.2-2x forward and backward.
These cases are rewritten so; everything else goes to `lax.conv_general_dilated`.
The GEMMs of 1x1 convolutions and dense layers get a backward pass that chooses which operand
XLA:CPU transposes for the kernel gradient (`feature_matmul`: 1.2x on whole training steps).
The rewrites are exact up to float summation order (Winograd's transforms add a rounding of
1e-5 of the output's magnitude).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxvision.backends.cpu import onednn, winograd
from jaxvision.models.ops import output_size, windows

NHWC = ("NHWC", "HWIO", "NHWC")


def _explicit_padding(padding, spatial, kernel, strides):
    if isinstance(padding, str):
        return lax.padtype_to_pads(spatial, kernel, strides, padding)
    return [tuple(p) for p in padding]


SMALL_OUTPUT = 4  # output pixels up to which any dense convolution becomes im2col (2x2)
SMALL_MAP = 7  # output side up to which a stride-1 3x3 convolution becomes im2col


def as_im2col(kernel, strides, out_size, features) -> bool:
    """Whether a dense convolution (no groups) with `features` outputs is faster as one GEMM on
    its patches than as XLA:CPU's: always for a 1x1 kernel or an output of at most 2x2; for 3x3
    kernels with a stride (XLA's input gradient of those is a dilated convolution in Eigen's slow
    path) and on stride-1 maps of up to 7x7, if the GEMM is wide enough (32+ features) to repay
    writing the patches. Forward and backward, batch 16, three runs (`python
    experiments/conv_layers.py --dense`): ResNet-50's stride-2 3x3 layers 87-120 -> 86-94,
    73-76 -> 69-71, 71-74 -> 62-63 ms, its 7x7x512 layers 66-72 -> 62-64 ms, EfficientNet's stem
    (3x3/2, 3 -> 32) 40-52 -> 24-36 ms; MobileNetV3's stem (3 -> 16) is faster in XLA (20-32
    against 22-33 ms), from 8x8 XLA's is as fast or faster (and Winograd's more so), and the 7x7
    stride-2 stem is 5-20% slower as im2col (its patches are 49/4 times the input)."""
    if kernel == (1, 1) or math.prod(out_size) <= SMALL_OUTPUT:
        return True
    return kernel == (3, 3) and features >= 32 and (strides != (1, 1) or max(out_size) <= SMALL_MAP)


def _dot(a, b, dimension_numbers, precision):
    """`lax.dot_general`, with half-precision operands accumulated in float32 and the result cast
    back: XLA:CPU runs a bfloat16 GEMM with float32 results at twice its float32 rate (371 against
    202 GFLOP/s at 3152 x 384 x 1536 on this project's AVX-512-BF16 VM), but for a bfloat16 result
    it converts the operands to float32 first (170)."""
    dtype = jnp.result_type(a, b)
    if jnp.finfo(dtype).bits >= 32:
        return lax.dot_general(a, b, dimension_numbers, precision=precision)
    return lax.dot_general(a, b, dimension_numbers, precision=precision,
                           preferred_element_type=jnp.float32).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def feature_matmul(x, w, n_in=1, precision=None):
    """Contracts the last `n_in` axes of x (its features) with the first `n_in` of w: a 1x1
    convolution or a dense layer. Its kernel gradient contracts every other axis; XLA:CPU's GEMM
    wants those axes minor in its left operand, so that operand is transposed in memory.
    Autodiff puts the output gradient on the left; this backward puts the operand with fewer
    features there, which halves the transposed bytes or better (a 64->256 1x1 convolution at
    56x56 with its BatchNorm: forward and backward 219 -> 86 ms; docs/performance.md)."""
    return _dot(x, w, ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())), precision)


def _feature_matmul_fwd(x, w, n_in, precision):
    return feature_matmul(x, w, n_in, precision), (x, w)


def _feature_matmul_bwd(n_in, precision, residuals, dy):
    x, w = residuals
    rows, n_out = tuple(range(x.ndim - n_in)), w.ndim - n_in
    dx = _dot(dy, w, ((tuple(range(len(rows), dy.ndim)), tuple(range(n_in, w.ndim))), ((), ())), precision)
    if math.prod(x.shape[len(rows):]) <= math.prod(dy.shape[len(rows):]):
        dw = _dot(x, dy, ((rows, rows), ((), ())), precision)
    else:  # (out..., in...) -> (in..., out...)
        dw = _dot(dy, x, ((rows, rows), ((), ())), precision)
        dw = dw.transpose(tuple(range(n_out, w.ndim)) + tuple(range(n_out)))
    return dx.astype(x.dtype), dw.astype(w.dtype)


feature_matmul.defvjp(_feature_matmul_fwd, _feature_matmul_bwd)


def features(x, w, n_in=1, precision=None, native=False):
    """`feature_matmul`, on oneDNN's kernels with `native` where they take the dtypes."""
    if native and onednn.dense_supported(x, w):
        return onednn.dense(x, w, n_in)
    return feature_matmul(x, w, n_in, precision)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, *, native=False):
    """Drop-in for `lax.dot_general`: a dense layer's contraction of trailing input axes with
    leading kernel axes is `features`."""
    (lc, rc), (lb, rb) = dimension_numbers
    n = len(lc)
    if (not lb and not rb and preferred_element_type is None
            and tuple(lc) == tuple(range(lhs.ndim - n, lhs.ndim)) and tuple(rc) == tuple(range(n))):
        return features(lhs, rhs, n, precision, native)
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type)


def sum_by_halves(x):
    """x summed over its leading axis, keeping it, as pairwise adds of halves. XLA:CPU reduces a
    leading axis with many outputs 10-60x slower than this (16x197x384: 5.4 against 0.5 ms,
    256x197x384: 115 against 1.9 ms; docs/performance.md)."""
    while x.shape[0] > 1:
        half = x.shape[0] // 2
        x = jnp.concatenate([x[:half] + x[half:2 * half], x[2 * half:]]) if x.shape[0] % 2 else x[:half] + x[half:]
    return x


@jax.custom_vjp
def add_across_batch(x, y):
    """x + y for y of shape (1, *x.shape[1:]) (ViT's position embedding), whose gradient for y
    sums the batch by halves (`sum_by_halves`)."""
    return x + y


def _add_across_batch_fwd(x, y):
    return x + y, y


def _add_across_batch_bwd(y, dy):
    return dy, sum_by_halves(dy).astype(y.dtype)


add_across_batch.defvjp(_add_across_batch_fwd, _add_across_batch_bwd)


@jax.custom_vjp
def add_bias(x, b):
    """x + b over x's trailing axes (a dense layer's bias), whose gradient for b sums the output
    gradient in float32: autodiff sums it in x's dtype, which for bfloat16 XLA:CPU does 30x slower
    than the sum of its float32 conversion (16x197x1536: 17.8 against 0.6 ms;
    `python experiments/vit_kernels.py`)."""
    return x + b


def _add_bias_fwd(x, b):
    return x + b, b


def _add_bias_bwd(b, dy):
    return dy, jnp.sum(dy.astype(jnp.float32), tuple(range(dy.ndim - b.ndim))).astype(b.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def subsample(x, strides):
    """x[:, ::sh, ::sw, :]. Under differentiation the forward is a reduce_window, which XLA:CPU
    does not fuse into its consumers: as a slice it was fused into the transposed copy that a
    strided 1x1 convolution's kernel gradient reads, and that copy re-derived the residual stream
    the slice came from, three blocks deep (ResNet-50 training: 1.01-1.04x). Without
    differentiation the slice stays, which XLA hands to the GEMM for free (the reduce_window cost
    7 ms at 56x56x256; docs/performance.md)."""
    if tuple(strides) == (1, 1):
        return x
    return _subsample(x, tuple(strides), x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _subsample(x, strides, shape):
    return x[:, ::strides[0], ::strides[1], :]


def _subsample_fwd(x, strides, shape):
    return lax.reduce_window(x, 0.0, lax.add, (1, 1, 1, 1), (1, *strides, 1), "VALID"), None


def _subsample_bwd(strides, shape, residuals, dy):
    """Spreads the gradient back with zeros between (interior padding) and after."""
    edges = [(0, n - 1 - (m - 1) * s, s - 1) for n, m, s in zip(shape[1:3], dy.shape[1:3], strides)]
    return (lax.pad(dy, jnp.zeros((), dy.dtype), [(0, 0, 0), *edges, (0, 0, 0)]),)


_subsample.defvjp(_subsample_fwd, _subsample_bwd)


def im2col(x, kernel, strides, pads, precision=None):
    """Dense convolution as one GEMM: the k*k shifted views of the input side by side along
    channels (the patches) times the kernel's taps stacked the same way. Taps that see only
    padding are left out with their kernel rows. Autodiff gives the input gradient as one GEMM
    and the patches' transpose (a sum of padded views), which XLA fuses into one pass."""
    taps = list(windows(x, kernel.shape[:2], strides, pads))
    patches = jnp.concatenate([v for _, _, v in taps], -1)
    return feature_matmul(patches, jnp.concatenate([kernel[i, j] for i, j, _ in taps]), 1, precision)


def patch_matmul(x, kernel, precision=None, native=False):
    """A convolution whose stride is its kernel, unpadded (ViT's patch embedding, the 4x4 stems
    and 2x2 downsampling of ConvNeXt and Swin): the input cut into its non-overlapping patches by
    a reshape, then one GEMM. Batch 16 at 224 px, forward / forward and backward against XLA's
    convolution (`python experiments/conv_layers.py --dense`): ViT-S's 16x16 patches 15 -> 11 /
    208 -> 33 ms, a 4x4 stem with 96 features 7.4 -> 3.6 / 32 -> 12 ms."""
    (kh, kw), (n, h, w, c) = kernel.shape[:2], x.shape
    x = x[:, :h - h % kh, :w - w % kw]  # rows and columns no patch covers, as 'VALID' drops them
    x = x.reshape(n, h // kh, kh, w // kw, kw, c).transpose(0, 1, 3, 2, 4, 5)
    return features(x.reshape(n, h // kh, w // kw, kh * kw * c), kernel.reshape(-1, kernel.shape[-1]), 1, precision,
                    native)


def _depthwise(x, kernel, strides, pads):
    return functools.reduce(jnp.add, (view * kernel[i, j, 0]
                                      for i, j, view in windows(x, kernel.shape[:2], strides, pads)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise(x, kernel, strides, pads):
    """Depthwise convolution (kernel (kh, kw, 1, C)) as kh*kw shifted multiply-adds.

    Its input gradient, for stride 1 and kernels larger than 3x3, is the same shifted form on the
    output gradient with the kernel rotated by 180 degrees: 3x faster than autodiff's transposed
    taps for 5x5 (13 -> 4 ms at 28x28x240), while for 3x3 autodiff's is as fast or faster.
    Its kernel gradient is one variadic reduction with an output per tap, so XLA reads the input
    and the output gradient once for all taps; autodiff's kh*kw separate sums read them kh*kw
    times (2-3x slower per layer). The reduction keeps the batch axis, and the rows of maps of 32
    rows and more, summed afterwards: XLA:CPU splits a reduction's work over its outputs, and a
    few hundred channels alone left cores idle (docs/performance.md)."""
    return _depthwise(x, kernel, strides, pads)


def _depthwise_fwd(x, kernel, strides, pads):
    return _depthwise(x, kernel, strides, pads), (x, kernel)


def _depthwise_bwd(strides, pads, residuals, dy):
    x, kernel = residuals
    kh, kw = kernel.shape[:2]
    back = [(k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip((kh, kw), pads)]  # the transpose's padding
    if strides == (1, 1) and kh * kw > 9 and min(map(min, back)) >= 0:
        dx = _depthwise(dy, jnp.flip(kernel, (0, 1)), strides, back)  # correlation, rotated kernel
    else:
        dx = jax.vjp(lambda x: _depthwise(x, kernel, strides, pads), x)[1](dy)[0]
    taps = list(windows(x, (kh, kw), strides, pads))
    products = [(view * dy).astype(jnp.float32) for _, _, view in taps]
    axes = (2,) if dy.shape[1] >= 32 else (1, 2)
    sums = lax.reduce(products, [jnp.float32(0)] * len(taps),
                      lambda a, b: [p + q for p, q in zip(a, b)], axes)
    sums = jnp.stack(sums).reshape(len(taps), -1, dy.shape[-1]).sum(axis=1)
    rows, cols = (jnp.array([tap[k] for tap in taps]) for k in (0, 1))
    return dx, jnp.zeros_like(kernel).at[rows, cols, 0].set(sums.astype(kernel.dtype))


depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, *, native=False, **kw):
    """Drop-in for `lax.conv_general_dilated` (as `nn.Conv(conv_general_dilated=...)`), on oneDNN's
    kernels with `native` where they take the convolution."""
    nhwc = (lhs.ndim == 4 and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
            == lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC))
    if nhwc and not kw and native:
        dilation = tuple(rhs_dilation or (1, 1))
        extent = tuple((k - 1) * d + 1 for k, d in zip(rhs.shape[:2], dilation))
        pads = tuple(map(tuple, _explicit_padding(padding, lhs.shape[1:3], extent, window_strides)))
        patches = (tuple(window_strides) == rhs.shape[:2] != (1, 1) and not any(map(any, pads))
                   and feature_group_count == 1)  # `patch_matmul`'s backward is 2-3x oneDNN's
        if not patches and onednn.supported(lhs, rhs, tuple(window_strides), pads, dilation,
                                                lhs_dilation or (1, 1)):
            return onednn.conv(lhs, rhs, tuple(window_strides), pads, dilation, feature_group_count)
    plain = nhwc and all(d == 1 for d in (lhs_dilation or (1, 1)) + (rhs_dilation or (1, 1))) and not kw
    if plain:  # strides and pads as hashable tuples: the custom VJPs take them as static arguments
        kernel, strides = rhs.shape[:2], tuple(window_strides)
        pads = tuple(map(tuple, _explicit_padding(padding, lhs.shape[1:3], kernel, strides)))
        dense, unpadded = feature_group_count == 1, not any(map(any, pads))
        if dense and kernel == (1, 1) and unpadded:
            return feature_matmul(subsample(lhs, strides), rhs[0, 0], 1, precision)
        if dense and strides == kernel and unpadded:
            return patch_matmul(lhs, rhs, precision, native)
        if dense and as_im2col(kernel, strides, output_size(lhs.shape[1:3], kernel, strides, pads), rhs.shape[-1]):
            return im2col(lhs, rhs, strides, pads, precision)
        if feature_group_count == lhs.shape[-1] == rhs.shape[-1] and rhs.shape[2] == 1:
            return depthwise(lhs, rhs, strides, pads)
        if (dense and kernel == (3, 3) and strides == (1, 1)
                and pads == ((1, 1), (1, 1)) and lhs.dtype == rhs.dtype == jnp.float32
                and (m := winograd.block_size(lhs.shape, rhs.shape))):
            return winograd.conv3x3(lhs, rhs, m, precision)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, precision=precision, **kw)
