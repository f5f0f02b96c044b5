"""SpeedNet: the small VGG-like network of the CIFAR-10 speed records (Page's "How to train your
ResNet", hlb-CIFAR10, Jordan's airbench), written from their descriptions.

A 2x2 unpadded stem convolution with as many filters as twice its patch dimension (made to whiten
the data's patches: `config.model.whiten`), then three groups of [3x3 conv, 2x2 max-pool, BN,
GELU, 3x3 conv, BN, GELU], a global max-pool and a bias-free linear head whose logits are scaled
down (`logit_scale`) so that the large learning rates of the recipe stay stable.

The recipe's BatchNorm has no scale (a learned bias only: the following convolution absorbs any
scale), a fast running average and a tiny epsilon; each 3x3 kernel starts as the identity on its
first `in` output channels (the rest random), so the untrained network passes its input through.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvision.models import layers
from jaxvision.models.registry import CIFAR10_MEAN, CIFAR10_STD, ModelCard, register


def identity_init(base=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")):
    """A (kh, kw, in, out) kernel whose first min(in, out) output channels copy the matching input
    channel at the centre tap, and whose other channels come from `base` (PyTorch's default conv
    initialisation by default)."""
    def init(key, shape, dtype=jnp.float32):
        kh, kw, cin, cout = shape
        kernel = base(key, shape, dtype)
        n = min(cin, cout)
        eye = jnp.zeros((kh, kw, cin, n), dtype).at[kh // 2, kw // 2].set(jnp.eye(cin, n, dtype=dtype))
        return kernel.at[..., :n].set(eye)
    return init


class ConvGroup(layers.ZooModule, kw_only=True):
    features: int
    bn_momentum: float
    bn_eps: float

    def norm(self, train: bool, name: str):
        return nn.BatchNorm(
            use_running_average=not train, momentum=self.bn_momentum, epsilon=self.bn_eps, use_scale=False,
            dtype=self.dtype, param_dtype=self.param_dtype,
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)), name=name)

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = self.conv(self.features, 3, name="conv1", kernel_init=identity_init())(x)
        x = self.max_pool(x, 2, 2)
        x = self.ops.gelu(self.norm(train, "norm1")(x))
        x = self.conv(self.features, 3, name="conv2", kernel_init=identity_init())(x)
        return self.ops.gelu(self.norm(train, "norm2")(x))


class SpeedNet(layers.ZooModule, kw_only=True):
    widths: Sequence[int] = (64, 256, 256)
    stem_width: int = 24  # 2 x (2 * 2 * 3): the whitening filters and their negations
    bn_momentum: float = 0.4  # flax's: running = 0.4 * running + 0.6 * batch (PyTorch's 0.6)
    bn_eps: float = 1e-12
    logit_scale: float = 1 / 9
    num_classes: int = 10

    def group_matcher(self) -> dict:
        return {"stem": r"^stem", "blocks": r"^groups_(\d+)"}

    @nn.compact
    def __call__(self, x, train: bool = False, pre_logits: bool = False):
        x = x.astype(self.dtype)
        x = self.ops.gelu(self.conv(self.stem_width, 2, padding="valid", bias=True, name="stem")(x))
        for i, width in enumerate(self.widths):
            x = ConvGroup(features=width, bn_momentum=self.bn_momentum, bn_eps=self.bn_eps,
                          name=f"groups_{i}", **self.shared)(x, train)
        x = jnp.max(x, axis=(1, 2))
        self.sow("intermediates", "pre_logits", x)
        if pre_logits or self.num_classes <= 0:
            return x
        head = self.dense(self.num_classes, axes=("features", "classes"), name="head", bias=False,
                          kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"))
        return head(x).astype(jnp.float32) * self.logit_scale


register(ModelCard("speednet", "speednet", input_size=32, mean=CIFAR10_MEAN, std=CIFAR10_STD, crop_pct=1.0,
                   interpolation="bilinear", num_classes=10), SpeedNet)
