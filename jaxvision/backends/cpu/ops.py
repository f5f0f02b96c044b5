"""`CpuOps`: the zoo's layers on XLA:CPU, with oneDNN's kernels when `native`.

Chosen by `jaxvision.backends.ops_for` for computations compiled for CPU when the `cpu` extra is
installed; `native` only on one-device meshes, since XLA does not partition the kernels' custom
calls. Every op computes what `Ops()` computes, up to float rounding (Winograd's transforms round
to 1e-5 of the output's magnitude); they are faster on XLA:CPU, as measured in
docs/performance.md and experiments/results/.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn

from jaxvision.backends.cpu import attention, conv, layers, native as native_lib
from jaxvision.models.ops import Ops


@dataclasses.dataclass(frozen=True)
class CpuOps(Ops):
    native: bool = True  # oneDNN's kernels (jaxvision.backends.cpu.native)
    pool_by_views: bool = True  # average pooling as a fused sum of views; max pooling: layers.max_pool

    def __post_init__(self):
        if self.native:
            native_lib.library()  # builds and registers the kernels' FFI targets before any trace

    def describe(self) -> str:
        kernels = native_lib.info() if self.native else "XLA's kernels"
        return f"cpu backend: {kernels} with jaxvision's XLA:CPU rewrites"

    def conv_general_dilated(self, *args, **kwargs):
        return conv.conv_general_dilated(*args, native=self.native, **kwargs)

    def dot_general(self, *args, **kwargs):
        return conv.dot_general(*args, native=self.native, **kwargs)

    def conv(self, features, kernel_size, **kwargs) -> nn.Module:
        return nn.Conv(features, kernel_size, conv_general_dilated=self.conv_general_dilated, **kwargs)

    def dense(self, features, **kwargs) -> nn.Module:
        return layers.Dense(features, dot_general=self.dot_general, **kwargs)

    def layer_norm(self, **kwargs) -> nn.Module:
        return layers.LayerNorm(native=self.native, **kwargs)

    def max_pool(self, x, window, stride, padding=((0, 0), (0, 0))):
        return layers.max_pool(x, window, stride, padding)

    def gelu(self, x):
        return layers.gelu(x)

    def add_embedding(self, x, embedding):
        return conv.add_across_batch(x, embedding)

    def attention(self, qkv):
        return attention.fused_attention(qkv, self.native)
