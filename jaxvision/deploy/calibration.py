"""Temperature scaling, expected calibration error, reliability diagrams, OOD scores.

`python -m jaxvision.main --mode calibrate` fits one temperature T on the validation split
(minimising the negative log-likelihood of softmax(logits / T), Guo et al. 2017), reports the
expected calibration error before and after, and picks the out-of-distribution threshold that
accepts `calibrate.accept` of the in-distribution validation images. Everything lands in
`WORKDIR/calibration.json` (read by `--mode predict`) and `WORKDIR/reliability.png`.
"""

from __future__ import annotations

import json
import os

import numpy as np
from scipy import optimize, special

from jaxvision import plots

SCORES = ("msp", "energy")
FILE = "calibration.json"


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    z = logits.astype(np.float64) / temperature
    return float(np.mean(special.logsumexp(z, axis=1) - z[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 minimising validation NLL (convex in log T, so a bounded 1-D search is exact)."""
    found = optimize.minimize_scalar(lambda log_t: nll(logits, labels, float(np.exp(log_t))),
                                     bounds=(np.log(0.05), np.log(20.0)), method="bounded",
                                     options={"xatol": 1e-5})
    return float(np.exp(found.x))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return special.softmax(logits.astype(np.float64) / temperature, axis=1)


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = 15):
    """Per confidence bin (equal width): (count, mean confidence, accuracy)."""
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore"):
        conf = np.bincount(which, confidence, bins) / count
        acc = np.bincount(which, correct, bins) / count
    return count, conf, acc


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error: sum over bins of |accuracy - confidence| weighted by size."""
    count, conf, acc = reliability(probs, labels, bins)
    filled = count > 0
    return float(np.sum(count[filled] * np.abs(acc[filled] - conf[filled])) / count.sum())


def ood_score(logits: np.ndarray, kind: str, temperature: float = 1.0) -> np.ndarray:
    """Higher = more in-distribution. "msp": the maximum softmax probability (at T);
    "energy": the negative free energy logsumexp(logits) (Liu et al. 2020, at T = 1)."""
    if kind == "msp":
        return softmax(logits, temperature).max(axis=1)
    if kind == "energy":
        return special.logsumexp(logits.astype(np.float64), axis=1)
    raise ValueError(f"unknown OOD score {kind!r}; one of {', '.join(SCORES)}")


def threshold_for(scores: np.ndarray, accept: float) -> float:
    """The score above which `accept` of these (in-distribution) scores lie."""
    return float(np.quantile(scores, 1.0 - accept))


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Probability that an in-distribution image scores above an OOD one (ties count half)."""
    from sklearn.metrics import roc_auc_score

    truth = np.concatenate([np.ones(len(in_scores)), np.zeros(len(out_scores))])
    return float(roc_auc_score(truth, np.concatenate([in_scores, out_scores])))


def save_reliability(probs_before, probs_after, labels, path: str, title: str, bins: int = 15) -> str:
    """Reliability diagram: accuracy against confidence per bin, before and after scaling."""
    plt = plots.pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.4), sharey=True)
    edges = np.linspace(0, 1, bins + 1)
    for ax, probs, name in ((axes[0], probs_before, "uncalibrated"), (axes[1], probs_after, "temperature-scaled")):
        count, conf, acc = reliability(probs, labels, bins)
        ax.bar(edges[:-1], np.nan_to_num(acc), width=1 / bins, align="edge", edgecolor="black",
               color="tab:blue", label="accuracy")
        ax.bar(edges[:-1], np.nan_to_num(conf - acc), bottom=np.nan_to_num(acc), width=1 / bins,
               align="edge", color="tab:red", alpha=0.3, label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set_title(f"{name}: ECE {ece(probs, labels, bins):.2%}")
        ax.set_xlabel("confidence")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    return plots.save(fig, path)


def calibrate(logits: np.ndarray, labels: np.ndarray, *, accept: float, score: str,
              ood_logits: np.ndarray | None = None) -> dict:
    """Everything `calibration.json` holds, from validation logits (and optional OOD logits)."""
    if score not in SCORES:
        raise ValueError(f"config.calibrate.score must be one of {', '.join(SCORES)}, not {score!r}")
    t = fit_temperature(logits, labels)
    out = {"temperature": t, "validation_images": int(len(labels)),
           "ece_before": ece(softmax(logits), labels), "ece_after": ece(softmax(logits, t), labels),
           "nll_before": nll(logits, labels), "nll_after": nll(logits, labels, t),
           "top1": float(np.mean(logits.argmax(1) == labels)),
           "ood_score": score, "accept": accept,
           "ood_threshold": threshold_for(ood_score(logits, score, t), accept)}
    if ood_logits is not None:
        for kind in SCORES:
            out[f"auroc_{kind}"] = auroc(ood_score(logits, kind, t), ood_score(ood_logits, kind, t))
        out["ood_rejected"] = float(np.mean(ood_score(ood_logits, score, t) < out["ood_threshold"]))
    return out


def save(result: dict, workdir: str) -> str:
    path = os.path.join(workdir, FILE)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return path


def load(workdir: str) -> dict | None:
    path = os.path.join(workdir, FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)
