"""The pure step functions `(state, batch) -> (state, metrics)` and `(variables, batch) -> sums`.

Images arrive as uint8 and are normalised here, on the device, then mixed (MixUp/CutMix, shard by
shard). Randomness (mixing, dropout, stochastic depth) comes from `fold_in(key(seed), step)`, so a
resumed run draws exactly what an uninterrupted one would have and the state carries no key.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxvision.data import mix as mix_lib
from jaxvision.train import losses
from jaxvision.train.state import TrainState


DISTILL_KINDS = ("logits", "deit_soft", "deit_hard", "feature")


@dataclasses.dataclass(frozen=True)
class Distill:
    """A frozen teacher in the step. `kind`: "logits" (Hinton KD on the student's logits),
    "deit_soft" / "deit_hard" (on a distilled DeiT's second head: KL with temperature, or
    cross-entropy against the teacher's argmax), "feature" (MSE between the student's pooled
    features, through the learned `distill_proj` when widths differ, and the teacher's)."""

    teacher: nn.Module
    mean: Sequence[float]
    std: Sequence[float]
    image_size: int
    kind: str = "logits"
    temperature: float = 4.0
    w_task: float = 1.0
    w_kd: float = 1.0


@dataclasses.dataclass(frozen=True)
class StepOptions:
    num_classes: int
    mean: Sequence[float]
    std: Sequence[float]
    seed: int = 0
    loss: str = "ce"
    focal_gamma: float = 2.0
    label_smoothing: float = 0.0
    class_weights: Any = None  # (num_classes,) array or None
    mix: mix_lib.MixConfig = mix_lib.MixConfig()
    ema_decay: float = 0.0  # 0: no EMA
    ema_warmup: bool = True
    ema_ramp: float = 0.0  # > 0: the decay grows as decay * (step / total_steps) ** ema_ramp
    ema_sync_every: int = 0  # > 0: lookahead, the weights restart from the average every N steps
    total_steps: int = 0
    keep_stats: Any = None  # tree over batch_stats, True where statistics stay frozen
    distill: Distill | None = None


def to_unit(images):
    """uint8 NHWC -> float32 in [0, 1]."""
    return images.astype(jnp.float32) / 255.0


def standardize(x, mean: Sequence[float], std: Sequence[float]):
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def normalize(images, mean: Sequence[float], std: Sequence[float]):
    """uint8 NHWC -> float32 standardised with the model card's statistics."""
    return standardize(to_unit(images), mean, std)


def teacher_view(x, d: Distill):
    """The teacher's input from the student's (mixed, augmented) pixels in [0, 1]: resized to its
    resolution and standardised with its own statistics. Mixing commutes with this per-channel
    affine map, so the teacher sees exactly the batch the student sees."""
    if x.shape[1] != d.image_size or x.shape[2] != d.image_size:
        x = jax.image.resize(x, (x.shape[0], d.image_size, d.image_size, x.shape[3]), "bilinear")
    return standardize(x, d.mean, d.std)


def ema_decay_at(step, opts: StepOptions):
    """The EMA's decay at `step`: with the usual warm-up min(decay, (1 + t) / (10 + t)) early
    averages are short; a ramp (decay * (t / T) ** ramp, airbench's lookahead uses 3) keeps the
    average nearly off until late in training."""
    t = step.astype(jnp.float32)
    if opts.ema_ramp > 0:
        return opts.ema_decay * jnp.minimum(t / max(opts.total_steps, 1), 1.0) ** opts.ema_ramp
    if not opts.ema_warmup:
        return jnp.asarray(opts.ema_decay, jnp.float32)
    return jnp.minimum(opts.ema_decay, (1.0 + t) / (10.0 + t))


def update_average(state: TrainState, params, stats, opts: StepOptions):
    """(params, batch_stats, ema) after this step's EMA update. With `ema_sync_every`, lookahead
    (Zhang et al. 2019): the average moves only every N steps (and at the last step), and the
    weights then restart from it, so training ends on the averaged weights."""
    new = {"params": params, "batch_stats": stats}
    if opts.ema_decay <= 0:
        return params, stats, state.ema
    rate = 1.0 - ema_decay_at(state.step, opts)  # as a lerp, so what does not train stays bit-exact
    averaged = jax.tree_util.tree_map(lambda n, old: old + rate * (n - old), new, state.ema)
    if not opts.ema_sync_every:
        return params, stats, averaged
    sync = ((state.step + 1) % opts.ema_sync_every == 0) | (state.step + 1 == opts.total_steps)
    ema = jax.tree_util.tree_map(lambda a, old: jnp.where(sync, a, old), averaged, state.ema)
    weights = jax.tree_util.tree_map(lambda a, w: jnp.where(sync, a, w), averaged, new)
    return weights["params"], weights["batch_stats"], ema


def _pre_logits(updates):
    """Pooled features the models `sow` before their head."""
    return updates["intermediates"]["pre_logits"][0]


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, opts: StepOptions, mesh=None):
    """`(state, batch, teacher_variables) -> (state, metrics)`; the teacher's variables (None
    without distillation) are an input, never part of the state: not trained, not checkpointed."""
    loss_fn_per_example = losses.per_example_loss(opts.loss, opts.focal_gamma)
    weights = None if opts.class_weights is None else jnp.asarray(opts.class_weights, jnp.float32)
    d = opts.distill

    def task_loss(logits, targets):
        return losses.weighted_mean(loss_fn_per_example(logits, targets), targets, weights)

    def train_step(state: TrainState, batch: dict, teacher_variables=None):
        rng = jax.random.fold_in(jax.random.key(opts.seed), state.step)
        mix_key, dropout_key = jax.random.split(rng)
        x = to_unit(batch["image"])
        if opts.mix.enabled:
            x, targets = mix_lib.mix(mix_key, x, batch["label"], opts.mix, opts.num_classes, mesh)
        else:
            targets = losses.soft_targets(batch["label"], opts.num_classes, opts.label_smoothing)
        images = standardize(x, opts.mean, opts.std)
        teacher_out = None
        if d is not None:
            teacher_out = d.teacher.apply(teacher_variables, teacher_view(x, d), train=False,
                                          pre_logits=d.kind == "feature")
            teacher_out = jax.lax.stop_gradient(teacher_out)
        mutable = ["batch_stats", "intermediates"] if d is not None and d.kind == "feature" else ["batch_stats"]

        def loss_fn(params):
            out, updates = model.apply(
                {"params": params, "batch_stats": state.batch_stats}, images, train=True,
                mutable=mutable, rngs={"dropout": dropout_key})
            logits = out[0] if isinstance(out, tuple) else out
            loss = task_loss(logits, targets)
            parts = {"task_loss": loss}
            if d is not None:
                if d.kind == "logits":
                    kd = losses.distillation_loss(logits, teacher_out, d.temperature)
                elif d.kind == "deit_soft":
                    kd = losses.distillation_loss(out[1], teacher_out, d.temperature)
                elif d.kind == "deit_hard":
                    hard = jax.nn.one_hot(jnp.argmax(teacher_out, -1), opts.num_classes)
                    kd = losses.cross_entropy(out[1], hard).mean()
                else:
                    feats = _pre_logits(updates).astype(jnp.float32)
                    if "distill_proj" in params:
                        feats = feats @ params["distill_proj"]["kernel"]
                    kd = jnp.mean(jnp.square(feats - teacher_out.astype(jnp.float32)))
                loss = d.w_task * loss + d.w_kd * kd
                parts["kd_loss"] = kd
            return loss, (logits, updates, parts)

        (loss, (logits, updates, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        tx_updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, tx_updates)
        stats = updates.get("batch_stats", state.batch_stats)
        if opts.keep_stats is not None:
            stats = jax.tree_util.tree_map(lambda keep, old, new: old if keep else new,
                                           opts.keep_stats, state.batch_stats, stats)
        params, stats, ema = update_average(state, params, stats, opts)
        new_state = state.replace(step=state.step + 1, params=params, batch_stats=stats,
                                  opt_state=opt_state, ema=ema)
        metrics = {"loss": loss, "train_top1": losses.topk_correct(logits, batch["label"], 1).mean(),
                   "grad_norm": optax.tree.norm(grads), **(parts if d is not None else {})}
        return new_state, metrics

    return train_step


TTA_MODES = ("", "flip", "flip_translate")


def _shift(images, pixels: int):
    """Images moved `pixels` down and right (up and left if negative), edges repeated."""
    h, w = images.shape[1:3]
    if pixels > 0:
        return jnp.pad(images, ((0, 0), (pixels, 0), (pixels, 0), (0, 0)), mode="edge")[:, :h, :w]
    return jnp.pad(images, ((0, 0), (0, -pixels), (0, -pixels), (0, 0)), mode="edge")[:, -pixels:, -pixels:]


def test_time_augmented(apply, mode: str):
    """`apply(variables, images)` with its logits averaged over views of the images (the CIFAR speed
    recipes' test-time augmentation, for any model): "flip", the images and their mirror images;
    "flip_translate", those and each moved by 1/16 of the side towards both diagonal corners
    (six views); "", the images alone. The views go through one vmapped apply."""
    if not mode:
        return apply

    def averaged(variables, images):
        views = [images, images[:, :, ::-1]]
        if mode == "flip_translate":
            step = max(1, images.shape[1] // 16)
            views += [_shift(v, d) for v in views for d in (step, -step)]
        logits = jax.vmap(lambda x: apply(variables, x))(jnp.stack(views))
        return jnp.mean(logits.astype(jnp.float32), axis=0)
    return averaged


def make_eval_step(model: nn.Module, *, num_classes: int, mean, std, confusion: bool = False, tta: str = ""):
    """Sums over the real (masked) examples of a batch; with `confusion`, also the
    (true class, predicted class) count matrix for per-class metrics; `tta` as
    `test_time_augmented`."""
    apply = test_time_augmented(lambda variables, images: model.apply(variables, images, train=False), tta)

    def eval_step(variables: dict, batch: dict):
        logits = apply(variables, normalize(batch["image"], mean, std))
        mask, labels = batch["mask"], batch["label"]
        loss = losses.cross_entropy(logits, jax.nn.one_hot(labels, num_classes))
        out = {"loss": jnp.sum(loss * mask), "count": jnp.sum(mask),
               "top1": jnp.sum(losses.topk_correct(logits, labels, 1) * mask),
               "top5": jnp.sum(losses.topk_correct(logits, labels, 5) * mask)}
        if confusion:
            truth = jax.nn.one_hot(labels, num_classes) * mask[:, None]
            out["confusion"] = truth.T @ jax.nn.one_hot(jnp.argmax(logits, -1), num_classes)
        return out

    return eval_step
