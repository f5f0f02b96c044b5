"""Evaluation over a whole split, per-class metrics and the confusion-matrix plot."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxvision import plots
from jaxvision.data import pipeline
from jaxvision.parallel import mesh as mesh_lib


def run(eval_step, variables, source, transform, mesh, batch_size: int, threads: int = 4,
        workers: int = 0, prefix: str = "val_") -> tuple[dict, np.ndarray | None]:
    """Loss, top-1 and top-5 over the split's readable examples (each exactly once), how many
    were unreadable and left out (`unreadable`, when any), and the confusion matrix when the step
    computes one."""
    local = mesh_lib.check_batch(batch_size, mesh)
    host = pipeline.eval_batches(source, transform, batch_size=local, threads=threads, workers=workers)
    sums = None
    with contextlib.closing(pipeline.on_mesh(host, mesh)) as batches:
        for batch in tqdm(batches, desc="eval", unit="batch", leave=False,
                          total=pipeline.num_eval_batches(len(source), local),
                          disable=jax.process_index() != 0, dynamic_ncols=True):
            out = eval_step(variables, batch)
            sums = out if sums is None else jax.tree_util.tree_map(jnp.add, sums, out)
    sums = jax.device_get(sums)
    n = max(float(sums["count"]), 1.0)
    metrics = {f"{prefix}loss": float(sums["loss"]) / n, f"{prefix}top1": float(sums["top1"]) / n,
               f"{prefix}top5": float(sums["top5"]) / n}
    if len(source) > int(sums["count"]):
        metrics[f"{prefix}unreadable"] = float(len(source) - int(sums["count"]))
    confusion = sums.get("confusion")
    if confusion is not None:
        metrics[f"{prefix}balanced_top1"] = balanced_accuracy(confusion)
    return metrics, confusion


def per_class_accuracy(confusion: np.ndarray) -> np.ndarray:
    """Recall of each class (NaN for classes absent from the split)."""
    totals = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.diag(confusion) / totals


def balanced_accuracy(confusion: np.ndarray) -> float:
    """Mean per-class recall over the classes present."""
    return float(np.nanmean(per_class_accuracy(confusion)))


def save_confusion(confusion: np.ndarray, class_names, path: str, title: str = "") -> str:
    """Row-normalised confusion matrix as a PNG (class names on the axes up to 40 classes)."""
    plt = plots.pyplot()

    c = len(class_names)
    rows = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    size = min(max(4.0, 0.45 * c + 2), 20.0)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if c <= 40:
        ax.set_xticks(range(c), class_names, rotation=90)
        ax.set_yticks(range(c), class_names)
        if c <= 20:
            for i in range(c):
                for j in range(c):
                    if confusion[i, j]:
                        ax.text(j, i, int(confusion[i, j]), ha="center", va="center", fontsize=7,
                                color="white" if rows[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    fig.tight_layout()
    return plots.save(fig, path)


def collect_logits(logits_fn, variables, source, transform, mesh, batch_size: int, threads: int = 4,
                   workers: int = 0, desc: str = "logits") -> tuple[np.ndarray, np.ndarray]:
    """(logits (N, C) float32, labels (N,)) of a whole split in source order, for the analyses
    that need every prediction (calibration, OOD thresholds). `logits_fn(variables, batch)`
    returns (logits, label, mask) replicated, so every process sees the whole global batch."""
    local = mesh_lib.check_batch(batch_size, mesh)
    host = pipeline.eval_batches(source, transform, batch_size=local, threads=threads, workers=workers)
    logits, labels = [], []
    with contextlib.closing(pipeline.on_mesh(host, mesh)) as batches:
        for batch in tqdm(batches, desc=desc, unit="batch", total=pipeline.num_eval_batches(len(source), local),
                          disable=jax.process_index() != 0, dynamic_ncols=True):
            out, label, mask = jax.device_get(logits_fn(variables, batch))
            keep = np.asarray(mask) > 0
            logits.append(np.asarray(out, np.float32)[keep])
            labels.append(np.asarray(label)[keep])
    return np.concatenate(logits), np.concatenate(labels)
