"""Grad-CAM for the CNN families and attention rollout for ViT (`--mode explain`): where in the
image the evidence for the prediction lies, saved as heatmap overlays.

Grad-CAM (Selvaraju et al. 2017) weights the channels of a late feature map A by the spatial mean
of d logit_c / dA and keeps the positive part of the weighted sum. The feature map is found without
per-family code: the last module call in the forward pass that returns a spatial map (NHWC with
more than one row) — ResNet's last stage, EfficientNet's head convolution, ConvNeXt's last stage.
The gradient with respect to that output is taken by adding a zero perturbation to it through
`nn.intercept_methods`, so the model code stays untouched.

Attention rollout (Abnar & Zuidema 2020) follows attention from the class token back to the
patches: each block's head-averaged attention, mixed half-and-half with the identity for the
residual path and row-normalised, multiplied through the blocks. The attention matrices are
recomputed from each block's `qkv` projection (intercepted), so the ViT keeps its fused attention.
"""

from __future__ import annotations


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxvision import plots
from jaxvision.errors import UserError


def _calls(model, variables, images, *, perturb=None, at: int = -1):
    """Runs the model; returns (logits, [(module path, output shape)] of every spatial output,
    the output at index `at`). With `perturb`, adds it to the output at index `at`."""
    seen, picked = [], {}

    def intercept(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if (context.method_name == "__call__" and isinstance(out, jax.Array | jax.core.Tracer)
                and out.ndim == 4 and out.shape[1] > 1):
            if len(seen) == at:
                picked["a"] = out
                out = out + perturb if perturb is not None else out
            seen.append((context.module.path, out.shape))
        return out

    with nn.intercept_methods(intercept):
        logits = model.apply(variables, images, train=False)
    return logits, seen, picked.get("a")


def target_layer(model, variables, image_shape) -> tuple[int, tuple, tuple]:
    """(index among spatial outputs, module path, shape) of the last spatial feature map."""
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    seen, ranks = [], []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and hasattr(out, "ndim"):
            ranks.append(out.ndim)
        return out

    def run(v, x):
        with nn.intercept_methods(record):
            seen.extend(_calls(model, v, x)[1])

    jax.eval_shape(run, variables, x)
    last_map = max((i for i, r in enumerate(ranks) if r == 4), default=-1)
    if not seen or 3 in ranks[last_map:]:  # token sequences after the last map: a ViT
        raise UserError("this model has no spatial feature map for Grad-CAM; attention rollout "
                        "explains ViT/DeiT models")
    return len(seen) - 1, seen[-1][0], seen[-1][1]


def gradcam(model, variables, images, index: int, classes=None):
    """(heatmaps (B, H, W) in [0, 1] at the input resolution, explained classes, logits)."""
    def target(delta):
        logits, _, a = _calls(model, variables, images, perturb=delta, at=index)
        cls = jnp.argmax(logits, -1) if classes is None else classes
        return jnp.sum(jnp.take_along_axis(logits, cls[:, None], 1)), (a, cls, logits)

    seen = jax.eval_shape(lambda: _calls(model, variables, images, at=index)[2])
    grads, (a, cls, logits) = jax.grad(target, has_aux=True)(jnp.zeros(seen.shape, seen.dtype))
    weights = jnp.mean(grads, axis=(1, 2))  # (B, C)
    cam = jax.nn.relu(jnp.einsum("bhwc,bc->bhw", a.astype(jnp.float32), weights.astype(jnp.float32)))
    cam = cam / jnp.maximum(jnp.max(cam, axis=(1, 2), keepdims=True), 1e-12)
    cam = jax.image.resize(cam, (cam.shape[0], *images.shape[1:3]), "bilinear")
    return jnp.clip(cam, 0, 1), cls, logits


def attention_maps(model, variables, images) -> tuple[list, jax.Array]:
    """(every ViT block's attention probabilities (B, heads, tokens, tokens) in block order,
    logits)."""
    from jaxvision.models import vit

    maps = []

    def intercept(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.module.name == "qkv" and isinstance(context.module.parent, vit.Attention):
            q, k = out[:, :, 0].astype(jnp.float32), out[:, :, 1].astype(jnp.float32)
            maps.append(jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1]), -1))
        return out

    with nn.intercept_methods(intercept):
        logits = model.apply(variables, images, train=False)
    return maps, logits


def rollout(maps, num_prefix: int, grid: tuple[int, int]):
    """(B, gh, gw) in [0, 1]: attention flowing from the prefix (class) tokens to each patch."""
    joint = None
    for a in maps:
        a = a.mean(axis=1)
        a = 0.5 * a + 0.5 * jnp.eye(a.shape[-1])
        a = a / a.sum(-1, keepdims=True)
        joint = a if joint is None else a @ joint
    heat = joint[:, :num_prefix, num_prefix:].mean(axis=1).reshape(-1, *grid)
    return heat / jnp.maximum(jnp.max(heat, axis=(1, 2), keepdims=True), 1e-12)


def attention_rollout(model, variables, images):
    """(heatmaps (B, H, W) in [0, 1] at the input resolution, predicted classes, logits)."""
    maps, logits = attention_maps(model, variables, images)
    grid = (images.shape[1] // model.patch_size, images.shape[2] // model.patch_size)
    heat = jax.image.resize(rollout(maps, model.num_prefix, grid), (images.shape[0], *images.shape[1:3]),
                            "bilinear")
    return jnp.clip(heat, 0, 1), jnp.argmax(logits, -1), logits


def save_overlay(image: np.ndarray, heatmap: np.ndarray, path: str, title: str) -> str:
    """The image (uint8 HWC), the heatmap over it (jet, half transparent), side by side."""
    plt = plots.pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(6, 3.3))
    for ax in axes:
        ax.imshow(image, interpolation="bilinear")
        ax.axis("off")
    axes[1].imshow(heatmap, cmap="jet", alpha=0.5, vmin=0, vmax=1, interpolation="bilinear")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return plots.save(fig, path)
