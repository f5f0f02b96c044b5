"""ConvNeXt (Liu et al. 2022) as timm builds it: 4x4 patchify stem, stages of 7x7 depthwise conv ->
LayerNorm -> MLP blocks with layer scale (`gamma`), LayerNorm + 2x2 strided conv between stages,
pooled LayerNorm + linear head. Names mirror timm's (`stem.0`, `stages.1.downsample.1`,
`stages.0.blocks.0.conv_dw`, `head.norm`, `head.fc`)."""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxvision.models import layers
from jaxvision.models.registry import ModelCard, register


class ConvNeXtBlock(layers.ZooModule, kw_only=True):
    dim: int
    layer_scale: float = 1e-6
    drop_path_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        y = self.conv(self.dim, 7, groups=self.dim, bias=True, name="conv_dw")(x)
        y = self.layer_norm("norm", axis_name="conv_out")(y)
        y = layers.Mlp(hidden=4 * self.dim, **self.shared, name="mlp")(y)
        gamma = self.param("gamma", nn.with_logical_partitioning(
            nn.initializers.constant(self.layer_scale), ("conv_out",)), (self.dim,), self.param_dtype)
        return self.constrain(x + layers.drop_path(y * gamma.astype(y.dtype), self.drop_path_rate, train))


class Downsample(layers.ZooModule, kw_only=True):
    dim: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = self.layer_norm("0", axis_name="conv_out")(x)
        return self.conv(self.dim, 2, stride=2, padding="valid", bias=True, name="1")(x)


class Stem(layers.ZooModule, kw_only=True):
    dim: int

    @nn.compact
    def __call__(self, x):
        x = self.conv(self.dim, 4, stride=4, padding="valid", bias=True, name="0")(x)
        return self.layer_norm("1", axis_name="conv_out")(x)


class Head(layers.ZooModule, kw_only=True):
    num_classes: int
    drop_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False, pre_logits: bool = False):
        x = self.layer_norm("norm", axis_name="conv_out")(jnp.mean(x, axis=(1, 2)))
        if pre_logits:
            return x
        return self.classifier(x, self.num_classes, drop_rate=self.drop_rate, train=train, name="fc")


class ConvNeXt(layers.ZooModule, kw_only=True):
    depths: Sequence[int] = (3, 3, 9, 3)
    dims: Sequence[int] = (96, 192, 384, 768)
    num_classes: int = 1000
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    features_only: bool = False
    out_indices: Sequence[int] = (0, 1, 2, 3)

    def group_matcher(self) -> dict:
        """Layer groups (timm's): stem; each block, a stage's downsampling with its first block."""
        return {"stem": r"^stem", "blocks": [(r"^stages\.(\d+)\.downsample", (0,)),
                                             (r"^stages\.(\d+)\.blocks\.(\d+)", None)]}

    @nn.compact
    def __call__(self, x, train: bool = False, pre_logits: bool = False):
        kw = self.shared
        x = Stem(dim=self.dims[0], name="stem", **kw)(x.astype(self.dtype))
        total, index, features = sum(self.depths), 0, []
        stages = layers.Stages(name="stages")
        for i, (depth, dim) in enumerate(zip(self.depths, self.dims)):
            rates = [self.drop_path_rate * (index + j) / max(total - 1, 1) for j in range(depth)]
            stage = functools.partial(
                layers.Stage, downsample=functools.partial(Downsample, dim=dim, **kw) if i else None,
                blocks=[functools.partial(ConvNeXtBlock, dim=dim, drop_path_rate=r, **kw) for r in rates])
            x = stages(i, stage, x, train)
            index += depth
            features.append(x)
        if self.features_only:
            return [features[i] for i in self.out_indices]
        head = Head(num_classes=self.num_classes, drop_rate=self.drop_rate, name="head", **kw)
        pooled = head(x, train, pre_logits=True)
        self.sow("intermediates", "pre_logits", pooled)  # for feature distillation
        return pooled if pre_logits else head(x, train)


_CONVNEXTS = {  # name: (depths, dims, published top-1)
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768), "82.1 (paper)"),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768), "83.1 (paper)"),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024), "83.8 (paper)"),
}
for _size, (_depths, _dims, _top1) in _CONVNEXTS.items():
    register(ModelCard(f"convnext_{_size}", "convnext", crop_pct=0.95, top1=_top1), ConvNeXt,
             depths=_depths, dims=_dims)
