"""oneDNN's convolution and matrix multiply with their gradients, for jitted JAX code on CPU
(built and loaded by `jaxvision.backends.cpu.native`).

`conv(x, w, strides, padding, dilation, groups)` is `lax.conv_general_dilated` on an NHWC map
and an HWIO kernel with explicit (lo, hi) padding per spatial axis; its custom VJP calls
oneDNN's input-gradient and kernel-gradient primitives. `dense(x, w, n_in)` contracts the last
`n_in` axes of x with the first of w (a dense layer); its gradients read the operands in place,
transposed by strides, where XLA:CPU copies one of them transposed first. Kernel gradients are
produced in float32 and cast to the kernel's dtype, as PyTorch accumulates a bfloat16 layer's.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxvision.backends.cpu import native

DTYPES = (jnp.float32, jnp.bfloat16)


def output_shape(x_shape, w_shape, strides, padding, dilation) -> tuple[int, ...]:
    n, *size, _ = x_shape
    spatial = [max(0, (s + lo + hi - (k - 1) * d - 1) // st + 1)
               for s, k, st, (lo, hi), d in zip(size, w_shape[:2], strides, padding, dilation)]
    return (n, *spatial, w_shape[-1])


def supported(x, w, strides, padding, dilation, lhs_dilation) -> bool:
    """Whether oneDNN takes this convolution: 2-D, float32 or bfloat16 on both sides, no input
    dilation (a transposed convolution), no negative padding (a crop), a non-empty output (the
    zoo's shape-only tracing at tiny sizes makes empty ones)."""
    return (x.ndim == 4 and x.dtype == w.dtype and x.dtype in DTYPES and all(d == 1 for d in lhs_dilation)
            and all(p >= 0 for pair in padding for p in pair)
            and all(output_shape(x.shape, w.shape, strides, padding, dilation)))


def _call(target, a, b, shape, dtype, strides, padding, dilation, groups):
    native.library()  # builds and registers the targets on first use
    pads = np.asarray([p for pair in padding for p in pair], np.int64)
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, dtype), vmap_method="sequential")(
        a, b, strides=np.asarray(strides, np.int64), padding=pads, dilation=np.asarray(dilation, np.int64),
        groups=np.int64(groups))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def conv(x, w, strides, padding, dilation=(1, 1), groups=1):
    shape = output_shape(x.shape, w.shape, strides, padding, dilation)
    return _call("jaxvision_conv_fwd", x, w, shape, x.dtype, strides, padding, dilation, groups)


def _conv_fwd(x, w, strides, padding, dilation, groups):
    return conv(x, w, strides, padding, dilation, groups), (x, w)


def _conv_bwd(strides, padding, dilation, groups, residuals, dy):
    x, w = residuals
    attrs = (strides, padding, dilation, groups)
    # Depthwise: oneDNN 3.2 has float32 depthwise gradient kernels (jit_dw), but sends bfloat16 to
    # its generic grouped ones (brgconv_strided, jit_bf16), 2.5-9x slower than converting to
    # float32 and back (EfficientNet-B0's layers, docs/performance.md).
    compute = jnp.float32 if groups > 1 and groups == x.shape[-1] else x.dtype
    xc, wc, dyc = (a.astype(compute) for a in (x, w, dy))
    dx = _call("jaxvision_conv_bwd_data", dyc, wc, x.shape, compute, *attrs)
    dw = _call("jaxvision_conv_bwd_weights", xc, dyc, w.shape, jnp.float32, *attrs)
    return dx.astype(x.dtype), dw.astype(w.dtype)


conv.defvjp(_conv_fwd, _conv_bwd)


def _matmul(a, b, transpose_a, transpose_b, dtype):
    m = a.shape[-1] if transpose_a else a.shape[-2]
    n = b.shape[-2] if transpose_b else b.shape[-1]
    native.library()
    return jax.ffi.ffi_call("jaxvision_matmul", jax.ShapeDtypeStruct(a.shape[:-2] + (m, n), dtype),
                            vmap_method="sequential")(
        a, b, transpose_a=np.int64(transpose_a), transpose_b=np.int64(transpose_b))


def matmul(a, b, transpose_a=False, transpose_b=False, dtype=None):
    """Batched matrix product over the leading axes of a and b (equal), each operand's last two
    axes read transposed when asked: (..., m, k) x (..., k, n) -> (..., m, n) in `dtype` (the
    operands' by default; float32 accumulates half-precision ones)."""
    batch = a.shape[:-2]
    a3, b3 = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
    out = _matmul(a3, b3, transpose_a, transpose_b, dtype or a.dtype)
    return out.reshape(batch + out.shape[-2:])


def dense_supported(x, w) -> bool:
    return x.dtype == w.dtype and x.dtype in DTYPES


def _flat(x, w, n_in):
    k = math.prod(x.shape[x.ndim - n_in:])
    return x.reshape(-1, k), w.reshape(k, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense(x, w, n_in=1):
    x2, w2 = _flat(x, w, n_in)
    return _matmul(x2, w2, False, False, x.dtype).reshape(x.shape[:x.ndim - n_in] + w.shape[n_in:])


def _dense_fwd(x, w, n_in):
    return dense(x, w, n_in), (x, w)


def _dense_bwd(n_in, residuals, dy):
    x, w = residuals
    x2, w2 = _flat(x, w, n_in)
    dy2 = dy.reshape(x2.shape[0], w2.shape[1])
    dx = _matmul(dy2, w2, False, True, x.dtype).reshape(x.shape)
    dw = _matmul(x2, dy2, True, False, jnp.float32).reshape(w.shape)
    return dx, dw.astype(w.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


def _layer_norm_fwd_call(x2, scale, shift, epsilon):
    native.library()
    rows = jax.ShapeDtypeStruct((x2.shape[0],), jnp.float32)
    return jax.ffi.ffi_call("jaxvision_layer_norm_fwd", (jax.ShapeDtypeStruct(x2.shape, jnp.float32), rows, rows),
                            vmap_method="sequential")(x2, scale, shift, epsilon=np.float32(epsilon))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, shift, epsilon):
    """LayerNorm over the last axis of float32 x with scale and shift: the biased variance, as
    PyTorch and flax compute it."""
    y, _, _ = _layer_norm_fwd_call(x.reshape(-1, x.shape[-1]), scale, shift, epsilon)
    return y.reshape(x.shape)


def _layer_norm_fwd(x, scale, shift, epsilon):
    y, mean, var = _layer_norm_fwd_call(x.reshape(-1, x.shape[-1]), scale, shift, epsilon)
    return y.reshape(x.shape), (x, scale, mean, var)


def _layer_norm_bwd(epsilon, residuals, dy):
    x, scale, mean, var = residuals
    c = x.shape[-1]
    dx, dscale, dshift = jax.ffi.ffi_call(
        "jaxvision_layer_norm_bwd", (jax.ShapeDtypeStruct((x.size // c, c), jnp.float32),
                                     jax.ShapeDtypeStruct((c,), jnp.float32), jax.ShapeDtypeStruct((c,), jnp.float32)),
        vmap_method="sequential")(x.reshape(-1, c), dy.reshape(-1, c), scale, mean, var, epsilon=np.float32(epsilon))
    return dx.reshape(x.shape), dscale, dshift


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def _attention_fwd_call(qkv):
    native.library()
    b, n, _, h, d = qkv.shape
    return jax.ffi.ffi_call("jaxvision_attention_fwd", (jax.ShapeDtypeStruct((b, n, h, d), jnp.float32),
                                                        jax.ShapeDtypeStruct((b * h, n, n), jnp.float32)),
                            vmap_method="sequential")(qkv, scale=np.float32(d ** -0.5))


@jax.custom_vjp
def attention(qkv):
    """softmax(q k^T / sqrt(d)) v of float32 q, k, v stacked as (batch, tokens, 3, heads, d) (a
    fused projection's output), as (batch, tokens, heads, d): one head at a time through oneDNN's
    products and softmax, no transposes outside; the probabilities are kept for the backward."""
    return _attention_fwd_call(qkv)[0]


def _attention_fwd(qkv):
    o, p = _attention_fwd_call(qkv)
    return o, (qkv, p)


def _attention_bwd(residuals, do):
    qkv, p = residuals
    return (jax.ffi.ffi_call("jaxvision_attention_bwd", jax.ShapeDtypeStruct(qkv.shape, jnp.float32),
                             vmap_method="sequential")(qkv, p, do, scale=np.float32(qkv.shape[-1] ** -0.5)),)


attention.defvjp(_attention_fwd, _attention_bwd)
