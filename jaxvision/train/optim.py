"""Optimizers and schedules from the config, built from Optax pieces.

`config.optim` fields: name (sgd, adamw, lamb, lars, adafactor), lr, schedule (cosine, linear,
step, constant), warmup_steps, min_lr_ratio, step_boundaries / step_factor, momentum, nesterov,
b1, b2, weight_decay, grad_clip (global norm, 0 = off), accumulate (gradient accumulation steps).
"""

from __future__ import annotations

from typing import Callable

import jax
import optax

from jaxvision.errors import UserError

OPTIMIZERS = ("sgd", "adamw", "lamb", "lars", "adafactor")
SCHEDULES = ("cosine", "linear", "step", "constant")
NO_DECAY_NAMES = ("pos_embed", "cls_token", "dist_token")


def schedule(cfg, total_steps: int) -> Callable[[int], float]:
    """Learning rate per optimizer step: linear warm-up from 0, then the named decay."""
    lr, warmup = float(cfg.lr), int(cfg.get("warmup_steps", 0))
    end = lr * float(cfg.get("min_lr_ratio", 0.0))
    decay_steps = max(total_steps - warmup, 1)
    name = cfg.get("schedule", "cosine")
    if name == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
    elif name == "linear":
        decay = optax.linear_schedule(lr, end, decay_steps)
    elif name == "step":
        bounds = {int(b * decay_steps): float(cfg.get("step_factor", 0.1))
                  for b in cfg.get("step_boundaries", (0.3, 0.6, 0.9))}
        decay = optax.piecewise_constant_schedule(lr, bounds)
    elif name == "constant":
        decay = optax.constant_schedule(lr)
    else:
        raise UserError(f"unknown schedule {name!r}; choose from {', '.join(SCHEDULES)}")
    if warmup <= 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def decay_mask(params):
    """True where weight decay applies: not on 1-D parameters (biases, norm scales) nor on
    position embeddings and class/distillation tokens."""
    def decays(path, leaf):
        names = {getattr(p, "key", None) for p in path}
        return leaf.ndim > 1 and not names & set(NO_DECAY_NAMES)
    return jax.tree_util.tree_map_with_path(decays, params)


def optimizer(cfg, total_steps: int) -> optax.GradientTransformation:
    """The configured optimizer with schedule, decay mask, clipping and accumulation."""
    accumulate = int(cfg.get("accumulate", 1))
    name, lr = cfg.get("name", "sgd"), schedule(cfg, total_steps // accumulate)
    wd = float(cfg.get("weight_decay", 0.0))
    if name == "sgd":
        tx = optax.chain(optax.add_decayed_weights(wd, decay_mask) if wd else optax.identity(),
                         optax.sgd(lr, momentum=cfg.get("momentum", 0.9) or None,
                                   nesterov=bool(cfg.get("nesterov", False))))
    elif name == "adamw":
        tx = optax.adamw(lr, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999), weight_decay=wd,
                         mask=decay_mask)
    elif name == "lamb":
        tx = optax.lamb(lr, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999), weight_decay=wd,
                        mask=decay_mask)
    elif name == "lars":
        tx = optax.lars(lr, weight_decay=wd, weight_decay_mask=decay_mask,
                        trust_ratio_mask=decay_mask, momentum=cfg.get("momentum", 0.9))
    elif name == "adafactor":
        tx = optax.adafactor(lr, weight_decay_rate=wd or None, weight_decay_mask=decay_mask)
    else:
        raise UserError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")
    clip = float(cfg.get("grad_clip", 0.0))
    if clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(clip), tx)
    if accumulate > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accumulate)
    return tx
