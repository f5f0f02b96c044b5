"""The pure step functions `(state, batch) -> (state, metrics)` and `(variables, batch) -> sums`.

Images arrive as uint8 and are normalised here, on the device. Randomness (dropout, stochastic
depth) comes from `fold_in(key(seed), step)`, so a resumed run draws exactly what an uninterrupted
one would have and the state carries no key.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxvision.train import losses
from jaxvision.train.state import TrainState


def normalize(images, mean: Sequence[float], std: Sequence[float]):
    """uint8 NHWC -> float32 standardised with the model card's statistics."""
    x = images.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, *, num_classes: int,
                    mean, std, label_smoothing: float = 0.0, seed: int = 0):
    def train_step(state: TrainState, batch: dict):
        rng = jax.random.fold_in(jax.random.key(seed), state.step)
        images = normalize(batch["image"], mean, std)
        targets = losses.soft_targets(batch["label"], num_classes, label_smoothing)

        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats}, images, train=True,
                mutable=["batch_stats"], rngs={"dropout": rng})
            return losses.cross_entropy(logits, targets).mean(), (logits, updates)

        (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        tx_updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(
            step=state.step + 1, params=optax.apply_updates(state.params, tx_updates),
            batch_stats=updates.get("batch_stats", state.batch_stats), opt_state=opt_state)
        metrics = {"loss": loss, "train_top1": losses.topk_correct(logits, batch["label"], 1).mean(),
                   "grad_norm": optax.tree.norm(grads)}
        return new_state, metrics

    return train_step


def make_eval_step(model: nn.Module, *, num_classes: int, mean, std):
    def eval_step(variables: dict, batch: dict):
        logits = model.apply(variables, normalize(batch["image"], mean, std), train=False)
        mask, labels = batch["mask"], batch["label"]
        loss = losses.cross_entropy(logits, jax.nn.one_hot(labels, num_classes))
        return {"loss": jnp.sum(loss * mask), "count": jnp.sum(mask),
                "top1": jnp.sum(losses.topk_correct(logits, labels, 1) * mask),
                "top5": jnp.sum(losses.topk_correct(logits, labels, 5) * mask)}

    return eval_step
