"""The CPU backend's layers: the zoo's Dense and LayerNorm with the portable modules' parameters,
and its max pooling and GELU, each measured faster on XLA:CPU than the portable form
(docs/performance.md). Every one computes what the portable op computes, up to float rounding.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxvision.backends.cpu import conv, onednn
from jaxvision.models.ops import windows


@jax.checkpoint
def gelu(x):
    """Exact GELU in PyTorch's form, x / 2 * (1 + erf(x / sqrt 2)). `nn.gelu(approximate=False)`
    goes through erfc, which XLA:CPU expands into exponentials and branches: 2.4x slower on
    ViT-S's MLP activations (16 x 197 x 1536: 2.4 -> 1.0 ms forward; docs/performance.md), and
    the same values to 1e-6. Rematerialised: the backward recomputes erf from x instead of
    keeping it, one pass fewer over those activations (ViT-S training +2%). Computed in float32
    and rounded once, as PyTorch does for bfloat16: XLA:CPU otherwise rounds after every op
    (16 x 197 x 1536 in bfloat16: forward 7.5 -> 3.9 ms, gradient 22.8 -> 9.5 ms;
    `python experiments/vit_kernels.py`)."""
    y = x.astype(jnp.float32)
    return (0.5 * y * (1.0 + lax.erf(y * math.sqrt(0.5)))).astype(x.dtype)


def _pool_views(x, window, stride, padding):
    return [v for _, _, v in windows(x, window, stride, padding, fill=-jnp.inf)]


def max_pool(x, window: tuple[int, int], stride: tuple[int, int], padding=((0, 0), (0, 0))):
    """NHWC max pooling with explicit (PyTorch) padding, as the maximum of the k*k shifted strided
    views, which XLA fuses into one loop.

    Its gradient goes to the first view holding the maximum, as in PyTorch. Autodiff of the chain
    of maxima recomputes the chain for every view and splits ties: 148 ms of a ResNet-50 step on
    XLA:CPU for the stem's pooling gradient (16 x 112 x 112 x 64). With this backward ResNet-50
    trains 1.10x faster (docs/performance.md).

    Half-precision maps are pooled in float32 (exact: a maximum needs no rounding) and the
    gradient's overlapping windows summed in float32, rounded once: in bfloat16 XLA:CPU fused the
    first-maximum index back into the backward pass with a conversion per view: 245 ms for ResNet's
    stem pooling forward and backward, against 70 in float32 (docs/performance.md)."""
    wide = jnp.promote_types(x.dtype, jnp.float32)
    padding = tuple(map(tuple, padding))
    return _max_pool(x.astype(wide), tuple(window), tuple(stride), padding).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, stride, padding):
    return functools.reduce(jnp.maximum, _pool_views(x, window, stride, padding))


def _max_pool_fwd(x, window, stride, padding):
    # reduce_window is not fused into consumers: XLA would otherwise recompute the chain of
    # maxima inside the transposed copy a following 1x1 convolution's kernel gradient reads.
    pads = ((0, 0), *padding, (0, 0))
    out = lax.reduce_window(x, jnp.array(-jnp.inf, x.dtype), lax.max, (1, *window, 1), (1, *stride, 1), pads)
    views = _pool_views(x, window, stride, padding)
    first = jnp.full(out.shape, len(views), jnp.int8 if len(views) < 128 else jnp.int32)
    for t in reversed(range(len(views))):
        first = jnp.where(views[t] == out, jnp.asarray(t, first.dtype), first)
    return out, (x, first)


def _max_pool_bwd(window, stride, padding, residuals, g):
    x, first = residuals
    views, views_vjp = jax.vjp(lambda x: _pool_views(x, window, stride, padding), x)
    return views_vjp([jnp.where(first == t, g, jnp.zeros_like(g)) for t in range(len(views))])


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def _promote_without_bias(inputs, kernel, bias, dtype=None):
    inputs, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=dtype)
    return inputs, kernel, None if bias is None else jnp.zeros_like(bias)


class Dense(nn.DenseGeneral):
    """`nn.DenseGeneral` (the same parameters and initialisers) adding its bias through
    `conv.add_bias`, whose gradient sums in float32 (ViT-S training in bfloat16: the bias
    gradients took 0.5 s of a 2.4 s step). Flax adds the zeros `_promote_without_bias` gives it,
    which XLA drops."""

    promote_dtype: nn.linear.PromoteDtypeFn = _promote_without_bias

    def __call__(self, inputs):
        out = super().__call__(inputs)
        if not self.use_bias:
            return out
        return conv.add_bias(out, nn.meta.unbox(self.get_variable("params", "bias")).astype(out.dtype))


class LayerNorm(nn.Module):
    """`nn.LayerNorm` over the last axis (the same `scale` and `bias`), computed in float32 by
    oneDNN's one-pass kernels with `native`: ViT-S's 25 LayerNorms forward and backward are memory
    passes XLA:CPU splits into several reductions. Other dtypes, and without `native`, flax's."""

    epsilon: float = 1e-6
    dtype: jnp.dtype | None = None
    param_dtype: jnp.dtype = jnp.float32
    scale_init: nn.initializers.Initializer = nn.initializers.ones
    bias_init: nn.initializers.Initializer = nn.initializers.zeros
    native: bool = False

    @nn.compact
    def __call__(self, x):
        shape = (x.shape[-1],)
        params = {"scale": self.param("scale", self.scale_init, shape, self.param_dtype),
                  "bias": self.param("bias", self.bias_init, shape, self.param_dtype)}
        if not (self.native and jnp.result_type(x, self.dtype or x.dtype) == jnp.float32):
            flax_norm = nn.LayerNorm(epsilon=self.epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                                     parent=None)  # computing with this module's parameters
            return flax_norm.apply({"params": params}, x)
        scale, bias = (p.astype(jnp.float32) for p in params.values())
        return onednn.layer_norm(x.astype(jnp.float32), scale, bias, self.epsilon)
