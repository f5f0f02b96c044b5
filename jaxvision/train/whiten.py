"""Data-dependent initialisation of a network's first convolution: filters that whiten the patches
of the training images (`config.model.whiten`).

The CIFAR speed recipes (Page's "How to train your ResNet", hlb-CIFAR10, airbench) start from a
first layer whose outputs on the data are decorrelated with unit variance: its filters are the
principal directions of the images' k x k patches, each divided by the square root of its
variance. With more output channels than patch dimensions the negated filters follow (a ReLU or
GELU after it then keeps both signs); channels beyond those keep their random initialisation.
"""

from __future__ import annotations

import numpy as np

MAX_PATCHES = 200_000  # enough for a d <= 300 covariance; bounds memory on large images


def patches(images: np.ndarray, kh: int, kw: int, rng: np.random.Generator) -> np.ndarray:
    """float64 (n, kh * kw * C): every kh x kw patch of the (N, H, W, C) images (up to
    MAX_PATCHES of them, drawn at random), flattened in the kernel's (kh, kw, C) order."""
    windows = np.lib.stride_tricks.sliding_window_view(images, (kh, kw), axis=(1, 2))  # N, H', W', C, kh, kw
    windows = windows.transpose(0, 1, 2, 4, 5, 3).reshape(-1, kh * kw * images.shape[-1])
    if len(windows) > MAX_PATCHES:
        windows = windows[rng.choice(len(windows), MAX_PATCHES, replace=False)]
    return windows.astype(np.float64)


def whitening_kernel(images: np.ndarray, kh: int, kw: int, channels: int, eps: float = 5e-4,
                     seed: int = 0) -> np.ndarray:
    """float32 (kh, kw, C, min(channels, 2d)), d = kh * kw * C: the top principal directions of
    the images' patches over the square roots of their variances (+ `eps`), then their negations."""
    x = patches(np.asarray(images, np.float64), kh, kw, np.random.default_rng(seed))
    x -= x.mean(0)
    variances, directions = np.linalg.eigh(x.T @ x / len(x))
    order = np.argsort(variances)[::-1]
    filters = directions[:, order] / np.sqrt(variances[order] + eps)
    filters = np.concatenate([filters, -filters], axis=1)[:, :channels]
    return filters.reshape(kh, kw, images.shape[-1], -1).astype(np.float32)


def first_conv(params, channels: int = 3) -> tuple[str, ...]:
    """Path of the convolution that sees the image: the 4-D `kernel` taking `channels` inputs
    (the first such in key order; the parameter trees jit returns have their keys sorted, so
    creation order is lost)."""
    for name, value in sorted(params.items()):
        if hasattr(value, "items"):
            found = first_conv(value, channels)
            if found:
                return (name,) + found
        elif name == "kernel" and np.ndim(value) == 4 and np.shape(value)[2] == channels:
            return (name,)
    return ()


def sample(source, transform, count: int, mean, std, seed: int = 0) -> np.ndarray:
    """float32 NHWC: `count` images of `source` drawn with `seed`, through the evaluation
    `transform` (resized and cropped as the model sees them), standardised with (mean, std)."""
    picks = np.random.default_rng(seed).choice(len(source), min(count, len(source)), replace=False)
    images = np.stack([transform(source[int(i)])["image"] for i in picks]).astype(np.float32) / 255.0
    return (images - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
