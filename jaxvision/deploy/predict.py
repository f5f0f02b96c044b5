"""`--mode predict`: top-k labels and confidences for image files, as a table and a CSV.

Inputs (`config.predict.inputs`): a file, a folder (searched recursively) or a glob. Each image
goes through the evaluation transform of training (the model card's resize, crop and
normalisation). With `WORKDIR/calibration.json` (from `--mode calibrate`) confidences use the
fitted temperature and rows whose OOD score falls below the chosen threshold are flagged.
An unreadable file gets a row saying so; it never stops the run.
"""

from __future__ import annotations

import csv
import glob
import os

import numpy as np

from jaxvision.data.sources import IMAGE_SUFFIXES, DataError, read_image
from jaxvision.deploy import calibration


def list_inputs(pattern: str) -> list[str]:
    """Image paths from a file, a folder (recursive) or a glob, sorted."""
    if not pattern:
        raise DataError("config.predict.inputs is empty: give an image file, a folder or a glob")
    path = os.path.expanduser(pattern)
    if os.path.isfile(path):
        found = [path]
    elif os.path.isdir(path):
        found = [os.path.join(root, f) for root, _, files in os.walk(path) for f in files]
    else:
        found = glob.glob(path, recursive=True)
    found = sorted(p for p in found if p.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(p))
    if not found:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) at {pattern}: give an image "
                        "file, a folder or a glob such as 'photos/**/*.jpg'")
    return found


def read(path: str) -> np.ndarray | None:
    """uint8 (H, W, 3), or None when the file cannot be decoded."""
    try:
        return read_image(path)
    except Exception:  # noqa: BLE001  (any decode failure: report the file, go on)
        return None


def rows(paths, logits: np.ndarray, readable: np.ndarray, class_names, top_k: int, cal: dict | None):
    """One dict per input: path, top-k (label, probability), OOD score and flag when calibrated."""
    t = cal["temperature"] if cal else 1.0
    probs = calibration.softmax(logits, t)
    score = calibration.ood_score(logits, cal["ood_score"], t) if cal else None
    out = []
    for i, path in enumerate(paths):
        row = {"path": path}
        if not readable[i]:
            row["error"] = "unreadable image"
            out.append(row)
            continue
        for rank, c in enumerate(np.argsort(-probs[i])[:top_k], 1):
            row[f"label_{rank}"], row[f"prob_{rank}"] = class_names[c], float(probs[i, c])
        if cal:
            row[f"ood_{cal['ood_score']}"] = float(score[i])
            row["flag"] = "out-of-distribution" if score[i] < cal["ood_threshold"] else ""
        out.append(row)
    return out


def write_csv(result: list[dict], path: str) -> str:
    fields = list(dict.fromkeys(k for r in result for k in r))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(result)
    return path


def format_rows(result: list[dict], top_k: int, limit: int = 50) -> list[tuple]:
    """Table rows: path, top-1..k as 'label prob', flag; at most `limit`."""
    table = []
    for r in result[:limit]:
        if "error" in r:
            table.append((r["path"], r["error"], *[""] * (top_k - 1), ""))
            continue
        table.append((r["path"], *[f"{r[f'label_{k}']} {r[f'prob_{k}']:.3f}" for k in range(1, top_k + 1)],
                      r.get("flag", "")))
    return table
