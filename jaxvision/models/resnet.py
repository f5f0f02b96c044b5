"""ResNet (He et al. 2015) as timm builds it: ResNet v1.5 (stride in the 3x3 conv), zero-initialised
last BatchNorm of each residual branch, plus the variants timm names: ResNeXt (grouped 3x3 conv,
`cardinality` x `base_width`) and ResNet-D (`stem="deep"`: three 3x3 convs; `avg_down`: average
pooling before the 1x1 shortcut conv). Names mirror timm's (`conv1`, `bn1`, `layer1.0.conv1`,
`layer1.0.downsample.0`, `fc`; the deep stem is `conv1.0`, `conv1.1`, `conv1.3`, `conv1.4`,
`conv1.6`)."""

from __future__ import annotations

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxvision.errors import UserError
from jaxvision.models import layers
from jaxvision.models.registry import ModelCard, register

STEMS = ("7x7", "3x3", "deep")


class Downsample(layers.ZooModule, kw_only=True):
    """Shortcut projection: 1x1 strided conv + BN (`downsample.0` / `.1`), or with `avg_down`
    average pooling, then a 1x1 conv + BN (`downsample.1` / `.2`)."""

    features: int
    stride: int
    avg_down: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        if not self.avg_down:
            x = self.conv(self.features, 1, stride=self.stride, name="0")(x)
            return self.batch_norm(train, name="1")(x)
        if self.stride > 1:
            # PyTorch's AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)
            pads = [(0, (-size) % self.stride) for size in x.shape[1:3]]
            x = self.avg_pool(x, 2, self.stride, pads, count_include_pad=False)
        x = self.conv(self.features, 1, name="1")(x)
        return self.batch_norm(train, name="2")(x)


class BasicBlock(layers.ZooModule, kw_only=True):
    planes: int
    stride: int = 1
    downsample: bool = False
    avg_down: bool = False
    cardinality: int = 1
    base_width: int = 64
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
        return Downsample(features=self.planes * self.expansion, stride=self.stride, avg_down=self.avg_down,
                          **self.shared, name="downsample")(x, train)


class Bottleneck(BasicBlock, kw_only=True):
    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool = False):
        width = int(math.floor(self.planes * (self.base_width / 64)) * self.cardinality)
        y = self.conv(width, 1, name="conv1")(x)
        y = nn.relu(self.batch_norm(train, name="bn1")(y))
        y = self.conv(width, 3, stride=self.stride, groups=self.cardinality, name="conv2")(y)
        y = nn.relu(self.batch_norm(train, name="bn2")(y))
        y = self.conv(self.planes * 4, 1, name="conv3")(y)
        y = self.batch_norm(train, name="bn3", zero_init=True)(y)
        return nn.relu(layers.drop_path(y, self.drop_path_rate, train) + self._shortcut(x, train))


class DeepStem(layers.ZooModule, kw_only=True):
    """ResNet-D stem: three 3x3 convs (the first strided), as timm's `conv1` Sequential."""

    width: int
    out: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(self.batch_norm(train, name="1")(self.conv(self.width, 3, stride=2, name="0")(x)))
        x = nn.relu(self.batch_norm(train, name="4")(self.conv(self.width, 3, name="3")(x)))
        return self.conv(self.out, 3, name="6")(x)


class ResNet(layers.ZooModule, kw_only=True):
    """`stem="3x3"` (a stride-1 3x3 conv, no max-pool) and a smaller `width` adapt the network to
    small images such as CIFAR or digits; the defaults are timm's ImageNet ResNet.

    `features_only=True` returns the feature maps timm's `features_only` does (stem activation and
    each stage, strides 2-32), selected by `out_indices`."""

    block: str = "bottleneck"
    depths: Sequence[int] = (3, 4, 6, 3)
    stem: str = "7x7"
    stem_width: int = 32  # the deep stem's inner width
    width: int = 64
    cardinality: int = 1
    base_width: int = 64
    avg_down: bool = False
    num_classes: int = 1000
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    features_only: bool = False
    out_indices: Sequence[int] = (0, 1, 2, 3, 4)

    def group_matcher(self) -> dict:
        """Layer groups for layer-wise lr decay (timm's): stem, then each residual block."""
        return {"stem": r"^conv1|bn1|maxpool", "blocks": r"^layer(\d+)\.(\d+)"}

    @nn.compact
    def __call__(self, x, train: bool = False, pre_logits: bool = False):
        features = self.forward_features(x, train)
        if self.features_only:
            return [features[i] for i in self.out_indices]
        x = jnp.mean(features[-1], axis=(1, 2))
        self.sow("intermediates", "pre_logits", x)  # for feature distillation
        if pre_logits:
            return x
        return self.classifier(x, self.num_classes, drop_rate=self.drop_rate, train=train, name="fc")

    def forward_features(self, x, train: bool) -> list:
        """[stem activation, layer1, ..., layer4] feature maps (NHWC)."""
        if self.stem not in STEMS:
            raise UserError(f"ResNet stem must be one of {', '.join(STEMS)}, not {self.stem!r}")
        x = x.astype(self.dtype)
        if self.stem == "deep":
            x = DeepStem(width=self.stem_width, out=self.width, name="conv1", **self.shared)(x, train)
        else:
            big = self.stem == "7x7"
            x = self.conv(self.width, 7 if big else 3, stride=2 if big else 1, name="conv1")(x)
        x = nn.relu(self.batch_norm(train, name="bn1")(x))
        features = [x]
        if self.stem != "3x3":
            x = self.max_pool(x, 3, 2, padding=1)
        block = {"basic": BasicBlock, "bottleneck": Bottleneck}[self.block]
        total, index, in_ch = sum(self.depths), 0, self.width
        for stage, depth in enumerate(self.depths):
            planes, blocks = self.width * 2 ** stage, []
            for i in range(depth):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(functools.partial(
                    block, planes=planes, stride=stride,
                    downsample=i == 0 and (stride != 1 or in_ch != planes * block.expansion),
                    avg_down=self.avg_down, cardinality=self.cardinality, base_width=self.base_width,
                    drop_path_rate=self.drop_path_rate * index / max(total - 1, 1),
                    **self.shared))
                in_ch, index = planes * block.expansion, index + 1
            x = layers.Sequential(blocks, name=f"layer{stage + 1}")(x, train)
            features.append(x)
        return features


_RESNETS = {
    "resnet18": (dict(block="basic", depths=(2, 2, 2, 2)), "69.75 (torchvision recipe)"),
    "resnet34": (dict(block="basic", depths=(3, 4, 6, 3)), "73.3 (torchvision recipe)"),
    "resnet50": (dict(depths=(3, 4, 6, 3)), "76.1 (paper), 80.4 (modern recipe)"),
    "resnet101": (dict(depths=(3, 4, 23, 3)), "77.4 (paper)"),
    "resnet152": (dict(depths=(3, 8, 36, 3)), "78.3 (paper)"),
    "resnext50_32x4d": (dict(depths=(3, 4, 6, 3), cardinality=32, base_width=4), "77.8 (paper)"),
    "resnet50d": (dict(depths=(3, 4, 6, 3), stem="deep", avg_down=True), "77.2 (paper, ResNet-D alone)"),
}
for _name, (_arch, _top1) in _RESNETS.items():
    register(ModelCard(_name, "resnet", interpolation="bilinear", top1=_top1), ResNet, **_arch)
