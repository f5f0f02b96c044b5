"""Metrics to the workdir (JSON lines and TensorBoard) and the tables people read at the end.
Only process 0 writes."""

from __future__ import annotations

import json
import os
import time

import jax


class MetricWriter:
    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            # TensorBoard's own writer: no TensorFlow (and, unlike tensorboardX, no torch) import.
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
            self._tb = EventFileWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
        self._jsonl.flush()
        from tensorboard.compat.proto import event_pb2, summary_pb2
        values = [summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in clean.items()]
        self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                           summary=summary_pb2.Summary(value=values)))

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def evaluations(workdir: str, upto: int) -> dict[int, dict]:
    """The evaluation rows of metrics.jsonl up to step `upto`, by step: the summary of a resumed
    run (or of rerunning a finished one) keeps the evaluations of the runs before it."""
    path = os.path.join(workdir, "metrics.jsonl")
    rows = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a crash
                    continue
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
