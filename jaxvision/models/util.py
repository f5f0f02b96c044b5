"""Shape-level helpers: what a model's variables look like, without computing anything."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def abstract_variables(model: nn.Module, image_size: int = 224, batch: int = 1, seed: int = 0):
    """The model's variables as `jax.ShapeDtypeStruct`s with their logical-axis boxes
    (`jax.eval_shape` of `init` in inference mode: nothing is computed)."""
    x = jnp.zeros((batch, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.key(seed), x, train=False))


def init_shapes(model: nn.Module, image_size: int = 224, batch: int = 1):
    """Abstract variables (`jax.ShapeDtypeStruct`, logical-axis boxes removed)."""
    return nn.meta.unbox(abstract_variables(model, image_size, batch))


def output_shapes(model: nn.Module, image_size: int, **apply_kwargs):
    """What `model.apply(variables, images, **apply_kwargs)` returns for a batch of one, as shapes."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(lambda v, x: model.apply(v, x, **apply_kwargs), abstract_variables(model, image_size), x)


def count_params(tree) -> int:
    """Number of scalars in a pytree of arrays or shape structs."""
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
