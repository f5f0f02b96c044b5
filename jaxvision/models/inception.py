"""Inception v3 (Szegedy et al. 2016) as timm builds it (without the auxiliary classifier):
conv-BN(eps 1e-3)-ReLU units, Inception A-E modules with factorised 1xn / nx1 convolutions, 299 px.
Names mirror timm's (`Conv2d_1a_3x3.conv`, `Mixed_5b.branch5x5_1.bn`, `fc`)."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxvision.models import layers
from jaxvision.models.registry import HALF, ModelCard, register


class ConvBN(layers.ZooModule, kw_only=True):
    features: int
    kernel: tuple = (1, 1)
    stride: int = 1
    padding: tuple = (0, 0)

    @nn.compact
    def __call__(self, x, train: bool = False):
        ph, pw = self.padding
        x = self.conv(self.features, self.kernel, stride=self.stride, padding=((ph, ph), (pw, pw)), name="conv")(x)
        return nn.relu(self.batch_norm(train, name="bn", eps=1e-3)(x))


class InceptionModule(layers.ZooModule, kw_only=True):
    """One of the A-E modules; `kind` picks the branch layout."""

    kind: str
    pool_features: int = 0  # A
    c7: int = 0  # C

    @nn.compact
    def __call__(self, x, train: bool = False):
        def cb(name, features, kernel=(1, 1), stride=1, padding=(0, 0)):
            return lambda y: ConvBN(features=features, kernel=kernel, stride=stride, padding=padding,
                                    **self.shared, name=name)(y, train)
        k = self.kind
        if k == "A":
            out = [cb("branch1x1", 64)(x),
                   cb("branch5x5_2", 64, (5, 5), padding=(2, 2))(cb("branch5x5_1", 48)(x)),
                   cb("branch3x3dbl_3", 96, (3, 3), padding=(1, 1))(
                       cb("branch3x3dbl_2", 96, (3, 3), padding=(1, 1))(cb("branch3x3dbl_1", 64)(x))),
                   cb("branch_pool", self.pool_features)(self.avg_pool(x, 3, 1, padding=1))]
        elif k == "B":
            out = [cb("branch3x3", 384, (3, 3), 2)(x),
                   cb("branch3x3dbl_3", 96, (3, 3), 2)(
                       cb("branch3x3dbl_2", 96, (3, 3), padding=(1, 1))(cb("branch3x3dbl_1", 64)(x))),
                   self.max_pool(x, 3, 2)]
        elif k == "C":
            c7 = self.c7
            b7 = cb("branch7x7_1", c7)(x)
            b7 = cb("branch7x7_3", 192, (7, 1), padding=(3, 0))(cb("branch7x7_2", c7, (1, 7), padding=(0, 3))(b7))
            d = cb("branch7x7dbl_1", c7)(x)
            for i, (features, kernel, pad) in enumerate([(c7, (7, 1), (3, 0)), (c7, (1, 7), (0, 3)),
                                                         (c7, (7, 1), (3, 0)), (192, (1, 7), (0, 3))]):
                d = cb(f"branch7x7dbl_{i + 2}", features, kernel, padding=pad)(d)
            out = [cb("branch1x1", 192)(x), b7, d, cb("branch_pool", 192)(self.avg_pool(x, 3, 1, padding=1))]
        elif k == "D":
            b3 = cb("branch3x3_2", 320, (3, 3), 2)(cb("branch3x3_1", 192)(x))
            b7 = cb("branch7x7x3_1", 192)(x)
            b7 = cb("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(cb("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7))
            out = [b3, cb("branch7x7x3_4", 192, (3, 3), 2)(b7), self.max_pool(x, 3, 2)]
        else:  # E
            b3 = cb("branch3x3_1", 384)(x)
            b3 = jnp.concatenate([cb("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3),
                                  cb("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3)], axis=-1)
            d = cb("branch3x3dbl_2", 384, (3, 3), padding=(1, 1))(cb("branch3x3dbl_1", 448)(x))
            d = jnp.concatenate([cb("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(d),
                                 cb("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(d)], axis=-1)
            out = [cb("branch1x1", 320)(x), b3, d, cb("branch_pool", 192)(self.avg_pool(x, 3, 1, padding=1))]
        return jnp.concatenate(out, axis=-1)


# (name, kind, options) after the stem, in order; timm's module order defines the layer groups.
MIXED = (("Mixed_5b", "A", {"pool_features": 32}), ("Mixed_5c", "A", {"pool_features": 64}),
         ("Mixed_5d", "A", {"pool_features": 64}), ("Mixed_6a", "B", {}),
         ("Mixed_6b", "C", {"c7": 128}), ("Mixed_6c", "C", {"c7": 160}), ("Mixed_6d", "C", {"c7": 160}),
         ("Mixed_6e", "C", {"c7": 192}), ("Mixed_7a", "D", {}), ("Mixed_7b", "E", {}), ("Mixed_7c", "E", {}))


class InceptionV3(layers.ZooModule, kw_only=True):
    num_classes: int = 1000
    drop_rate: float = 0.0
    features_only: bool = False
    out_indices: Sequence[int] = (0, 1, 2, 3, 4)

    def group_matcher(self):
        """Layer groups (timm's): Conv2d_1/2 first, Conv2d_3/4 second, each Mixed module after."""
        order = {name: i + 2 for i, (name, _, _) in enumerate(MIXED)}

        def matcher(name: str):
            if name.startswith(("Conv2d_1", "Conv2d_2")):
                return 0
            if name.startswith(("Conv2d_3", "Conv2d_4")):
                return 1
            return order.get(name.split(".")[0], float("inf"))
        return matcher

    @nn.compact
    def __call__(self, x, train: bool = False, pre_logits: bool = False):
        kw = self.shared
        x = x.astype(self.dtype)
        x = ConvBN(features=32, kernel=(3, 3), stride=2, name="Conv2d_1a_3x3", **kw)(x, train)
        x = ConvBN(features=32, kernel=(3, 3), name="Conv2d_2a_3x3", **kw)(x, train)
        x = ConvBN(features=64, kernel=(3, 3), padding=(1, 1), name="Conv2d_2b_3x3", **kw)(x, train)
        features = [x]
        x = self.max_pool(x, 3, 2)
        x = ConvBN(features=80, name="Conv2d_3b_1x1", **kw)(x, train)
        x = ConvBN(features=192, kernel=(3, 3), name="Conv2d_4a_3x3", **kw)(x, train)
        features.append(x)
        x = self.max_pool(x, 3, 2)
        for name, kind, opts in MIXED:
            x = InceptionModule(kind=kind, name=name, **opts, **kw)(x, train)
            if name in ("Mixed_5d", "Mixed_6e", "Mixed_7c"):
                features.append(x)
        if self.features_only:
            return [features[i] for i in self.out_indices]
        x = jnp.mean(x, axis=(1, 2))
        self.sow("intermediates", "pre_logits", x)  # for feature distillation
        if pre_logits:
            return x
        return self.classifier(x, self.num_classes, drop_rate=self.drop_rate, train=train, name="fc")


register(ModelCard("inception_v3", "inception", input_size=299, mean=HALF, std=HALF,
                   top1="77.3 (torchvision weights)"), InceptionV3)
