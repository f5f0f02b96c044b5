"""Classification losses and metrics on soft targets; all per example, reduced by the caller."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxvision.errors import UserError


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


def binary_cross_entropy(logits, targets):
    """Sigmoid BCE per class against (soft) targets, averaged over classes (timm's BCE loss)."""
    return optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), targets).mean(axis=-1)


def focal_loss(logits, targets, gamma: float = 2.0):
    """Softmax focal loss (Lin et al. 2017) on soft targets: -sum_c t_c (1 - p_c)^gamma log p_c;
    gamma = 0 is cross-entropy."""
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.sum(targets * (1.0 - jnp.exp(log_p)) ** gamma * log_p, axis=-1)


LOSSES = ("ce", "bce", "focal")


def per_example_loss(name: str, focal_gamma: float = 2.0):
    """The configured loss as `fn(logits, targets) -> (batch,)`."""
    if name == "ce":
        return cross_entropy
    if name == "bce":
        return binary_cross_entropy
    if name == "focal":
        return lambda logits, targets: focal_loss(logits, targets, focal_gamma)
    raise UserError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")


def weighted_mean(per_example, targets, class_weights=None):
    """Mean loss; with class weights, each example counts by its target's weight and the sum is
    normalised by the total weight (PyTorch's CrossEntropyLoss(weight=...) convention)."""
    if class_weights is None:
        return per_example.mean()
    w = targets @ class_weights
    return jnp.sum(per_example * w) / jnp.maximum(jnp.sum(w), 1e-12)


def distillation_loss(student_logits, teacher_logits, temperature: float):
    """Hinton et al. (2015): T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over
    the batch. The T^2 keeps gradient magnitudes comparable across temperatures; the gradient with
    respect to the student logits is T * (softmax(s / T) - softmax(t / T)) / batch."""
    t = temperature
    log_p_teacher = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t)
    log_p_student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t)
    kl = jnp.sum(jnp.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1)
    return t * t * jnp.mean(kl)
