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
from jax import lax

from jaxvision import native
from jaxvision.models import conv, layers
from jaxvision.models.registry import HALF, ModelCard, register
from jaxvision.native import ops as native_ops


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


def fused_attention(qkv):
    """`attention` of a fused projection's (batch, tokens, 3, heads, head_dim) output. On CPU with
    the native kernels one call reads the heads from it in place and writes the output
    tokens-first (`native_ops.attention`): none of the transposes XLA would copy. It computes in
    float32; half-precision inputs take it only under differentiation (`_half_attention`)."""
    if conv.lowering() and native.enabled() and qkv.dtype in native_ops.DTYPES:
        return native_ops.attention(qkv) if qkv.dtype == jnp.float32 else _half_attention(qkv)
    return _split_attention(qkv)


def _split_attention(qkv):
    return attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])


@jax.custom_vjp
def _half_attention(qkv):
    """Half-precision attention: XLA's in inference, the native float32 kernels (inputs converted
    there and back) under differentiation, where XLA's transposes, pads and conversions of the
    gradients cost more than the whole float32 attention (ViT-S training in bfloat16 1.3-1.5x
    with `conv.add_bias`; inference, 5-15% slower through the native kernels, keeps XLA's;
    experiments/PERF.md)."""
    return _split_attention(qkv)


def _half_attention_fwd(qkv):
    return jax.vjp(lambda t: native_ops.attention(t.astype(jnp.float32)).astype(t.dtype), qkv)


def _half_attention_bwd(vjp, do):
    return vjp(do)


_half_attention.defvjp(_half_attention_fwd, _half_attention_bwd)


def attention(q, k, v):
    """Softmax attention over (batch, tokens, heads, head_dim) queries, keys and values; logits and
    softmax in float32. On CPU oneDNN's one head at a time (`native_ops.attention`, float32) or
    `_cpu_attention`, elsewhere `jax.nn.dot_product_attention` (cuDNN or XLA's fused kernels on
    GPU and TPU)."""
    if not conv.lowering():
        return jax.nn.dot_product_attention(q, k, v)
    if native.enabled() and q.dtype == k.dtype == v.dtype == jnp.float32:
        return native_ops.attention(jnp.stack((q, k, v), axis=2))
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    return _cpu_attention(q * q.shape[-1] ** -0.5, k, v).transpose(0, 2, 1, 3)


def _matmul(a, b, transpose_a=False, transpose_b=False):
    """Float32 products of the (batch, heads) matrices of a and b, either read transposed: on
    oneDNN's kernels where enabled (XLA:CPU runs these batched products on one core)."""
    if native.enabled() and native_ops.dense_supported(a, b):
        return native_ops.matmul(a, b, transpose_a, transpose_b, jnp.float32)
    contract = ((a.ndim - 2 if transpose_a else a.ndim - 1,), (b.ndim - 1 if transpose_b else b.ndim - 2))
    batch = tuple(range(a.ndim - 2))
    return lax.dot_general(a, b, (contract, (batch, batch)), preferred_element_type=jnp.float32)


def _attention_forward(q, k, v):
    """(output, unnormalised probabilities e, row sums l) of heads-first (b, h, n, d) inputs; q is
    already scaled. The normalisation divides the (n, d) output instead of the (n, n) probabilities."""
    s = _matmul(q, k, transpose_b=True)
    e = jnp.exp(s - s.max(-1, keepdims=True))
    l = e.sum(-1)
    o = _matmul(e.astype(v.dtype), v)
    return (o / l[..., None]).astype(v.dtype), e, l


@jax.custom_vjp
def _cpu_attention(q, k, v):
    """Attention on heads-first inputs for XLA:CPU, whose batched matrix products of these sizes
    run on one core (about 120 GFLOP/s at 197 x 197 x 64): the fewest passes over the (n, n)
    probabilities. Forward: the softmax normalised after the product with v. Backward, as
    FlashAttention's: with D = rowsum(dO * O), dS = P * (dP - D), so neither the normalised
    probabilities nor autodiff's broadcasts of the softmax are materialised. ViT-S's attention,
    batch 16, forward 10 -> 6 ms (experiments/PERF.md)."""
    return _attention_forward(q, k, v)[0]


def _cpu_attention_fwd(q, k, v):
    o, e, l = _attention_forward(q, k, v)
    return o, (q, k, v, o, e, l)


def _cpu_attention_bwd(residuals, do):
    q, k, v, o, e, l = residuals
    dt, f32 = v.dtype, jnp.float32  # products in the inputs' dtype, accumulated in float32
    inv = 1.0 / l[..., None]
    do32 = do.astype(f32)
    dv = _matmul(e.astype(dt), (do32 * inv).astype(dt), transpose_a=True)
    dp = _matmul(do, v, transpose_b=True)
    ds = (e * inv * (dp - jnp.sum(do32 * o.astype(f32), -1, keepdims=True))).astype(dt)
    dq = _matmul(ds, k)
    dk = _matmul(ds, q, transpose_a=True)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_cpu_attention.defvjp(_cpu_attention_fwd, _cpu_attention_bwd)


class Attention(layers.ZooModule, kw_only=True):
    num_heads: int

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        qkv = self.dense((3, self.num_heads, d // self.num_heads),
                         axes=("embed", None, "heads", "kv"), name="qkv")(x)
        out = fused_attention(qkv)
        return self.dense(d, in_axes=(-2, -1), axes=("heads", "kv", "embed"), name="proj")(out)


class Block(layers.ZooModule, kw_only=True):
    num_heads: int
    mlp_ratio: float = 4.0
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = Attention(num_heads=self.num_heads, name="attn", **kw)(self.layer_norm("norm1")(x))
        x = x + layers.drop_path(y, self.drop_path_rate, train)
        y = layers.Mlp(hidden=int(x.shape[-1] * self.mlp_ratio), drop_rate=self.drop_rate, name="mlp",
                **kw)(self.layer_norm("norm2")(x), train)
        return x + layers.drop_path(y, self.drop_path_rate, train)


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
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
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
        x = conv.add_across_batch(jnp.concatenate([jnp.broadcast_to(t, (b, 1, d)).astype(self.dtype) for t in prefix]
                                                  + [x.reshape(b, gh * gw, d)], axis=1), pos.astype(self.dtype))
        x = nn.Dropout(self.drop_rate)(x, deterministic=not train)
        blocks = [functools.partial(Block, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                                    drop_rate=self.drop_rate,
                                    drop_path_rate=self.drop_path_rate * i / max(self.depth - 1, 1),
                                    **kw)
                  for i in range(self.depth)]
        x = layers.Sequential(blocks, name="blocks")(x, train)
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
