"""The training state: a plain pytree, created directly in its sharded layout."""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxvision.models import util
from jaxvision.parallel import sharding


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema: Any = None  # {"params", "batch_stats"} exponential moving average, when enabled

    def variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats}


def extra_param(shape: tuple, names: tuple) -> nn.LogicallyPartitioned:
    """An abstract extra parameter trained beside the model (e.g. `distill_proj`)."""
    return nn.LogicallyPartitioned(jax.ShapeDtypeStruct(shape, jnp.float32), names)


def boxed_variables(model: nn.Module, image_size: int, seed: int = 0, extra_params=None):
    """Abstract variables with logical axis names, plus any extra parameters."""
    boxed = util.abstract_variables(model, image_size, seed=seed)
    if extra_params:
        boxed = {**boxed, "params": {**boxed["params"], **extra_params}}
    return boxed


def abstract_state(model: nn.Module, tx: optax.GradientTransformation, image_size: int,
                   mesh: Mesh, fsdp_min_size: int, seed: int = 0, ema: bool = False,
                   extra_params: dict | None = None):
    """(init function, abstract state, state shardings) without allocating anything.
    `extra_params` ({name: {leaf: extra_param(...)}}) are initialised LeCun-normal."""
    def init() -> TrainState:
        images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
        variables = nn.meta.unbox(model.init(jax.random.key(seed), images, train=False))
        params, stats = variables["params"], variables.get("batch_stats", {})
        if extra_params:
            key = jax.random.key(seed + 1)
            params = {**params, **jax.tree_util.tree_map(
                lambda box: nn.initializers.lecun_normal()(key, box.value.shape), extra_params,
                is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))}
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                          opt_state=tx.init(params),
                          ema={"params": params, "batch_stats": stats} if ema else None)

    boxed = boxed_variables(model, image_size, seed, extra_params)
    shapes = jax.eval_shape(init)
    param_sh = sharding.variable_shardings(boxed["params"], mesh, fsdp_min_size)
    replicated = NamedSharding(mesh, P())
    shardings = TrainState(
        step=replicated, params=param_sh,
        batch_stats=jax.tree_util.tree_map(lambda _: replicated, shapes.batch_stats),
        opt_state=sharding.follow_params(shapes.opt_state, shapes.params, param_sh, mesh),
        ema=sharding.follow_params(shapes.ema, shapes.params, param_sh, mesh))
    return init, shapes, shardings


def create_state(model, tx, image_size: int, mesh: Mesh, fsdp_min_size: int, seed: int = 0,
                 ema: bool = False, extra_params: dict | None = None):
    """A freshly initialised state, each array created on the devices that own it."""
    init, shapes, shardings = abstract_state(model, tx, image_size, mesh, fsdp_min_size, seed, ema,
                                             extra_params)
    return jax.jit(init, out_shardings=shardings)(), shardings
