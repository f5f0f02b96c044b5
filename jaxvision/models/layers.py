"""Building blocks shared by the zoo, in plain Flax.

Every parameter is created with logical axis names (`nn.with_logical_partitioning`) so the
trainer can shard it by rules; convolutions pad like PyTorch (or like TensorFlow's "SAME" for the
`tf_` ports) so converted timm weights give the same logits; module names mirror timm's so that
`convert.from_torch` can map state-dict keys generically. The layers a platform may implement its
own way (convolution, dense, LayerNorm, pooling, GELU, attention) come from the module's `ops`
(`jaxvision.models.ops`), portable unless the caller chose a backend's.

Logical axis vocabulary: convolutions ``(None, None, "conv_in", "conv_out")``, norms and biases
``("conv_out",)`` / ``("embed",)``, classifier ``("features", "classes")``, ViT ``"embed"``,
``"mlp"``, ``"heads"``, ``"kv"``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvision.errors import UserError
from jaxvision.models.ops import PORTABLE, Ops

Dtype = Any

ACTIVATIONS: dict[str, Callable] = {
    "relu": nn.relu,
    "relu6": nn.relu6,
    "swish": nn.silu,
    "hard_swish": nn.hard_swish,
    "hard_sigmoid": nn.hard_sigmoid,
    "sigmoid": nn.sigmoid,
}

# Variance-preserving init for ReLU-family networks, fan-out as in the timm/TF references.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# For depthwise kernels (k, k, 1, C) the per-group fan-out k*k equals Flax's fan-in.
grouped_conv_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def torch_padding(kernel: int, stride: int = 1, dilation: int = 1) -> tuple:
    """Symmetric padding PyTorch/timm use for a kernel of this size and stride."""
    p = ((stride - 1) + dilation * (kernel - 1)) // 2
    return ((p, p), (p, p))


class ZooModule(nn.Module):
    """Base for zoo modules: compute and parameter dtypes, the `ops` that implement the layers
    (see `jaxvision.models.ops`), and factories for the layers that use them. A module passes
    `**self.shared` to the zoo modules it creates, so the whole network runs on one `ops`."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    ops: Ops = PORTABLE

    @property
    def shared(self) -> dict:
        """The fields every zoo module hands to its children."""
        return dict(dtype=self.dtype, param_dtype=self.param_dtype, ops=self.ops)

    def conv(self, features: int, kernel: int | tuple[int, int], *, stride: int = 1, groups: int = 1,
             bias: bool = False, padding: str | tuple = "torch", name: str,
             kernel_init: Callable = conv_init) -> nn.Module:
        """`padding`: "torch" (symmetric, as timm), "same" (TensorFlow's, for `tf_` ports), "valid",
        or explicit ((top, bottom), (left, right))."""
        kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
        if isinstance(padding, str):
            pad = {"same": "SAME", "valid": "VALID"}.get(padding) or torch_padding(kernel[0], stride)
        else:
            pad = tuple(map(tuple, padding))
        in_axis = "conv_in" if groups == 1 else None
        if groups > 1 and kernel_init is conv_init:
            kernel_init = grouped_conv_init  # fan-out per group, as timm's fix_group_fanout
        return self.ops.conv(
            features, kernel, strides=stride, padding=pad, feature_group_count=groups,
            use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype,
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
        """LayerNorm over the last axis (`scale` and `bias`, as flax and timm)."""
        return self.ops.layer_norm(
            epsilon=eps, dtype=self.dtype, param_dtype=self.param_dtype,
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, (axis_name,)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axis_name,)),
            name=name)

    def dense(self, features: int | Sequence[int], *, axes: tuple, name: str, in_axes: int | tuple = -1,
              kernel_init: Callable = nn.initializers.xavier_uniform(),
              bias_init: Callable = nn.initializers.zeros, bias: bool = True) -> nn.Module:
        """Dense layer over the trailing `in_axes`; `axes` names every kernel axis (inputs then
        outputs)."""
        n_out = 1 if isinstance(features, int) else len(features)
        return self.ops.dense(
            features, axis=in_axes, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(kernel_init, axes),
            bias_init=nn.with_logical_partitioning(bias_init, axes[-n_out:]),
            name=name)

    def constrain(self, x, features: str = "embed"):
        """`x` (batch, ..., features) laid out on the trainer's mesh by its activation rules (the
        batch over the data-parallel axes, `features` as the rules say); a no-op elsewhere."""
        return self.ops.constrain(x, ("batch",) + (None,) * (x.ndim - 2) + (features,))

    def max_pool(self, x, window: int, stride: int, padding: int | tuple = 0):
        """Max pooling over `window` x `window` with PyTorch's padding: an int on every side, or
        explicit ((top, bottom), (left, right))."""
        return self.ops.max_pool(x, (window, window), (stride, stride), _pairs(padding))

    def avg_pool(self, x, window: int, stride: int, padding: int | tuple = 0, count_include_pad: bool = True):
        """Average pooling, padding as `max_pool`'s; the padding counts unless `count_include_pad`
        is False, as PyTorch's."""
        return self.ops.avg_pool(x, (window, window), (stride, stride), _pairs(padding), count_include_pad)

    def classifier(self, x, num_classes: int, *, drop_rate: float, train: bool, name: str,
                   in_axis: str = "features"):
        """Dropout + linear head in float32 logits; `num_classes == 0` returns the features."""
        if num_classes <= 0:
            return x
        x = nn.Dropout(drop_rate)(x, deterministic=not train)
        logits = self.dense(num_classes, axes=(in_axis, "classes"), name=name,
                            kernel_init=nn.initializers.zeros)(x)
        return logits.astype(jnp.float32)


def _pairs(padding) -> tuple:
    return ((padding, padding),) * 2 if isinstance(padding, int) else tuple(map(tuple, padding))


def drop_path(x, rate, train: bool):
    """Stochastic depth: drop whole samples' residual branches, rescale the kept ones. `rate` is a
    float, or, in a scanned stack of blocks, each block's own rate as a traced scalar."""
    if not train or (isinstance(rate, (int, float)) and rate <= 0.0):
        return x
    if isinstance(rate, (int, float)):
        return nn.Dropout(rate, broadcast_dims=tuple(range(1, x.ndim)))(x, deterministic=False)
    return _DropPath()(x, rate)


class _DropPath(nn.Module):
    @nn.compact
    def __call__(self, x, rate):
        keep = 1.0 - rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep.astype(x.dtype), 0).astype(x.dtype)


REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")


def remat(module_class, policy: str, static_argnums: tuple = (), scanned: bool = False):
    """`module_class` rematerialised under a named policy: "none" keeps every activation for the
    backward pass, "full" keeps none (recomputes the whole forward), the others name
    `jax.checkpoint_policies` (e.g. "dots_saveable": keep the matrix products' outputs). Outside
    `nn.scan` (`scanned=False`) the recomputation is kept from being merged with the forward pass
    by XLA's common-subexpression elimination, which would undo it."""
    if policy not in REMAT_POLICIES:
        raise UserError(f"remat_policy must be one of {', '.join(REMAT_POLICIES)}, not {policy!r}")
    if policy == "none":
        return module_class
    rule = None if policy == "full" else getattr(jax.checkpoint_policies, policy)
    return nn.remat(module_class, policy=rule, prevent_cse=not scanned, static_argnums=static_argnums)


class Mlp(ZooModule, kw_only=True):
    """Transformer MLP (`fc1`, exact GELU, `fc2`) on the last axis, as timm's."""

    hidden: int
    drop_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        y = self.constrain(self.ops.gelu(self.dense(self.hidden, axes=("embed", "mlp"), name="fc1")(x)), "mlp")
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
