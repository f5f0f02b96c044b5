"""Optimizers and schedules from the config, built from Optax pieces.

`config.optim` fields: name (sgd, adamw, lamb, lars, adafactor), lr, schedule (cosine, linear,
step, constant), warmup_steps, min_lr_ratio, step_boundaries / step_factor, momentum, nesterov,
b1, b2, weight_decay, grad_clip (global norm, 0 = off), accumulate (gradient accumulation steps).
"""

from __future__ import annotations

import re
from typing import Callable

import jax
import numpy as np
import optax

from jaxvision.errors import UserError
from jaxvision.models import registry

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
        return getattr(leaf, "ndim", 0) > 1 and not names & set(NO_DECAY_NAMES)
    return jax.tree_util.tree_map_with_path(decays, params)


def optimizer(cfg, total_steps: int, model_name: str | None = None,
              params=None) -> optax.GradientTransformation:
    """The configured optimizer: schedule, decay mask, clipping, then (given the model name and the
    parameter tree, shapes suffice) freezing and layer-wise decay, then accumulation."""
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
    if cfg.get("trainable") or cfg.get("frozen"):
        tx = freeze(tx, trainable_mask(params, cfg.get("trainable", ""), cfg.get("frozen", "")))
    decay = float(cfg.get("layer_decay", 0.0))
    if 0.0 < decay < 1.0:
        tx = optax.chain(tx, scale_by_layer(model_name, params, decay))
    if accumulate > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accumulate)
    return tx


# --- layer-wise learning-rate decay ------------------------------------------------------------

MATCH_PREVIOUS = 99999.0  # a group key ending in this joins the group before it (timm's rule)


def _group_keys(matcher, names: list[str]) -> dict[str, tuple]:
    """timm's `group_with_matcher` keys: a dict {group: regex | [(regex, suffix)]} (ordinal of the
    group, then captured numbers, then the suffix) or a callable; unmatched names sort last."""
    if callable(matcher):
        return {n: tuple(np.atleast_1d(matcher(n)).astype(float)) for n in names}
    compiled = []
    for ordinal, spec in enumerate(matcher.values()):
        for regex, suffix in (spec if isinstance(spec, (list, tuple)) else [(spec, None)]):
            compiled.append((re.compile(regex), (ordinal,), suffix))

    def key(name):
        for regex, prefix, suffix in compiled:
            m = regex.match(name)
            if m:
                return tuple(float(x) for part in (prefix, m.groups(), suffix) if part for x in part)
        return (float("inf"),)
    return {n: key(n) for n in names}


def layer_ids(model_name: str, params) -> dict:
    """Layer id of every parameter, grouped exactly as timm's layer-decay does with the model's
    `group_matcher`: stem 0, one id per block in order, what a matcher marks as "with the previous
    group" (final norms, EfficientNet's head conv) merged, everything unmatched (the classifier)
    last. Parameter paths read like timm's names (`blocks.3.attn.qkv.kernel`)."""
    matcher = registry.create(model_name).group_matcher()
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    names = [".".join(str(getattr(p, "key", p)) for p in path) for path, _ in flat]
    keys = _group_keys(matcher, names)
    ids, lid = {}, -1
    for k in sorted(set(keys.values())):
        if lid < 0 or k[-1] != MATCH_PREVIOUS:
            lid += 1
        ids[k] = lid
    leaves = [ids[keys[n]] for n in names]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), leaves)


def layer_scales(model_name: str, params, decay: float) -> dict:
    """`decay ** (L - 1 - id)` per parameter: the head keeps 1.0, the stem gets the smallest."""
    ids = layer_ids(model_name, params)
    num = max(jax.tree_util.tree_leaves(ids)) + 1
    return jax.tree_util.tree_map(lambda i: decay ** (num - 1 - i), ids)


def scale_by_layer(model_name: str, params, decay: float) -> optax.GradientTransformation:
    """Scale each parameter's update by its layer's factor (works after any optimizer/schedule)."""
    scales = layer_scales(model_name, params, decay)
    labels = jax.tree_util.tree_map(lambda s: f"{s!r}", scales)
    return optax.multi_transform({label: optax.scale(float(label)) for label in
                                  set(jax.tree_util.tree_leaves(labels))}, labels)


# --- freezing ----------------------------------------------------------------------------------

def path_string(path) -> str:
    return "/".join(str(getattr(p, "key", p)) for p in path)


def trainable_mask(params, trainable: str = "", frozen: str = ""):
    """True for parameters that train: matching the `trainable` regex (all if empty) and not the
    `frozen` regex. Paths read like ``layer1/0/conv1/kernel``."""
    def one(path, _):
        p = path_string(path)
        return (not trainable or re.search(trainable, p) is not None) and \
            not (frozen and re.search(frozen, p) is not None)
    return jax.tree_util.tree_map_with_path(one, params)


def freeze(tx: optax.GradientTransformation, mask) -> optax.GradientTransformation:
    """Frozen parameters get zero updates and no optimizer state (optax.multi_transform)."""
    labels = jax.tree_util.tree_map(lambda t: "train" if t else "frozen", mask)
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
