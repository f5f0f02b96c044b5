"""The training state: a plain pytree, created directly in its sharded layout."""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxvision.parallel import sharding


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any

    def variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats}


def _init_variables(model: nn.Module, image_size: int, seed: int):
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    return model.init(jax.random.key(seed), images, train=False)


def abstract_state(model: nn.Module, tx: optax.GradientTransformation, image_size: int,
                   mesh: Mesh, fsdp_min_size: int, seed: int = 0):
    """(init function, abstract state, state shardings) without allocating anything."""
    def init() -> TrainState:
        variables = nn.meta.unbox(_init_variables(model, image_size, seed))
        params = variables["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))

    boxed = jax.eval_shape(lambda: _init_variables(model, image_size, seed))
    shapes = jax.eval_shape(init)
    param_sh = sharding.variable_shardings(boxed["params"], mesh, fsdp_min_size)
    replicated = NamedSharding(mesh, P())
    shardings = TrainState(
        step=replicated, params=param_sh,
        batch_stats=jax.tree_util.tree_map(lambda _: replicated, shapes.batch_stats),
        opt_state=sharding.follow_params(shapes.opt_state, shapes.params, param_sh, mesh))
    return init, shapes, shardings


def create_state(model, tx, image_size: int, mesh: Mesh, fsdp_min_size: int, seed: int = 0):
    """A freshly initialised state, each array created on the devices that own it."""
    init, shapes, shardings = abstract_state(model, tx, image_size, mesh, fsdp_min_size, seed)
    return jax.jit(init, out_shardings=shardings)(), shardings
