"""Shape-level helpers: what a model's variables look like, without computing anything."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def init_shapes(model: nn.Module, image_size: int = 224, batch: int = 1):
    """Abstract variables (`jax.ShapeDtypeStruct`, logical-axis boxes removed) via `jax.eval_shape`."""
    x = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape, x.dtype)))
    return nn.meta.unbox(boxed)


def count_params(tree) -> int:
    """Number of scalars in a pytree of arrays or shape structs."""
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
