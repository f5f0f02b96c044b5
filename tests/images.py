"""Image folders the tests make for themselves (no test reads data from outside the repository): `root/<class>/<n>.jpg`
(every `png_every`-th a PNG), each class a colour and a shape on a noisy background at a random
place and size, so that a small network learns them in a few steps and a flipped or cropped view
still looks like its class."""

from __future__ import annotations

import colorsys
import os

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("cat", "dog", "emu", "fox", "gnu", "hen", "owl", "pig", "ram", "yak")


def image(cls: int, num_classes: int, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    h, w = size
    noise = rng.integers(0, 96, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(noise)
    colour = tuple(int(255 * c) for c in colorsys.hsv_to_rgb(cls / num_classes, 0.9, 0.95))
    side = rng.uniform(0.4, 0.8) * min(h, w)
    x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
    box = (x0, y0, x0 + side, y0 + side)
    draw = ImageDraw.Draw(img)
    (draw.ellipse if cls % 2 else draw.rectangle)(box, fill=colour)
    return img


def image_folder(root, classes=CLASSES[:3], per_class: int = 6, size=(20, 24), seed: int = 0,
                 png_every: int = 2):
    """Writes the folder (a pathlib.Path) and returns it."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        os.makedirs(root / name, exist_ok=True)
        for i in range(per_class):
            ext = "png" if png_every and i % png_every == png_every - 1 else "jpg"
            image(c, len(classes), size, rng).save(root / name / f"{i}.{ext}", quality=90)
    return root
