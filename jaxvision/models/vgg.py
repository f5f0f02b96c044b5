"""VGG (Simonyan & Zisserman 2014) as timm builds it: 3x3 conv stages (optionally with BatchNorm)
separated by max-pooling, then the classifier MLP as convolutions (`pre_logits.fc1` 7x7, `fc2`
1x1; inputs smaller than 7x7 are first average-pooled up to it, as timm does), global pooling and
`head.fc`. `features.<i>` indices count conv, norm, ReLU and pool layers exactly like timm's."""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxvision.models import layers
from jaxvision.models.registry import ModelCard, register

VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def adaptive_avg_pool(x, out_h: int, out_w: int):
    """PyTorch's adaptive_avg_pool2d on NHWC: bin i covers [floor(i*H/out), ceil((i+1)*H/out))."""
    h, w = x.shape[1:3]
    rows = [jnp.mean(x[:, math.floor(i * h / out_h):math.ceil((i + 1) * h / out_h)], axis=1, keepdims=True)
            for i in range(out_h)]
    x = jnp.concatenate(rows, axis=1)
    cols = [jnp.mean(x[:, :, math.floor(j * w / out_w):math.ceil((j + 1) * w / out_w)], axis=2, keepdims=True)
            for j in range(out_w)]
    return jnp.concatenate(cols, axis=2)


class Features(layers.ZooModule, kw_only=True):
    cfg: Sequence
    use_bn: bool

    @nn.compact
    def __call__(self, x, train: bool = False):
        """All taps timm's features_only reports: before each pooling, and the final output."""
        index, taps = 0, []
        for v in self.cfg:
            if v == "M":
                taps.append(x)
                x = self.max_pool(x, 2, 2)
                index += 1
                continue
            x = self.conv(v, 3, bias=True, name=str(index))(x)
            if self.use_bn:
                x = self.batch_norm(train, name=str(index + 1))(x)
            x = nn.relu(x)
            index += 3 if self.use_bn else 2
        return x, taps + [x]


class ConvMlp(layers.ZooModule, kw_only=True):
    hidden: int = 4096
    drop_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        if x.shape[1] < 7 or x.shape[2] < 7:
            x = adaptive_avg_pool(x, max(7, x.shape[1]), max(7, x.shape[2]))
        x = nn.relu(self.conv(self.hidden, 7, padding="valid", bias=True, name="fc1")(x))
        x = nn.Dropout(self.drop_rate)(x, deterministic=not train)
        return nn.relu(self.conv(self.hidden, 1, bias=True, name="fc2")(x))


class Head(layers.ZooModule, kw_only=True):
    num_classes: int
    drop_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        return self.classifier(x, self.num_classes, drop_rate=self.drop_rate, train=train, name="fc")


class VGG(layers.ZooModule, kw_only=True):
    cfg: Sequence = VGG16
    use_bn: bool = False
    num_classes: int = 1000
    drop_rate: float = 0.0
    features_only: bool = False
    out_indices: Sequence[int] = (0, 1, 2, 3, 4, 5)

    def group_matcher(self) -> dict:
        """Layer groups (timm's): the first conv, then every `features` index; the MLP and head last."""
        return {"stem": r"^features\.0", "blocks": r"^features\.(\d+)"}

    @nn.compact
    def __call__(self, x, train: bool = False, pre_logits: bool = False):
        kw = self.shared
        x, taps = Features(cfg=tuple(self.cfg), use_bn=self.use_bn, name="features", **kw)(
            x.astype(self.dtype), train)
        if self.features_only:
            return [taps[i] for i in self.out_indices]
        x = ConvMlp(drop_rate=self.drop_rate, name="pre_logits", **kw)(x, train)
        x = jnp.mean(x, axis=(1, 2))
        self.sow("intermediates", "pre_logits", x)  # for feature distillation
        if pre_logits:
            return x
        return Head(num_classes=self.num_classes, drop_rate=self.drop_rate, name="head", **kw)(x, train)


register(ModelCard("vgg16", "vgg", interpolation="bilinear", top1="71.6 (torchvision weights)"), VGG)
register(ModelCard("vgg16_bn", "vgg", interpolation="bilinear", top1="73.4 (torchvision weights)"), VGG,
         use_bn=True)
