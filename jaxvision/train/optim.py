"""Optimizers and schedules from the config, built from Optax pieces.

`config.optim.name` is any optax optimizer (sgd, adamw, lamb, lars, adafactor, lion, ...); it gets
the schedule as its learning rate and, by name, the fields of `config.optim` it takes: b1, b2,
momentum with nesterov (where it takes both: sgd, lars, rmsprop), weight decay with its mask, and
anything in `optim.kwargs`. An optimizer without weight decay of its own is chained after optax's
`add_decayed_weights`. Then: schedule (cosine, linear, step, constant) with warm-up, grad_clip
(global norm, 0 = off), freezing, layer-wise decay, learning-rate and weight-decay multipliers by
parameter path (lr_mults, wd_mults), accumulate (gradient accumulation steps).
"""

from __future__ import annotations

import inspect
import re
from typing import Callable

import jax
import numpy as np
import optax

from jaxvision.errors import UserError
from jaxvision.models import registry

OPTIMIZERS = ("sgd", "adamw", "lamb", "lars", "adafactor", "lion", "adam", "nadamw", "rmsprop", "adabelief")
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
    tx = by_name(cfg, schedule(cfg, total_steps // accumulate))
    clip = float(cfg.get("grad_clip", 0.0))
    if clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(clip), tx)
    if cfg.get("trainable") or cfg.get("frozen"):
        tx = freeze(tx, trainable_mask(params, cfg.get("trainable", ""), cfg.get("frozen", "")))
    decay = float(cfg.get("layer_decay", 0.0))
    if 0.0 < decay < 1.0:
        tx = optax.chain(tx, scale_each(layer_scales(model_name, params, decay)))
    if cfg.get("lr_mults"):
        tx = optax.chain(tx, scale_each(lr_multipliers(params, cfg.get("lr_mults"))))
    if accumulate > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accumulate)
    return tx


def by_name(cfg, learning_rate) -> optax.GradientTransformation:
    """The optax optimizer `cfg.name` with the config's arguments it takes (module docstring)."""
    make = getattr(optax, cfg.get("name", "sgd"), None)
    params = inspect.signature(make).parameters if callable(make) else {}
    if "learning_rate" not in params:
        raise UserError(f"config.optim.name must be an optax optimizer such as {', '.join(OPTIMIZERS)}, "
                        f"not {cfg.get('name')!r}")
    args = {k: cfg.get(k) for k in ("b1", "b2") if k in params and k in cfg}
    if "momentum" in params and "nesterov" in params:
        args.update(momentum=cfg.get("momentum", 0.9), nesterov=bool(cfg.get("nesterov", False)))
    wd = float(cfg.get("weight_decay", 0.0))
    mults = tuple(cfg.get("wd_mults", ()))
    decay = next((k for k in ("weight_decay", "weight_decay_rate") if k in params), None)
    if decay:
        if any(float(f) not in (0.0, 1.0) for _, f in mults):
            raise UserError(f"config.optim.wd_mults: {cfg.get('name')} decays weights itself, so factors can only "
                            "be 0 or 1 (a mask); other factors need an optimizer such as sgd")
        mask = (lambda p: jax.tree_util.tree_map(bool, wd_multipliers(p, mults))) if mults else decay_mask
        args[decay] = wd if decay == "weight_decay" else (wd or None)
        args.update({k: mask for k in ("mask", "weight_decay_mask", "trust_ratio_mask") if k in params})
    args.update(dict(cfg.get("kwargs", {})))
    tx = make(learning_rate, **args)
    return optax.chain(decayed_weights(wd, mults), tx) if wd and not decay else tx


def wd_multipliers(params, mults) -> dict:
    """Per parameter, the factor of the first (regex, factor) pair in `mults` whose regex matches
    its path (big_vision's `wd_mults`; unmatched parameters are not decayed), or with no pairs
    `decay_mask`'s 1 or 0."""
    if not mults:
        return jax.tree_util.tree_map(float, decay_mask(params))
    return lr_multipliers(params, tuple(mults) + ((".*", 0.0),))


def decayed_weights(wd: float, mults=()) -> optax.GradientTransformation:
    """optax.add_decayed_weights with each parameter's decay times its `wd_multipliers` factor."""
    def update(updates, state, params):
        factors = wd_multipliers(params, mults)
        return jax.tree_util.tree_map(lambda g, p, f: g + wd * f * p if f else g, updates, params, factors), state
    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


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
    if "blocks" in params and "0" not in params["blocks"]:
        raise UserError("optim.layer_decay needs one parameter per block: set model.kwargs.scan_blocks=false "
                        "(scanned blocks share stacked arrays)")
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


def scale_each(scales) -> optax.GradientTransformation:
    """Scale each parameter's update by its factor in `scales` (a tree like the parameters); works
    after any optimizer and schedule."""
    labels = jax.tree_util.tree_map(lambda s: f"{s!r}", scales)
    return optax.multi_transform({label: optax.scale(float(label)) for label in
                                  set(jax.tree_util.tree_leaves(labels))}, labels)


def lr_multipliers(params, mults) -> dict:
    """Per parameter, the factor of the first (regex, factor) pair in `mults` whose regex matches
    its path (``groups_0/norm1/bias``; big_vision's `lr_mults`), else 1."""
    rules = [(re.compile(regex), float(factor)) for regex, factor in mults]

    def one(path, _):
        p = path_string(path)
        return next((f for regex, f in rules if regex.search(p)), 1.0)
    return jax.tree_util.tree_map_with_path(one, params)


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
