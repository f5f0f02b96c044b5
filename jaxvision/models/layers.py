"""Building blocks shared by the zoo.

Every parameter is created with logical axis names (`nn.with_logical_partitioning`) so the
trainer can shard it by rules; convolutions pad like PyTorch (or like TensorFlow's "SAME" for the
`tf_` ports) so converted timm weights give the same logits; module names mirror timm's so that
`convert.from_torch` can map state-dict keys generically.

Logical axis vocabulary: convolutions ``(None, None, "conv_in", "conv_out")``, norms and biases
``("conv_out",)`` / ``("embed",)``, classifier ``("features", "classes")``, ViT ``"embed"``,
``"mlp"``, ``"heads"``, ``"kv"``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxvision import native
from jaxvision.models import conv as conv_lib
from jaxvision.native import ops as native_ops

Dtype = Any


@jax.checkpoint
def gelu(x):
    """Exact GELU in PyTorch's form, x / 2 * (1 + erf(x / sqrt 2)). `nn.gelu(approximate=False)`
    goes through erfc, which XLA:CPU expands into exponentials and branches: 2.4x slower on
    ViT-S's MLP activations (16 x 197 x 1536: 2.4 -> 1.0 ms forward; experiments/PERF.md), and
    the same values to 1e-6. Rematerialised: the backward recomputes erf from x instead of
    keeping it, one pass fewer over those activations (ViT-S training +2%). Computed in float32
    and rounded once, as PyTorch does for bfloat16: XLA:CPU otherwise rounds after every op
    (16 x 197 x 1536 in bfloat16: forward 7.5 -> 3.9 ms, gradient 22.8 -> 9.5 ms;
    `python experiments/vit_kernels.py`)."""
    y = x.astype(jnp.float32)
    return (0.5 * y * (1.0 + lax.erf(y * math.sqrt(0.5)))).astype(x.dtype)


ACTIVATIONS: dict[str, Callable] = {
    "relu": nn.relu,
    "relu6": nn.relu6,
    "swish": nn.silu,
    "hard_swish": nn.hard_swish,
    "hard_sigmoid": nn.hard_sigmoid,
    "sigmoid": nn.sigmoid,
    "gelu": gelu,
}


def _pool_views(x, window, stride, padding):
    return [v for _, _, v in conv_lib.windows(x, window, stride, padding, fill=-jnp.inf)]


def max_pool(x, window: tuple[int, int], stride: tuple[int, int], padding=((0, 0), (0, 0))):
    """NHWC max pooling with explicit (PyTorch) padding, as the maximum of the k*k shifted strided
    views: plain slices that every exporter translates exactly and XLA fuses into one loop
    (jax2onnx 0.17 drops explicit padding from `nn.max_pool`, and lowers `lax.reduce_window`
    on NHWC to a pooling rank onnxruntime rejects).

    Its gradient goes to the first view holding the maximum, as in PyTorch. Autodiff of the chain
    of maxima recomputes the chain for every view and splits ties: 148 ms of a ResNet-50 step on
    XLA:CPU for the stem's pooling gradient (16 x 112 x 112 x 64). With this backward ResNet-50
    trains 1.10x faster (experiments/PERF.md).

    Half-precision maps are pooled in float32 (exact: a maximum needs no rounding) and the
    gradient's overlapping windows summed in float32, rounded once: in bfloat16 XLA:CPU fused the
    first-maximum index back into the backward pass with a conversion per view: 245 ms for ResNet's
    stem pooling forward and backward, against 70 in float32 (experiments/PERF.md)."""
    wide = jnp.promote_types(x.dtype, jnp.float32)
    return _max_pool(x.astype(wide), window, stride, padding).astype(x.dtype)


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


def avg_pool(x, window: tuple[int, int], stride: tuple[int, int], padding=((0, 0), (0, 0)),
             count_include_pad: bool = True):
    """NHWC average pooling with explicit padding, as a sum of shifted views; see `max_pool`."""
    total = sum(v for _, _, v in conv_lib.windows(x, window, stride, padding))
    if count_include_pad:
        return total / math.prod(window)
    ones = np.ones((1, *x.shape[1:3], 1), np.float32)
    count = sum(v for _, _, v in conv_lib.windows(ones, window, stride, padding))
    return total / count.astype(x.dtype)


# Variance-preserving init for ReLU-family networks, fan-out as in the timm/TF references.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# For depthwise kernels (k, k, 1, C) the per-group fan-out k*k equals Flax's fan-in.
grouped_conv_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def torch_padding(kernel: int, stride: int = 1, dilation: int = 1) -> tuple:
    """Symmetric padding PyTorch/timm use for a kernel of this size and stride."""
    p = ((stride - 1) + dilation * (kernel - 1)) // 2
    return ((p, p), (p, p))


class LayerNorm(nn.Module):
    """`nn.LayerNorm` over the last axis (same parameters, `scale` and `bias`), computed by oneDNN's
    one-pass kernels on CPU where they are enabled (`jaxvision.native`): ViT-S's 25 LayerNorms
    forward and backward are memory passes XLA:CPU splits into several reductions."""

    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x):
        if not (conv_lib.lowering() and jnp.result_type(x, self.dtype) == jnp.float32 and native.enabled()):
            flax_norm = nn.LayerNorm(epsilon=self.epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                                     name=None, parent=None)  # computing with this module's parameters
            return flax_norm.apply({"params": self._params(x)}, x)
        scale, bias = self._params(x).values()
        return native_ops.layer_norm(x.astype(jnp.float32), scale.astype(jnp.float32), bias.astype(jnp.float32),
                                     self.epsilon)

    def _init(self, init):
        return nn.with_logical_partitioning(init, (self.axis_name,))

    def _params(self, x) -> dict:
        shape = (x.shape[-1],)
        return {"scale": self.param("scale", self._init(nn.initializers.ones), shape, self.param_dtype),
                "bias": self.param("bias", self._init(nn.initializers.zeros), shape, self.param_dtype)}


_FLAX_DENSE = nn.DenseGeneral.__call__.__wrapped__  # flax's body, before any tool patches the class


def _promote_without_bias(inputs, kernel, bias, dtype=None):
    inputs, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=dtype)
    return inputs, kernel, None if bias is None else jnp.zeros_like(bias)


class DenseGeneral(nn.DenseGeneral):
    """`nn.DenseGeneral` (the same parameters and initialisers) adding its bias through
    `conv.add_bias`, whose gradient sums in float32 (ViT-S training in bfloat16: the bias
    gradients took 0.5 s of a 2.4 s step). Flax adds the zeros `_promote_without_bias` gives it,
    which XLA drops. Flax's body is called unwrapped, so that method interceptors and captured
    intermediates see one call with the bias added (`deploy.explain`)."""

    promote_dtype: Callable = _promote_without_bias

    @nn.compact
    def __call__(self, inputs):
        out = _FLAX_DENSE(self, inputs)
        if not self.use_bias:
            return out
        return conv_lib.add_bias(out, nn.meta.unbox(self.get_variable("params", "bias")).astype(out.dtype))


class ZooModule(nn.Module):
    """Base for zoo modules: compute/parameter dtypes and layer factories that use them."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def conv(self, features: int, kernel: int, *, stride: int = 1, groups: int = 1,
             bias: bool = False, padding: str = "torch", name: str,
             kernel_init: Callable = conv_init) -> nn.Conv:
        """`padding`: "torch" (symmetric, as timm), "same" (TensorFlow's, for `tf_` ports), "valid"."""
        pad = {"same": "SAME", "valid": "VALID"}.get(padding) or torch_padding(kernel, stride)
        in_axis = "conv_in" if groups == 1 else None
        if groups > 1 and kernel_init is conv_init:
            kernel_init = grouped_conv_init  # fan-out per group, as timm's fix_group_fanout
        return nn.Conv(
            features, (kernel, kernel), strides=stride, padding=pad, feature_group_count=groups,
            use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype,
            conv_general_dilated=conv_lib.conv_general_dilated,
            kernel_init=nn.with_logical_partitioning(kernel_init, (None, None, in_axis, "conv_out")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
            name=name)

    def batch_norm(self, train: bool, *, name: str, eps: float = 1e-5,
                   zero_init: bool = False) -> nn.BatchNorm:
        """BatchNorm with PyTorch's default momentum (0.1 there = 0.9 here)."""
        scale_init = nn.initializers.zeros if zero_init else nn.initializers.ones
        return nn.BatchNorm(
            use_running_average=not train, momentum=0.9, epsilon=eps,
            dtype=self.dtype, param_dtype=self.param_dtype,
            scale_init=nn.with_logical_partitioning(scale_init, ("conv_out",)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
            name=name)

    def layer_norm(self, name: str, eps: float = 1e-6, axis_name: str = "embed") -> nn.Module:
        return LayerNorm(epsilon=eps, dtype=self.dtype, param_dtype=self.param_dtype, axis_name=axis_name, name=name)

    def dense(self, features: int | Sequence[int], *, axes: tuple, name: str, in_axes: int | tuple = -1,
              kernel_init: Callable = nn.initializers.xavier_uniform(),
              bias_init: Callable = nn.initializers.zeros, bias: bool = True) -> nn.DenseGeneral:
        """Dense layer; `axes` names every kernel axis (inputs then outputs)."""
        n_out = 1 if isinstance(features, int) else len(features)
        return DenseGeneral(
            features, axis=in_axes, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype,
            dot_general=conv_lib.dot_general,
            kernel_init=nn.with_logical_partitioning(kernel_init, axes),
            bias_init=nn.with_logical_partitioning(bias_init, axes[-n_out:]),
            name=name)

    def classifier(self, x, num_classes: int, *, drop_rate: float, train: bool, name: str,
                   in_axis: str = "features"):
        """Dropout + linear head in float32 logits; `num_classes == 0` returns the features."""
        if num_classes <= 0:
            return x
        x = nn.Dropout(drop_rate)(x, deterministic=not train)
        logits = self.dense(num_classes, axes=(in_axis, "classes"), name=name,
                            kernel_init=nn.initializers.zeros)(x)
        return logits.astype(jnp.float32)


def drop_path(x, rate: float, train: bool):
    """Stochastic depth: drop whole samples' residual branches, rescale the kept ones."""
    if rate <= 0.0 or not train:
        return x
    return nn.Dropout(rate, broadcast_dims=tuple(range(1, x.ndim)))(x, deterministic=False)


class Mlp(ZooModule, kw_only=True):
    """Transformer MLP (`fc1`, exact GELU, `fc2`) on the last axis, as timm's."""

    hidden: int
    drop_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        y = ACTIVATIONS["gelu"](self.dense(self.hidden, axes=("embed", "mlp"), name="fc1")(x))
        y = nn.Dropout(self.drop_rate)(y, deterministic=not train)
        y = self.dense(x.shape[-1], axes=("mlp", "embed"), name="fc2")(y)
        return nn.Dropout(self.drop_rate)(y, deterministic=not train)


class Stage(nn.Module):
    """A stage as timm names it: optional `downsample`, then the `blocks` Sequential."""

    downsample: Callable[..., nn.Module] | None
    blocks: Sequence[Callable[..., nn.Module]]

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.downsample is not None:
            x = self.downsample(name="downsample")(x, train)
        return Sequential(self.blocks, name="blocks")(x, train)


class Stages(nn.Module):
    """A container whose child `i` is `make(name="i")`, called one stage at a time, so a network
    can keep every stage's output (feature pyramids) under timm's `stages.<i>` style names."""

    @nn.compact
    def __call__(self, i: int, make: Callable[..., nn.Module], x, train: bool = False):
        return make(name=str(i))(x, train)


class Sequential(nn.Module):
    """Runs `layers` in order with children named "0", "1", ... like PyTorch's nn.Sequential,
    so parameter paths mirror timm's (``layer1/0/conv1`` <-> ``layer1.0.conv1``).

    Each layer is a module factory (a class or `functools.partial`) called as `layer(x, train)`.
    """

    layers: Sequence[Callable[..., nn.Module]]

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i, make in enumerate(self.layers):
            x = make(name=str(i))(x, train)
        return x
