"""Vision Transformer (Dosovitskiy et al. 2020) and DeiT with a distillation token
(Touvron et al. 2021), as timm builds them: pre-norm blocks, LayerNorm eps 1e-6, exact GELU,
class-token pooling, learned position embedding that includes the prefix tokens.

Attention keeps timm's fused `qkv` projection, with kernel shape (embed, 3, heads, head_dim) so
heads can be sharded for tensor parallelism; converted weights are reshaped into it.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvision.models import layers
from jaxvision.models.registry import HALF, ModelCard, register


def resample_pos_embed(pos, num_prefix: int, grid: tuple[int, int]):
    """Bicubically resize the patch part of a (1, prefix + h*w, D) position embedding to `grid`,
    so a model trained at one resolution runs (or fine-tunes) at another."""
    prefix, patches = pos[:, :num_prefix], pos[:, num_prefix:]
    old = math.isqrt(patches.shape[1])
    if (old, old) == tuple(grid):
        return pos
    d = pos.shape[-1]
    patches = jax.image.resize(patches.reshape(1, old, old, d), (1, *grid, d), method="bicubic")
    return jnp.concatenate([prefix, patches.reshape(1, -1, d).astype(pos.dtype)], axis=1)


def stack_blocks(params: dict) -> dict:
    """Parameters of unscanned blocks (`blocks/0` ... `blocks/N-1`) in the scanned layout (one
    `blocks` subtree whose arrays have a leading layer axis); other parameters unchanged."""
    blocks = params["blocks"]
    layers_ = [blocks[str(i)] for i in range(len(blocks))]
    return {**params, "blocks": jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers_)}


def unstack_blocks(params: dict) -> dict:
    """The inverse of `stack_blocks`."""
    depth = jax.tree_util.tree_leaves(params["blocks"])[0].shape[0]
    return {**params, "blocks": {str(i): jax.tree_util.tree_map(lambda x: x[i], params["blocks"])
                                 for i in range(depth)}}


def scanned(params: dict) -> bool:
    return "blocks" in params and "0" not in params["blocks"]


def match_layout(params: dict, like: dict) -> dict:
    """`params` in the blocks layout (scanned or not) of `like`, with its position embedding
    resampled to `like`'s patch grid (fine-tuning at another resolution, as timm does)."""
    pos, want = params.get("pos_embed"), like.get("pos_embed")
    if pos is not None and want is not None and pos.shape != want.shape and pos.shape[-1] == want.shape[-1]:
        num_prefix = sum(t in like for t in ("cls_token", "dist_token"))
        grid = int(round((want.shape[1] - num_prefix) ** 0.5))
        params = {**params, "pos_embed": resample_pos_embed(pos, num_prefix, (grid, grid))}
    if "blocks" not in params or "blocks" not in like or scanned(params) == scanned(like):
        return params
    return stack_blocks(params) if scanned(like) else unstack_blocks(params)


class Attention(layers.ZooModule, kw_only=True):
    num_heads: int

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        qkv = self.dense((3, self.num_heads, d // self.num_heads),
                         axes=("embed", None, "heads", "kv"), name="qkv")(x)
        out = self.ops.attention(self.ops.constrain(qkv, ("batch", None, None, "heads", None)))
        return self.dense(d, in_axes=(-2, -1), axes=("heads", "kv", "embed"), name="proj")(out)


class Block(layers.ZooModule, kw_only=True):
    num_heads: int
    mlp_ratio: float = 4.0
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        return self.forward(x, self.drop_path_rate, train)

    def forward(self, x, drop_path_rate, train: bool):
        kw = self.shared
        y = Attention(num_heads=self.num_heads, name="attn", **kw)(self.layer_norm("norm1")(x))
        x = x + layers.drop_path(y, drop_path_rate, train)
        y = layers.Mlp(hidden=int(x.shape[-1] * self.mlp_ratio), drop_rate=self.drop_rate, name="mlp",
                **kw)(self.layer_norm("norm2")(x), train)
        return self.constrain(x + layers.drop_path(y, drop_path_rate, train))


class ScannedBlock(Block, kw_only=True):
    """A block as the body of `nn.scan`: (x, its drop-path rate, train) -> (x, None)."""

    @nn.compact
    def __call__(self, x, drop_path_rate, train: bool = False):
        return self.forward(x, drop_path_rate, train), None


class PatchEmbed(layers.ZooModule, kw_only=True):
    patch_size: int
    embed_dim: int

    @nn.compact
    def __call__(self, x):
        return self.conv(self.embed_dim, self.patch_size, stride=self.patch_size, padding="valid",
                         bias=True, kernel_init=nn.initializers.lecun_normal(), name="proj")(x)


class VisionTransformer(layers.ZooModule, kw_only=True):
    """ViT; `distilled=True` adds DeiT's distillation token and second head.

    A distilled model returns the mean of both heads, except with `distilled_training=True` and
    `train=True`, where it returns the pair (class-head logits, distillation-head logits)."""

    patch_size: int = 16
    img_size: int = 224  # sets the position-embedding grid; other input sizes are resampled
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    distilled: bool = False
    distilled_training: bool = False
    num_classes: int = 1000
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    scan_blocks: bool = False  # the blocks under nn.scan: one block compiled, parameters stacked
    remat_policy: str = "none"  # each block rematerialised: none | full | dots_saveable | ...

    @property
    def num_prefix(self) -> int:
        return 2 if self.distilled else 1

    def group_matcher(self) -> dict:
        """Layer groups (timm's): embeddings and tokens, each block (final norm with the last)."""
        return {"stem": r"^cls_token|pos_embed|patch_embed|dist_token",
                "blocks": [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))]}

    @nn.compact
    def __call__(self, x, train: bool = False, pre_logits: bool = False):
        x = self.forward_features(x, train)
        tokens = [x[:, i] for i in range(self.num_prefix)]
        self.sow("intermediates", "pre_logits", sum(tokens) / len(tokens))  # for feature distillation
        if pre_logits:
            return sum(tokens) / len(tokens)
        logits = [self.classifier(t, self.num_classes, drop_rate=self.drop_rate, train=train,
                                  name=name, in_axis="embed")
                  for t, name in zip(tokens, ("head", "head_dist"))]
        if not self.distilled:
            return logits[0]
        if self.distilled_training and train:
            return tuple(logits)
        return (logits[0] + logits[1]) / 2

    def forward_features(self, x, train: bool):
        """Tokens after the final norm: (batch, prefix + patches, embed)."""
        kw = self.shared
        x = PatchEmbed(patch_size=self.patch_size, embed_dim=self.embed_dim, name="patch_embed",
                       **kw)(x.astype(self.dtype))
        b, gh, gw, d = x.shape
        token_init = nn.with_logical_partitioning(nn.initializers.zeros, (None, None, "embed"))
        names = ("cls_token", "dist_token")[:self.num_prefix]
        prefix = [self.param(n, token_init, (1, 1, d), self.param_dtype) for n in names]
        grid = self.img_size // self.patch_size
        pos = self.param("pos_embed", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), (None, None, "embed")),
            (1, self.num_prefix + grid * grid, d), self.param_dtype)
        pos = resample_pos_embed(pos, self.num_prefix, (gh, gw))
        tokens = [jnp.broadcast_to(t, (b, 1, d)).astype(self.dtype) for t in prefix] + [x.reshape(b, gh * gw, d)]
        x = self.constrain(self.ops.add_embedding(jnp.concatenate(tokens, axis=1), pos.astype(self.dtype)))
        x = nn.Dropout(self.drop_rate)(x, deterministic=not train)
        rates = [self.drop_path_rate * i / max(self.depth - 1, 1) for i in range(self.depth)]
        block = dict(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, drop_rate=self.drop_rate, **kw)
        if self.scan_blocks:
            stack = nn.scan(layers.remat(ScannedBlock, self.remat_policy, static_argnums=(3,), scanned=True),
                            variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                            in_axes=(0, nn.broadcast), length=self.depth,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = stack(name="blocks", **block)(x, jnp.asarray(rates, jnp.float32), train)
        else:
            body = layers.remat(Block, self.remat_policy, static_argnums=(2,))
            x = layers.Sequential([functools.partial(body, drop_path_rate=r, **block) for r in rates],
                                  name="blocks")(x, train)
        return self.layer_norm("norm")(x)


_VITS = {  # size: (embed_dim, depth, heads, ViT top-1, DeiT-distilled top-1)
    "tiny": (192, 12, 3, "72.2 (DeiT-Ti recipe)", "74.5"),
    "small": (384, 12, 6, "79.8 (DeiT-S recipe)", "81.2"),
    "base": (768, 12, 12, "81.8 (DeiT-B recipe)", "83.4"),
    "large": (1024, 24, 16, "85.9 (in21k pretrain)", None),
}
for _size, (_dim, _depth, _heads, _top1, _deit_top1) in _VITS.items():
    _arch = dict(embed_dim=_dim, depth=_depth, num_heads=_heads)
    register(ModelCard(f"vit_{_size}_patch16_224", "vit", mean=HALF, std=HALF, crop_pct=0.9,
                       top1=_top1), VisionTransformer, **_arch)
    if _deit_top1:
        register(ModelCard(f"deit_{_size}_distilled_patch16_224", "vit", crop_pct=0.9,
                           top1=_deit_top1), VisionTransformer, distilled=True, **_arch)
