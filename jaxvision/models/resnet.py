"""ResNet (He et al. 2015) as timm builds it: ResNet v1.5 (stride in the 3x3 conv), 7x7 stem,
max-pool, zero-initialised last BatchNorm of each residual branch. Names mirror timm's
(`conv1`, `bn1`, `layer1.0.conv1`, `layer1.0.downsample.0`, `fc`)."""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxvision.errors import UserError
from jaxvision.models import layers
from jaxvision.models.registry import ModelCard, register


class Downsample(layers.ZooModule, kw_only=True):
    """1x1 strided conv + BN on the shortcut (timm's `downsample.0` / `downsample.1`)."""

    features: int
    stride: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = self.conv(self.features, 1, stride=self.stride, name="0")(x)
        return self.batch_norm(train, name="1")(x)


class BasicBlock(layers.ZooModule, kw_only=True):
    planes: int
    stride: int = 1
    downsample: bool = False
    drop_path_rate: float = 0.0
    expansion = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        y = self.conv(self.planes, 3, stride=self.stride, name="conv1")(x)
        y = nn.relu(self.batch_norm(train, name="bn1")(y))
        y = self.conv(self.planes, 3, name="conv2")(y)
        y = self.batch_norm(train, name="bn2", zero_init=True)(y)
        return nn.relu(layers.drop_path(y, self.drop_path_rate, train) + self._shortcut(x, train))

    def _shortcut(self, x, train):
        if not self.downsample:
            return x
        return Downsample(features=self.planes * self.expansion, stride=self.stride,
                          dtype=self.dtype, param_dtype=self.param_dtype, name="downsample")(x, train)


class Bottleneck(BasicBlock, kw_only=True):
    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool = False):
        y = self.conv(self.planes, 1, name="conv1")(x)
        y = nn.relu(self.batch_norm(train, name="bn1")(y))
        y = self.conv(self.planes, 3, stride=self.stride, name="conv2")(y)
        y = nn.relu(self.batch_norm(train, name="bn2")(y))
        y = self.conv(self.planes * 4, 1, name="conv3")(y)
        y = self.batch_norm(train, name="bn3", zero_init=True)(y)
        return nn.relu(layers.drop_path(y, self.drop_path_rate, train) + self._shortcut(x, train))


class ResNet(layers.ZooModule, kw_only=True):
    """`stem="3x3"` (a stride-1 3x3 conv, no max-pool) and a smaller `width` adapt the network to
    small images such as CIFAR or digits; the defaults are timm's ImageNet ResNet."""

    block: str = "bottleneck"
    depths: Sequence[int] = (3, 4, 6, 3)
    stem: str = "7x7"
    width: int = 64
    num_classes: int = 1000
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False, pre_logits: bool = False):
        x = self.forward_features(x, train)
        x = jnp.mean(x, axis=(1, 2))
        self.sow("intermediates", "pre_logits", x)  # for feature distillation
        if pre_logits:
            return x
        return self.classifier(x, self.num_classes, drop_rate=self.drop_rate, train=train, name="fc")

    def forward_features(self, x, train: bool):
        if self.stem not in ("7x7", "3x3"):
            raise UserError(f"ResNet stem must be '7x7' or '3x3', not {self.stem!r}")
        big = self.stem == "7x7"
        x = self.conv(self.width, 7 if big else 3, stride=2 if big else 1, name="conv1")(x.astype(self.dtype))
        x = nn.relu(self.batch_norm(train, name="bn1")(x))
        if big:
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        block = {"basic": BasicBlock, "bottleneck": Bottleneck}[self.block]
        total, index, in_ch = sum(self.depths), 0, self.width
        for stage, depth in enumerate(self.depths):
            planes, blocks = self.width * 2 ** stage, []
            for i in range(depth):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(functools.partial(
                    block, planes=planes, stride=stride,
                    downsample=i == 0 and (stride != 1 or in_ch != planes * block.expansion),
                    drop_path_rate=self.drop_path_rate * index / max(total - 1, 1),
                    dtype=self.dtype, param_dtype=self.param_dtype))
                in_ch, index = planes * block.expansion, index + 1
            x = layers.Sequential(blocks, name=f"layer{stage + 1}")(x, train)
        return x


_RESNETS = {
    "resnet18": ("basic", (2, 2, 2, 2), "69.75 (torchvision recipe)"),
    "resnet34": ("basic", (3, 4, 6, 3), "73.3 (torchvision recipe)"),
    "resnet50": ("bottleneck", (3, 4, 6, 3), "76.1 (paper), 80.4 (modern recipe)"),
    "resnet101": ("bottleneck", (3, 4, 23, 3), "77.4 (paper)"),
    "resnet152": ("bottleneck", (3, 8, 36, 3), "78.3 (paper)"),
}
for _name, (_block, _depths, _top1) in _RESNETS.items():
    register(ModelCard(_name, "resnet", interpolation="bilinear", top1=_top1),
             ResNet, block=_block, depths=_depths)
