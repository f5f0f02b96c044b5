"""The seam between the zoo and a platform: the operations a backend may implement its own way.

Every zoo module reaches its convolutions, dense layers, LayerNorms, attention, pooling, GELU and
embedding additions through its `ops` field (`layers.ZooModule.ops`), passed from parent to child
like `dtype`. `Ops` is a frozen dataclass, so it is a static, hashable part of the model: jit keys
on it, and two models that differ only in their ops are traced separately. Nothing here reads
process-wide state while tracing.

`Ops()` is the portable default that GPU and TPU users get, and what export uses: flax's Conv,
DenseGeneral and LayerNorm, `reduce_window` pooling with autodiff's gradients, exact GELU, and
`jax.nn.dot_product_attention`. Its options stay portable:
  cudnn_attention  cuDNN's fused attention where it applies (half precision, head size a
                   multiple of 8 up to 128, cuDNN present while tracing), XLA's elsewhere
  pool_by_views    pooling as the maximum or sum of the k*k shifted strided views (`windows`):
                   plain slices every exporter translates exactly (jax2onnx 0.17 drops
                   `reduce_window`'s padding and emits a MaxPool onnxruntime rejects)
A platform's own implementations subclass `Ops` (`jaxvision.backends.cpu`);
`jaxvision.backends.ops_for` picks them for a compile target.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

log = logging.getLogger("jaxvision")


@dataclasses.dataclass(frozen=True)
class Ops:
    cudnn_attention: bool = False
    pool_by_views: bool = False
    # Where activations go on the trainer's mesh: logical names (batch, length, embed, mlp, heads)
    # to mesh axes (`parallel.sharding.ACTIVATION_RULES`); without a mesh, `constrain` does nothing.
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None
    activation_rules: tuple = ()

    def describe(self) -> str:
        """One line for logs and summaries: what these ops run on."""
        return "portable (XLA's own ops" + (", cuDNN attention where it applies)" if self.cudnn_attention else ")")

    def constrain(self, x, names: tuple):
        """`x` laid out over the mesh as the activation rules map its logical axis `names` (an
        axis that does not divide evenly stays whole)."""
        if self.mesh is None:
            return x
        rules, spec = dict(self.activation_rules), []
        for size, name in zip(x.shape, names):
            axes = rules.get(name)
            ways = math.prod(self.mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))
            spec.append(axes if axes and ways > 1 and size % ways == 0 else None)
        return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(*spec)))

    # Layers with parameters: module factories, so a backend may bring its own module with the
    # same parameter names.
    def conv(self, features: int, kernel_size: tuple[int, int], **kwargs) -> nn.Module:
        return nn.Conv(features, kernel_size, **kwargs)

    def dense(self, features, **kwargs) -> nn.Module:
        return nn.DenseGeneral(features, **kwargs)

    def layer_norm(self, **kwargs) -> nn.Module:
        return nn.LayerNorm(**kwargs)

    # Parameter-free operations on NHWC maps and token sequences.
    def max_pool(self, x, window: tuple[int, int], stride: tuple[int, int], padding=((0, 0), (0, 0))):
        """Max pooling with explicit (PyTorch) padding; the padding never wins a maximum."""
        if self.pool_by_views:
            return functools.reduce(jnp.maximum, (v for _, _, v in windows(x, window, stride, padding, -jnp.inf)))
        return nn.max_pool(x, window, strides=stride, padding=tuple(map(tuple, padding)))

    def avg_pool(self, x, window: tuple[int, int], stride: tuple[int, int], padding=((0, 0), (0, 0)),
                 count_include_pad: bool = True):
        if not self.pool_by_views:
            return nn.avg_pool(x, window, strides=stride, padding=tuple(map(tuple, padding)),
                               count_include_pad=count_include_pad)
        total = sum(v for _, _, v in windows(x, window, stride, padding))
        if count_include_pad:
            return total / math.prod(window)
        count = sum(v for _, _, v in windows(jnp.ones((1, *x.shape[1:3], 1), jnp.float32), window, stride, padding))
        return total / count.astype(x.dtype)

    def gelu(self, x):
        """Exact (erf) GELU, as timm's models use."""
        return nn.gelu(x, approximate=False)

    def add_embedding(self, x, embedding):
        """x + an embedding of shape (1, *x.shape[1:]) shared by the batch (ViT's positions)."""
        return x + embedding

    def attention(self, qkv):
        """softmax(q k^T / sqrt(d)) v for a fused projection's (batch, tokens, 3, heads, head_dim)
        output, as (batch, tokens, heads, head_dim)."""
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.cudnn_attention and _cudnn_applies(q):
            try:
                return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
            except RuntimeError as e:  # no cuDNN where this is traced (lowering for cuda elsewhere)
                _note_once(f"jaxvision: XLA's attention instead of cuDNN's: {e}")
        return jax.nn.dot_product_attention(q, k, v)


def output_size(size, kernel, strides, pads) -> tuple[int, int]:
    """(out_h, out_w) of a window of `kernel` sliding by `strides` over `size` padded by `pads`."""
    return tuple((n + lo + hi - k) // s + 1 for n, k, s, (lo, hi) in zip(size, kernel, strides, pads))


def windows(x, kernel, strides, pads, fill=0.0):
    """Yields (i, j, view): the NHWC input (padded with `fill`) seen by kernel tap (i, j), for
    every output position. Taps that see only padding are left out (on tiny maps most do):
    they add nothing to a sum, a convolution or a max."""
    pads = [tuple(p) for p in pads]
    size = x.shape[1:3]
    (sh, sw), (kh, kw) = strides, kernel
    out_h, out_w = output_size(size, kernel, strides, pads)
    x = jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=fill)

    def real(tap, stride, out, lo, n):  # (an empty output, as in shape-only tracing, keeps all)
        return out <= 0 or any(lo <= tap + stride * o < lo + n for o in range(out))

    for i in range(kh):
        for j in range(kw):
            if real(i, sh, out_h, pads[0][0], size[0]) and real(j, sw, out_w, pads[1][0], size[1]):
                yield i, j, x[:, i:i + (out_h - 1) * sh + 1:sh, j:j + (out_w - 1) * sw + 1:sw, :]


def _cudnn_applies(q) -> bool:
    """cuDNN's fused attention takes half-precision inputs with a head size that is a multiple of
    8, up to 128 (jax.nn.dot_product_attention's checks)."""
    d = q.shape[-1]
    return q.dtype in (jnp.float16, jnp.bfloat16) and d % 8 == 0 and d <= 128


@functools.cache
def _note_once(message: str) -> None:
    log.warning(message)


PORTABLE = Ops()
