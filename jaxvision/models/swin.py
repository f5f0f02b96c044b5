"""Swin Transformer (Liu et al. 2021) as timm builds it: 4x4 patch embedding, stages of window
attention blocks alternating plain and cyclically shifted windows (with the shifted-window mask
and a learned relative position bias), patch merging between stages, LayerNorm eps 1e-5, average
pooling, linear head. Feature maps stay NHWC throughout, as in timm.

Window and shift follow the stage resolution like timm's: a stage no larger than the window uses
one window over everything and no shift. A smaller window reads the central part of the relative
position table (the same bias for the same offset). Names mirror timm's (`patch_embed.proj`,
`layers.1.downsample.reduction`, `layers.0.blocks.1.attn.relative_position_bias_table`,
`head.fc`).
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxvision.models import layers
from jaxvision.models.registry import ModelCard, register

LN_EPS = 1e-5


def window_partition(x, ws: int):
    """(B, H, W, C) -> (B * windows, ws * ws, C), windows in row-major order (numpy or jax)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // ws, ws, w // ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def window_reverse(windows, ws: int, h: int, w: int):
    c = windows.shape[-1]
    x = windows.reshape(-1, h // ws, w // ws, ws, ws, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def relative_position_index(ws: int, table_ws: int) -> np.ndarray:
    """Index into a ((2*table_ws - 1)^2)-row bias table for every pair of positions in a window of
    `ws` (<= table_ws), timm's layout: (dy + table_ws - 1) * (2 * table_ws - 1) + dx + table_ws - 1."""
    coords = np.stack(np.meshgrid(np.arange(ws), np.arange(ws), indexing="ij")).reshape(2, -1)
    rel = coords[:, :, None] - coords[:, None, :] + (table_ws - 1)
    return rel[0] * (2 * table_ws - 1) + rel[1]


def shifted_window_mask(h: int, w: int, ws: int, shift: int) -> np.ndarray:
    """(windows, ws*ws, ws*ws): 0 within a region, -100 across regions the cyclic shift joined."""
    img = np.zeros((1, h, w, 1), np.float32)
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[:, hs, wsl, :] = cnt
            cnt += 1
    win = window_partition(img, ws)[..., 0]
    diff = win[:, None, :] - win[:, :, None]
    return np.where(diff != 0, -100.0, 0.0).astype(np.float32)


class WindowAttention(layers.ZooModule, kw_only=True):
    num_heads: int
    window_size: int  # the configured window: sets the bias table's size

    @nn.compact
    def __call__(self, x, ws: int, mask=None):
        """x: (B * windows, ws*ws, C); mask: (windows, ws*ws, ws*ws) or None."""
        n, c = x.shape[1], x.shape[2]
        heads = self.num_heads
        qkv = self.dense((3, heads, c // heads), axes=("embed", None, "heads", "kv"), name="qkv")(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        table = self.param("relative_position_bias_table", nn.with_logical_partitioning(
            nn.initializers.truncated_normal(0.02), (None, "heads")),
            ((2 * self.window_size - 1) ** 2, heads), self.param_dtype)
        index = relative_position_index(ws, self.window_size).reshape(-1)
        bias = table[index].reshape(n, n, heads).transpose(2, 0, 1).astype(jnp.float32)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * (c // heads) ** -0.5 + bias
        if mask is not None:
            windows = mask.shape[0]
            logits = logits.reshape(-1, windows, heads, n, n) + mask[None, :, None]
            logits = logits.reshape(-1, heads, n, n)
        attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", attn, v)
        return self.dense(c, in_axes=(-2, -1), axes=("heads", "kv", "embed"), name="proj")(out)


class SwinBlock(layers.ZooModule, kw_only=True):
    num_heads: int
    window_size: int = 7
    shifted: bool = False
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        b, h, w, c = x.shape
        ws = min(self.window_size, h, w) if max(h, w) <= self.window_size else self.window_size
        shift = ws // 2 if self.shifted and min(h, w) > self.window_size else 0
        y = self.layer_norm("norm1", eps=LN_EPS)(x)
        if shift:
            y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
        ph, pw = (-h) % ws, (-w) % ws
        y = jnp.pad(y, ((0, 0), (0, ph), (0, pw), (0, 0)))
        hp, wp = h + ph, w + pw
        mask = jnp.asarray(shifted_window_mask(hp, wp, ws, shift)) if shift else None
        y = WindowAttention(num_heads=self.num_heads, window_size=self.window_size, name="attn",
                            **self.shared)(window_partition(y, ws), ws, mask)
        y = window_reverse(y, ws, hp, wp)[:, :h, :w]
        if shift:
            y = jnp.roll(y, (shift, shift), axis=(1, 2))
        x = x + layers.drop_path(y, self.drop_path_rate, train)
        y = layers.Mlp(hidden=int(c * self.mlp_ratio), **self.shared,
                       name="mlp")(self.layer_norm("norm2", eps=LN_EPS)(x), train)
        return self.constrain(x + layers.drop_path(y, self.drop_path_rate, train))


class PatchMerging(layers.ZooModule, kw_only=True):
    """2x2 neighbourhoods concatenated (timm's order), normalised, projected to twice the width."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        b, h, w, c = x.shape
        x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
        h, w = x.shape[1], x.shape[2]
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 4, 2, 5).reshape(b, h // 2, w // 2, 4 * c)
        x = self.layer_norm("norm", eps=LN_EPS)(x)
        return self.dense(2 * c, axes=("embed", None), name="reduction", bias=False)(x)


class PatchEmbed(layers.ZooModule, kw_only=True):
    patch_size: int
    embed_dim: int

    @nn.compact
    def __call__(self, x):
        x = self.conv(self.embed_dim, self.patch_size, stride=self.patch_size, padding="valid",
                      bias=True, kernel_init=nn.initializers.lecun_normal(), name="proj")(x)
        return self.layer_norm("norm", eps=LN_EPS)(x)


class Head(layers.ZooModule, kw_only=True):
    num_classes: int
    drop_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        return self.classifier(x, self.num_classes, drop_rate=self.drop_rate, train=train, name="fc",
                               in_axis="embed")


class SwinTransformer(layers.ZooModule, kw_only=True):
    patch_size: int = 4
    embed_dim: int = 96
    depths: Sequence[int] = (2, 2, 6, 2)
    num_heads: Sequence[int] = (3, 6, 12, 24)
    window_size: int = 7
    num_classes: int = 1000
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    features_only: bool = False
    out_indices: Sequence[int] = (0, 1, 2, 3)

    def group_matcher(self) -> dict:
        """Layer groups (timm's): patch embedding; each block, a stage's merging with its first
        block; the final norm with the last block."""
        return {"stem": r"^patch_embed", "blocks": [(r"^layers\.(\d+)\.downsample", (0,)),
                                                    (r"^layers\.(\d+)\.\w+\.(\d+)", None),
                                                    (r"^norm", (99999,))]}

    @nn.compact
    def __call__(self, x, train: bool = False, pre_logits: bool = False):
        kw = self.shared
        x = PatchEmbed(patch_size=self.patch_size, embed_dim=self.embed_dim, name="patch_embed", **kw)(
            x.astype(self.dtype))
        total, index, features = sum(self.depths), 0, []
        stages = layers.Stages(name="layers")
        for i, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
            rates = tuple(self.drop_path_rate * (index + j) / max(total - 1, 1) for j in range(depth))
            stage = functools.partial(
                layers.Stage, downsample=functools.partial(PatchMerging, **kw) if i else None,
                blocks=[functools.partial(SwinBlock, num_heads=heads, window_size=self.window_size,
                                          shifted=j % 2 == 1, drop_path_rate=r, **kw)
                        for j, r in enumerate(rates)])
            x = stages(i, stage, x, train)
            index += depth
            features.append(x)
        if self.features_only:
            return [features[i] for i in self.out_indices]
        x = jnp.mean(self.layer_norm("norm", eps=LN_EPS)(x), axis=(1, 2))
        self.sow("intermediates", "pre_logits", x)  # for feature distillation
        if pre_logits:
            return x
        return Head(num_classes=self.num_classes, drop_rate=self.drop_rate, name="head", **kw)(x, train)


_SWINS = {  # name: (embed_dim, depths, heads, published top-1)
    "tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24), "81.2 (paper)"),
    "small": (96, (2, 2, 18, 2), (3, 6, 12, 24), "83.2 (paper)"),
    "base": (128, (2, 2, 18, 2), (4, 8, 16, 32), "83.5 (paper)"),
}
for _size, (_dim, _depths, _heads, _top1) in _SWINS.items():
    register(ModelCard(f"swin_{_size}_patch4_window7_224", "swin", crop_pct=0.9, top1=_top1),
             SwinTransformer, embed_dim=_dim, depths=_depths, num_heads=_heads)
