"""Headless matplotlib for the PNGs the modes write (confusion matrices, reliability diagrams,
Grad-CAM overlays): imported lazily, so training never pays for matplotlib unless it plots."""

from __future__ import annotations

import os


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display on servers and pods)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, path: str) -> str:
    """Write `fig` as a PNG at `path` (parents created) and free it."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return path
