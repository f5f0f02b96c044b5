"""The historical networks: LeNet-5 (LeCun et al. 1998), AlexNet (Krizhevsky et al. 2012) and
GoogLeNet (Szegedy et al. 2014), AlexNet and GoogLeNet exactly as torchvision defines them, so its
weights convert with `convert.from_torch` (parameter names are torchvision's: `features.0`,
`classifier.6`, `inception4a.branch2.1.bn`).

LeNet-5 is the common modern reading of the paper: full C3 connections, plain average pooling and
tanh, a linear output layer instead of RBF units; 61,706 parameters on 32x32 grayscale input
(RGB input is averaged to one channel). GoogLeNet has no auxiliary classifiers (torchvision's
`aux_logits=False`, as its pretrained weights are served: 6,624,904 parameters) and keeps
torchvision's 3x3 convolution in the "5x5" branch.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from jaxvision.models import layers
from jaxvision.models.registry import HALF, ModelCard, register
from jaxvision.models.vgg import adaptive_avg_pool


# Layer-decay groups of torchvision's `features` / `classifier` Sequentials: the first conv, then
# every numbered layer in order.
SEQUENTIAL_GROUPS = {"stem": r"^features\.0", "blocks": r"^(?:features|classifier)\.(\d+)"}


def flatten_chw(x):
    """NHWC -> (batch, C*H*W) in PyTorch's order, so a converted first linear layer applies as is."""
    return x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)


def ceil_pool_padding(size: int, window: int, stride: int, padding: int = 0) -> tuple[int, int]:
    """(before, after) padding that makes VALID pooling give PyTorch's `ceil_mode=True` size: the
    last window may hang over the bottom/right edge, but must start inside the padded input."""
    out = math.ceil((size + 2 * padding - window) / stride) + 1
    if (out - 1) * stride >= size + padding:
        out -= 1
    return padding, max((out - 1) * stride + window - size - padding, padding)


class LeNet5(layers.ZooModule, kw_only=True):
    num_classes: int = 10
    in_chans: int = 1
    drop_rate: float = 0.0

    def group_matcher(self) -> dict:
        return SEQUENTIAL_GROUPS

    @nn.compact
    def __call__(self, x, train: bool = False, pre_logits: bool = False):
        x = x.astype(self.dtype)
        if self.in_chans == 1 and x.shape[-1] != 1:
            x = jnp.mean(x, axis=-1, keepdims=True)
        for index, features in ((0, 6), (3, 16)):  # C1, S2, C3, S4
            x = jnp.tanh(self.conv(features, 5, padding="valid", bias=True, name=f"features.{index}")(x))
            x = self.avg_pool(x, 2, 2)
        x = flatten_chw(x)  # C5: 16 x 5 x 5 -> 120 at 32 px
        x = jnp.tanh(self.dense(120, axes=("features", "hidden"), name="classifier.0")(x))
        x = jnp.tanh(self.dense(84, axes=("hidden", "features"), name="classifier.2")(x))  # F6
        self.sow("intermediates", "pre_logits", x)
        if pre_logits:
            return x
        return self.classifier(x, self.num_classes, drop_rate=self.drop_rate, train=train, name="classifier.4",
                               in_axis="features")


class AlexNet(layers.ZooModule, kw_only=True):
    num_classes: int = 1000
    drop_rate: float = 0.5

    def group_matcher(self) -> dict:
        return SEQUENTIAL_GROUPS

    @nn.compact
    def __call__(self, x, train: bool = False, pre_logits: bool = False):
        x = x.astype(self.dtype)
        for index, features, kernel, stride, pad, pool in ((0, 64, 11, 4, 2, True), (3, 192, 5, 1, 2, True),
                                                           (6, 384, 3, 1, 1, False), (8, 256, 3, 1, 1, False),
                                                           (10, 256, 3, 1, 1, True)):
            x = nn.relu(self.conv(features, kernel, stride=stride, padding=((pad, pad), (pad, pad)), bias=True,
                                  name=f"features.{index}")(x))
            if pool:
                x = self.max_pool(x, 3, 2)
        x = flatten_chw(adaptive_avg_pool(x, 6, 6))
        for index in (1, 4):
            x = nn.Dropout(self.drop_rate)(x, deterministic=not train)
            x = nn.relu(self.dense(4096, axes=("features", "hidden"), name=f"classifier.{index}")(x))
        self.sow("intermediates", "pre_logits", x)
        if pre_logits:
            return x
        return self.classifier(x, self.num_classes, drop_rate=0.0, train=train, name="classifier.6", in_axis="hidden")


class BasicConv(layers.ZooModule, kw_only=True):
    """torchvision's BasicConv2d: conv without bias, BatchNorm (eps 1e-3), ReLU."""

    features: int
    kernel: int = 1
    stride: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = self.conv(self.features, self.kernel, stride=self.stride, padding=((self.kernel // 2,) * 2,) * 2,
                      name="conv")(x)
        return nn.relu(self.batch_norm(train, name="bn", eps=1e-3)(x))


class Inception(layers.ZooModule, kw_only=True):
    """Four branches concatenated: 1x1; 1x1 -> 3x3; 1x1 -> 3x3 (torchvision's "5x5"); pool -> 1x1."""

    widths: tuple  # ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj

    @nn.compact
    def __call__(self, x, train: bool = False):
        c1, r3, c3, r5, c5, pool = self.widths
        kw = self.shared

        def unit(name, features, kernel, y):
            return BasicConv(features=features, kernel=kernel, name=name, **kw)(y, train)

        return jnp.concatenate([
            unit("branch1", c1, 1, x),
            unit("branch2.1", c3, 3, unit("branch2.0", r3, 1, x)),
            unit("branch3.1", c5, 3, unit("branch3.0", r5, 1, x)),
            unit("branch4.1", pool, 1, self.max_pool(x, 3, 1, padding=1)),
        ], axis=-1)


GOOGLENET = (("inception3a", (64, 96, 128, 16, 32, 32)), ("inception3b", (128, 128, 192, 32, 96, 64)), "pool",
             ("inception4a", (192, 96, 208, 16, 48, 64)), ("inception4b", (160, 112, 224, 24, 64, 64)),
             ("inception4c", (128, 128, 256, 24, 64, 64)), ("inception4d", (112, 144, 288, 32, 64, 64)),
             ("inception4e", (256, 160, 320, 32, 128, 128)), "pool2",
             ("inception5a", (256, 160, 320, 32, 128, 128)), ("inception5b", (384, 192, 384, 48, 128, 128)))


class GoogLeNet(layers.ZooModule, kw_only=True):
    num_classes: int = 1000
    drop_rate: float = 0.2
    # torchvision's pretrained weights expect ImageNet-normalised input re-normalised to [-1, 1]
    transform_input: bool = False

    def group_matcher(self) -> dict:
        return {"stem": r"^conv[123]", "blocks": r"^inception(\d[a-e])"}

    def pool(self, x, window: int, stride: int):
        """Max pooling with PyTorch's ceil_mode=True."""
        return self.max_pool(x, window, stride, padding=(ceil_pool_padding(x.shape[1], window, stride),
                                                         ceil_pool_padding(x.shape[2], window, stride)))

    @nn.compact
    def __call__(self, x, train: bool = False, pre_logits: bool = False):
        x = x.astype(self.dtype)
        if self.transform_input:
            mean, std = jnp.asarray((0.485, 0.456, 0.406), x.dtype), jnp.asarray((0.229, 0.224, 0.225), x.dtype)
            x = (x * std + mean - 0.5) / 0.5
        kw = self.shared
        x = BasicConv(features=64, kernel=7, stride=2, name="conv1", **kw)(x, train)
        x = self.pool(x, 3, 2)
        x = BasicConv(features=64, name="conv2", **kw)(x, train)
        x = BasicConv(features=192, kernel=3, name="conv3", **kw)(x, train)
        x = self.pool(x, 3, 2)
        for stage in GOOGLENET:
            if stage == "pool":
                x = self.pool(x, 3, 2)
            elif stage == "pool2":
                x = self.pool(x, 2, 2)
            else:
                x = Inception(widths=stage[1], name=stage[0], **kw)(x, train)
        x = jnp.mean(x, axis=(1, 2))
        self.sow("intermediates", "pre_logits", x)
        if pre_logits:
            return x
        return self.classifier(x, self.num_classes, drop_rate=self.drop_rate, train=train, name="fc")


register(ModelCard("lenet5", "classic", input_size=32, mean=HALF, std=HALF, crop_pct=1.0, interpolation="bilinear",
                   num_classes=10, top1="MNIST 99.05 (LeCun et al. 1998, with distortions)"), LeNet5)
register(ModelCard("alexnet", "classic", interpolation="bilinear", top1="56.5 (torchvision weights)"), AlexNet)
register(ModelCard("googlenet", "classic", interpolation="bilinear", top1="69.8 (torchvision weights)"), GoogLeNet)
