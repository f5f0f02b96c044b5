"""MixUp and CutMix as jitted, sharded data transforms with timm's options and semantics.

Differences from the PyTorch reference, on purpose: randomness comes from an explicit PRNG key;
any batch size works (odd included: the middle sample is its own partner); it runs inside the
jitted step; and each device mixes only within its own shard of the batch (the partner of sample
i is the reversed *local* batch), so no image data crosses devices. With ``mode="batch"`` every
shard draws the same lambda, method and box, as one global batch would; ``"pair"`` and ``"elem"``
draw per sample, with shards folding their index into the key.

    images, targets = mix(key, images, labels, MixConfig(mixup_alpha=0.8, cutmix_alpha=1.0), 1000, mesh)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxvision.errors import UserError
from jaxvision.parallel.mesh import BATCH_AXES
from jaxvision.train.losses import soft_targets

MODES = ("batch", "pair", "elem")


@dataclasses.dataclass(frozen=True)
class MixConfig:
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    cutmix_minmax: tuple[float, float] | None = None
    prob: float = 1.0
    switch_prob: float = 0.5
    mode: str = "batch"
    correct_lam: bool = True
    label_smoothing: float = 0.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise UserError(f"mix mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.cutmix_minmax is not None and len(self.cutmix_minmax) != 2:
            raise UserError("cutmix_minmax is (min, max) as fractions of the image side")

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0 or
                                  self.cutmix_minmax is not None)

    @classmethod
    def from_config(cls, cfg, label_smoothing: float = 0.0) -> "MixConfig":
        minmax = tuple(cfg.cutmix_minmax) if cfg.get("cutmix_minmax") else None
        return cls(cfg.mixup_alpha, cfg.cutmix_alpha, minmax, cfg.prob, cfg.switch_prob, cfg.mode,
                   cfg.correct_lam, label_smoothing)


@dataclasses.dataclass
class MixDraw:
    """What was drawn for a (local) batch of n samples: per-sample lambda (after correction),
    whether CutMix was used, and the pasted box [y0, y1) x [x0, x1)."""

    lam: jax.Array
    cutmix: jax.Array
    box: jax.Array  # (n, 4) int32: y0, y1, x0, x1


def _beta(key, alpha: float, shape):
    return jax.random.beta(key, alpha, alpha, shape) if alpha > 0 else jnp.ones(shape)


def draw(key, n: int, height: int, width: int, cfg: MixConfig) -> MixDraw:
    """Sample lambdas, methods and boxes for n samples (one shared draw when mode == "batch")."""
    k = 1 if cfg.mode == "batch" else n
    k_mix, k_cut, k_switch, k_apply, k_box = jax.random.split(key, 5)
    lam_mixup = _beta(k_mix, cfg.mixup_alpha, (k,))
    lam_cutmix = _beta(k_cut, cfg.cutmix_alpha, (k,))
    has_mixup, has_cutmix = cfg.mixup_alpha > 0, cfg.cutmix_alpha > 0 or cfg.cutmix_minmax is not None
    if has_mixup and has_cutmix:
        use_cutmix = jax.random.uniform(k_switch, (k,)) < cfg.switch_prob
    else:
        use_cutmix = jnp.full((k,), has_cutmix)
    lam = jnp.where(use_cutmix, lam_cutmix, lam_mixup)
    apply = jax.random.uniform(k_apply, (k,)) < cfg.prob
    lam = jnp.where(apply, lam, 1.0)
    use_cutmix = use_cutmix & apply
    box = _boxes(k_box, lam, height, width, cfg)
    if cfg.correct_lam or cfg.cutmix_minmax is not None:
        area = (box[:, 1] - box[:, 0]) * (box[:, 3] - box[:, 2])
        lam = jnp.where(use_cutmix, 1.0 - area / (height * width), lam)
    box = jnp.where(use_cutmix[:, None], box, 0)  # no CutMix: an empty box
    if cfg.mode == "pair":  # sample i and its partner n-1-i share one draw
        first = jnp.minimum(jnp.arange(n), n - 1 - jnp.arange(n))
        lam, use_cutmix, box = lam[first], use_cutmix[first], box[first]
    if k == 1:
        lam, use_cutmix, box = (jnp.broadcast_to(a, (n,) + a.shape[1:]) for a in (lam, use_cutmix, box))
    return MixDraw(lam.astype(jnp.float32), use_cutmix, box.astype(jnp.int32))


def _boxes(key, lam, height: int, width: int, cfg: MixConfig):
    """timm's rand_bbox / rand_bbox_minmax, vectorised: (k, 4) as y0, y1, x0, x1."""
    k = lam.shape[0]
    k_y, k_x, k_h, k_w = jax.random.split(key, 4)
    if cfg.cutmix_minmax is not None:
        lo, hi = cfg.cutmix_minmax
        cut_h = jax.random.randint(k_h, (k,), int(height * lo), int(height * hi))
        cut_w = jax.random.randint(k_w, (k,), int(width * lo), int(width * hi))
        y0 = jax.random.randint(k_y, (k,), 0, height - cut_h)
        x0 = jax.random.randint(k_x, (k,), 0, width - cut_w)
        return jnp.stack([y0, y0 + cut_h, x0, x0 + cut_w], axis=1)
    ratio = jnp.sqrt(1.0 - lam)
    cut_h, cut_w = (height * ratio).astype(jnp.int32), (width * ratio).astype(jnp.int32)
    cy = jax.random.randint(k_y, (k,), 0, height)
    cx = jax.random.randint(k_x, (k,), 0, width)
    return jnp.stack([jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height),
                      jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)], axis=1)


def apply(images, one_hot, d: MixDraw):
    """Mix a local batch with its reverse according to a draw; returns (images, targets)."""
    partner, partner_targets = images[::-1], one_hot[::-1]
    n, h, w = images.shape[:3]
    ys, xs = jnp.arange(h)[None, :, None], jnp.arange(w)[None, None, :]
    box = d.box
    inside = ((ys >= box[:, 0, None, None]) & (ys < box[:, 1, None, None]) &
              (xs >= box[:, 2, None, None]) & (xs < box[:, 3, None, None]))[..., None]
    lam = d.lam.reshape(n, 1, 1, 1).astype(images.dtype)
    mixed_up = lam * images + (1 - lam) * partner
    out = jnp.where(d.cutmix.reshape(n, 1, 1, 1), jnp.where(inside, partner, images), mixed_up)
    targets = d.lam[:, None] * one_hot + (1 - d.lam[:, None]) * partner_targets
    return out, targets


def mix_local(key, images, labels, cfg: MixConfig, num_classes: int):
    """Mix one (local) batch: (mixed images, soft targets, draw)."""
    one_hot = soft_targets(labels, num_classes, cfg.label_smoothing)
    d = draw(key, images.shape[0], images.shape[1], images.shape[2], cfg)
    out, targets = apply(images, one_hot, d)
    return out, targets, d


def mix(key, images, labels, cfg: MixConfig, num_classes: int, mesh=None):
    """Mix a global batch shard by shard (`jax.shard_map` over the data-parallel axes of `mesh`),
    so every device pairs samples it already holds. Returns (images, soft targets)."""
    if mesh is None:
        out, targets, _ = mix_local(key, images, labels, cfg, num_classes)
        return out, targets

    def local(key, images, labels):
        if cfg.mode != "batch":
            key = jax.random.fold_in(key, jax.lax.axis_index(BATCH_AXES))
        out, targets, _ = mix_local(key, images, labels, cfg, num_classes)
        return out, targets

    batch = P(BATCH_AXES)
    return jax.shard_map(local, mesh=mesh, in_specs=(P(), batch, batch),
                         out_specs=(batch, batch))(key, images, labels)
