"""Softmax attention for XLA:CPU, whose batched matrix products of ViT's sizes run on one core
(about 120 GFLOP/s at 197 x 197 x 64): oneDNN's kernels one head at a time with `native`, else
the fewest passes over the (n, n) probabilities (`_cpu_attention`). Both compute
`jax.nn.dot_product_attention` to float rounding (tests/test_cpu_layers.py, tests/test_cpu_native.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxvision.backends.cpu import onednn


def fused_attention(qkv, native: bool):
    """softmax(q k^T / sqrt(d)) v of a fused projection's (batch, tokens, 3, heads, head_dim)
    output, as (batch, tokens, heads, head_dim). With `native` one call reads the heads from it in
    place and writes the output tokens-first (`onednn.attention`): none of the transposes XLA would
    copy. It computes in float32; half-precision inputs take it only under differentiation
    (`_half_attention`)."""
    if native and qkv.dtype in onednn.DTYPES:
        return onednn.attention(qkv) if qkv.dtype == jnp.float32 else _half_attention(qkv)
    return _split_attention(qkv, native)


def _split_attention(qkv, native: bool):
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    return _cpu_attention(q * q.shape[-1] ** -0.5, k, v, native).transpose(0, 2, 1, 3)


@jax.custom_vjp
def _half_attention(qkv):
    """Half-precision attention: `_cpu_attention` in inference, the native float32 kernels (inputs
    converted there and back) under differentiation, where XLA's transposes, pads and conversions
    of the gradients cost more than the whole float32 attention (ViT-S training in bfloat16
    1.3-1.5x with `conv.add_bias`; inference, 5-15% slower through the native kernels, keeps
    XLA's; docs/performance.md)."""
    return _split_attention(qkv, True)


def _half_attention_fwd(qkv):
    return jax.vjp(lambda t: onednn.attention(t.astype(jnp.float32)).astype(t.dtype), qkv)


def _half_attention_bwd(vjp, do):
    return vjp(do)


_half_attention.defvjp(_half_attention_fwd, _half_attention_bwd)


def _matmul(a, b, native: bool, transpose_a=False, transpose_b=False):
    """Float32 products of the (batch, heads) matrices of a and b, either read transposed: on
    oneDNN's kernels with `native` (XLA:CPU runs these batched products on one core)."""
    if native and onednn.dense_supported(a, b):
        return onednn.matmul(a, b, transpose_a, transpose_b, jnp.float32)
    contract = ((a.ndim - 2 if transpose_a else a.ndim - 1,), (b.ndim - 1 if transpose_b else b.ndim - 2))
    batch = tuple(range(a.ndim - 2))
    return lax.dot_general(a, b, (contract, (batch, batch)), preferred_element_type=jnp.float32)


def _attention_forward(q, k, v, native):
    """(output, unnormalised probabilities e, row sums l) of heads-first (b, h, n, d) inputs; q is
    already scaled. The normalisation divides the (n, d) output instead of the (n, n) probabilities."""
    s = _matmul(q, k, native, transpose_b=True)
    e = jnp.exp(s - s.max(-1, keepdims=True))
    l = e.sum(-1)
    o = _matmul(e.astype(v.dtype), v, native)
    return (o / l[..., None]).astype(v.dtype), e, l


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _cpu_attention(q, k, v, native):
    """Attention on heads-first inputs with the fewest passes over the (n, n) probabilities.
    Forward: the softmax normalised after the product with v. Backward, as FlashAttention's:
    with D = rowsum(dO * O), dS = P * (dP - D), so neither the normalised probabilities nor
    autodiff's broadcasts of the softmax are materialised. ViT-S's attention, batch 16, forward
    10 -> 6 ms (docs/performance.md)."""
    return _attention_forward(q, k, v, native)[0]


def _cpu_attention_fwd(q, k, v, native):
    o, e, l = _attention_forward(q, k, v, native)
    return o, (q, k, v, o, e, l)


def _cpu_attention_bwd(native, residuals, do):
    q, k, v, o, e, l = residuals
    dt, f32 = v.dtype, jnp.float32  # products in the inputs' dtype, accumulated in float32
    inv = 1.0 / l[..., None]
    do32 = do.astype(f32)
    dv = _matmul(e.astype(dt), (do32 * inv).astype(dt), native, transpose_a=True)
    dp = _matmul(do, v, native, transpose_b=True)
    ds = (e * inv * (dp - jnp.sum(do32 * o.astype(f32), -1, keepdims=True))).astype(dt)
    dq = _matmul(ds, k, native)
    dk = _matmul(ds, q, native, transpose_a=True)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_cpu_attention.defvjp(_cpu_attention_fwd, _cpu_attention_bwd)
