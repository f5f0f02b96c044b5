"""Metrics to the workdir (JSON lines and TensorBoard) and the tables people read at the end.
Only process 0 writes. A run resumed at step S first drops what an earlier run wrote after S
(metrics.jsonl rewritten; TensorBoard told through tensorboardX's `purge_step`, after which it
hides the earlier events past S), so no step appears twice.

TensorBoard events are written by tensorboardX: it needs neither TensorFlow nor torch (clu's
metric writers write TensorBoard files through one of them) and it knows resumed runs. It imports
torch when torch is installed, only to accept torch tensors; `_summary_writer` keeps torch out,
as the package never imports it.
"""

from __future__ import annotations

import json
import os
import sys

import jax


class MetricWriter:
    def __init__(self, workdir: str, start_step: int = 0):
        self.enabled = jax.process_index() == 0
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            path = os.path.join(workdir, "metrics.jsonl")
            keep_until(path, start_step)
            self._jsonl = open(path, "a")
            self._tb = _summary_writer()(os.path.join(workdir, "tensorboard"), purge_step=int(start_step) + 1)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
        self._jsonl.flush()
        for k, v in clean.items():
            self._tb.add_scalar(k, v, int(step))
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def _summary_writer():
    """tensorboardX's SummaryWriter, imported with torch hidden unless something imported it."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError while this is set
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def _rows(path: str):
    with open(path) as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue


def keep_until(path: str, step: int) -> None:
    """Rewrite the JSON-lines file at `path` without its rows after `step` (atomically)."""
    if not os.path.exists(path):
        return
    kept = [row for row in _rows(path) if row.get("step", 0) <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in kept)
    os.replace(path + ".tmp", path)


def evaluations(workdir: str, upto: int) -> dict[int, dict]:
    """The evaluation rows of metrics.jsonl up to step `upto`, by step: the summary of a resumed
    run (or of rerunning a finished one) keeps the evaluations of the runs before it."""
    path = os.path.join(workdir, "metrics.jsonl")
    rows = {}
    if os.path.exists(path):
        for row in _rows(path):
            if "val_top1" in row and row["step"] <= upto:
                rows[row.pop("step")] = row
    return rows


def table(rows: list[tuple], header: tuple | None = None) -> str:
    """Plain aligned text table (reads well in a terminal and in a log)."""
    rows = [tuple(str(c) for c in r) for r in rows]
    if header:
        rows = [tuple(header)] + rows
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if header:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
