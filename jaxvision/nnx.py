"""The zoo as Flax NNX modules, through flax's Linen-to-NNX bridge: the same parameters as the
Linen models (and timm's weights through `pretrained=`), usable with `nnx.Optimizer`, `nnx.jit`,
`nnx.value_and_grad` and `nnx.state`.

    from flax import nnx
    model = jaxvision.models.create("resnet50.a1_in1k", api="nnx", pretrained=True, num_classes=10)
    optimizer = nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.Param)
    loss, grads = nnx.value_and_grad(lambda m: loss_fn(m(images, train=True), labels))(model)
    optimizer.update(model, grads)  # BatchNorm statistics were updated in place by the call

`train=True` updates BatchNorm statistics and draws dropout and drop-path masks from the model's
own `nnx.Rngs`; the default is inference. Images are NHWC and normalised, as for the Linen models.
"""

from __future__ import annotations

import flax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import bridge


_COLLECTIONS = {nnx.Param: "params", nnx.BatchStat: "batch_stats"}  # NNX variable type -> Linen collection


class Model(nnx.Module):
    """A zoo module (Linen) as an NNX module, its variables held as `nnx.Param` / `nnx.BatchStat`."""

    def __init__(self, module, *, image_size: int, variables: dict | None = None, seed: int = 0):
        images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
        # The zoo's logical-axis metadata would otherwise ask NNX to shard every variable it
        # creates, which needs a mesh; sharding stays the trainer's (or the caller's) business.
        with nnx.use_eager_sharding(False):
            self.linen = bridge.ToNNX(module, rngs=nnx.Rngs(params=seed, dropout=seed + 1)).lazy_init(
                images, train=False)
        if variables is not None:
            self.load(variables)

    def __call__(self, x, train: bool = False, **kwargs):
        with nnx.use_eager_sharding(False):
            if train:
                return self.linen(x, train=True, mutable=["batch_stats"], **kwargs)
            return self.linen(x, train=False, **kwargs)

    def load(self, variables: dict) -> None:
        """Set the Linen layout's `{"params", "batch_stats"}` (e.g. a checkpoint's) in place."""
        variables = flax.linen.meta.unbox(variables)  # as `module.init` returns them, or plain
        flat = {(collection, *path): value for collection, tree in variables.items()
                for path, value in flax.traverse_util.flatten_dict(dict(tree)).items()}
        for path, var in nnx.iter_graph(self.linen):
            collection = _COLLECTIONS.get(type(var))
            if collection and (collection, *path) in flat:
                var.set_value(jnp.asarray(flat[(collection, *path)], var.get_value().dtype))

    def variables(self) -> dict:
        """`{"params", "batch_stats"}` in the Linen layout, for jaxvision's checkpoints and export."""
        out = {"params": {}, "batch_stats": {}}
        for path, var in nnx.iter_graph(self.linen):
            collection = _COLLECTIONS.get(type(var))
            if collection:
                out[collection][tuple(path)] = var.get_value()
        return {k: flax.traverse_util.unflatten_dict(v) for k, v in out.items()}


def create(name: str, **kwargs) -> Model:
    """`jaxvision.models.create(name, api="nnx", **kwargs)`."""
    from jaxvision import models

    return models.create(name, api="nnx", **kwargs)


__all__ = ["Model", "create"]
