"""The zoo as Flax NNX modules (`models.create(name, api="nnx")`): the Linen model's parameters,
and the same losses when trained with `nnx.Optimizer` under `nnx.jit`."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxvision import models
from jaxvision.errors import UserError


def _batch(size: int):
    rng = np.random.RandomState(0)
    return jnp.asarray(rng.randn(8, size, size, 3), jnp.float32), jnp.asarray(rng.randint(0, 10, 8))


def _linen_losses(module, variables, x, y, tx, steps: int):
    def loss_fn(params, stats):
        logits, updates = module.apply({"params": params, "batch_stats": stats}, x, train=True,
                                       mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates["batch_stats"]

    @jax.jit
    def step(params, stats, opt_state):
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    params, stats = variables["params"], variables.get("batch_stats", {})
    opt_state, losses = tx.init(params), []
    for _ in range(steps):
        params, stats, opt_state, loss = step(params, stats, opt_state)
        losses.append(float(loss))
    return losses, params


@pytest.mark.parametrize("name, kwargs, size", [("resnet18", {"stem": "3x3", "width": 16}, 16),
                                                ("vit_tiny_patch16_224", {"img_size": 32}, 32)])
def test_three_nnx_steps_give_the_linen_models_losses(name, kwargs, size):
    x, y = _batch(size)
    module = models.create(name, num_classes=10, **kwargs)
    variables = nn.meta.unbox(jax.jit(module.init)(jax.random.key(0), x[:1]))
    tx = optax.sgd(0.1, momentum=0.9)
    want, want_params = _linen_losses(module, variables, x, y, tx, 3)

    model = models.create(name, api="nnx", num_classes=10, **kwargs)
    assert isinstance(model, nnx.Module)
    model.load(variables)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(
            lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x, train=True), y).mean())(model)
        optimizer.update(model, grads)
        return loss

    got = [float(step(model, optimizer)) for _ in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert got[2] < got[0]
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                           model.variables()["params"], want_params)
    logits = model(x)  # inference: running statistics, nothing updated
    np.testing.assert_allclose(logits, module.apply(model.variables(), x), rtol=1e-5, atol=1e-5)


def test_an_unknown_api_is_one_line():
    with pytest.raises(UserError, match="api must be linen or nnx"):
        models.create("resnet18", api="haiku")
