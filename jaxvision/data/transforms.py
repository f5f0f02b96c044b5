"""Host-side image transforms (numpy + PIL), deterministic given grain's per-element generator.

Images stay uint8 here; normalisation with the model card's mean/std happens on the device,
inside the jitted step, so the host sends a quarter of the bytes float32 would need.

Training augmentations (`augment`): ``rrc_flip`` (Inception-style random-resized-crop and
horizontal flip, the ImageNet default), ``pad_crop_flip`` (pad 4 and random crop, the CIFAR
default), ``pad_crop`` (for data where a flip changes the class, like digits), ``none``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

from jaxvision.data import augment as augment_lib
from jaxvision.errors import UserError

_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}
AUGMENTATIONS = ("rrc_flip", "pad_crop_flip", "pad_crop", "none")


def resize(image: np.ndarray, height: int, width: int, interpolation: str) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), _RESAMPLE[interpolation]))


def random_resized_crop(image, rng: np.random.Generator, size: int, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3), interpolation="bicubic"):
    """A crop of random area fraction `scale` and aspect `ratio` (log-uniform), resized to `size`;
    after 10 failed draws, the central crop with the aspect clamped to `ratio`."""
    h, w = image.shape[:2]
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            return resize(image[top:top + ch, left:left + cw], size, size, interpolation)
    aspect = w / h
    if aspect < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif aspect > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    top, left = (h - ch) // 2, (w - cw) // 2
    return resize(image[top:top + ch, left:left + cw], size, size, interpolation)


def pad_random_crop(image, rng: np.random.Generator, size: int, interpolation="bicubic"):
    """Resize to `size`, zero-pad by size/8 on each side (4 px at CIFAR's 32), take a random
    `size` crop."""
    pad = max(1, size // 8)
    image = resize(image, size, size, interpolation)
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    top, left = rng.integers(0, 2 * pad + 1, size=2)
    return padded[top:top + size, left:left + size]


def center_crop(image, size: int, crop_pct: float, interpolation="bicubic"):
    """Evaluation view: resize the short side to size / crop_pct, then the central size x size."""
    h, w = image.shape[:2]
    short = int(math.floor(size / crop_pct))
    if h < w:
        nh, nw = short, max(short, int(round(w * short / h)))
    else:
        nw, nh = short, max(short, int(round(h * short / w)))
    image = resize(image, nh, nw, interpolation)
    top, left = (nh - size) // 2, (nw - size) // 2
    return image[top:top + size, left:left + size]


@dataclasses.dataclass(frozen=True)
class TrainTransform:
    """grain random map: ``{"image", "label"}`` -> augmented ``size x size`` uint8 image."""

    size: int
    augment: str = "rrc_flip"
    scale: tuple[float, float] = (0.08, 1.0)
    interpolation: str = "bicubic"
    randaugment: str = ""  # e.g. "rand-m9-mstd0.5"
    reprob: float = 0.0  # random erasing probability
    remode: str = "pixel"

    def __post_init__(self):
        if self.augment not in AUGMENTATIONS:
            raise UserError(f"unknown augment {self.augment!r}; choose from {', '.join(AUGMENTATIONS)}")
        object.__setattr__(self, "_randaugment",
                           augment_lib.RandAugment.parse(self.randaugment) if self.randaugment else None)
        if self.remode not in augment_lib.ERASE_MODES:
            raise UserError(f"unknown remode {self.remode!r}; choose from {', '.join(augment_lib.ERASE_MODES)}")

    def __call__(self, example: dict, rng: np.random.Generator) -> dict:
        image = example["image"]
        if self.augment == "rrc_flip":
            image = random_resized_crop(image, rng, self.size, tuple(self.scale),
                                        interpolation=self.interpolation)
        elif self.augment in ("pad_crop_flip", "pad_crop"):
            image = pad_random_crop(image, rng, self.size, interpolation=self.interpolation)
        else:
            image = resize(image, self.size, self.size, self.interpolation)
        if self.augment.endswith("flip") and rng.random() < 0.5:
            image = image[:, ::-1]
        if self._randaugment is not None:
            image = self._randaugment(np.ascontiguousarray(image), rng)
        if self.reprob > 0:
            image = augment_lib.random_erase(image, rng, self.reprob, self.remode)
        return {"image": np.ascontiguousarray(image), "label": np.int32(example["label"])}


@dataclasses.dataclass(frozen=True)
class EvalTransform:
    size: int
    crop_pct: float = 0.875
    interpolation: str = "bicubic"

    def __call__(self, example: dict) -> dict:
        image = center_crop(example["image"], self.size, self.crop_pct, self.interpolation)
        return {"image": np.ascontiguousarray(image), "label": np.int32(example["label"])}
