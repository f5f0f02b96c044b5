"""Classification losses and metrics on soft targets; all per example, reduced by the caller."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def soft_targets(labels, num_classes: int, smoothing: float = 0.0):
    """One-hot with label smoothing: off = smoothing / C, on = 1 - smoothing + off."""
    return optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)


def cross_entropy(logits, targets):
    """Softmax cross-entropy against soft targets, per example (float32)."""
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def topk_correct(logits, labels, k: int):
    """1.0 where the label is among the k highest logits."""
    k = min(k, logits.shape[-1])
    _, top = jax.lax.top_k(logits, k)
    return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)
