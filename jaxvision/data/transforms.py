"""Host-side image transforms, deterministic given grain's per-element generator.

Crops are chosen as boxes of the stored image first, so an encoded image (`decode.py`) decodes
only the box, at reduced size where the box is scaled down.

Images stay uint8 here; normalisation with the model card's mean/std happens on the device,
inside the jitted step, so the host sends a quarter of the bytes float32 would need.

Training augmentations (`augment`): ``rrc_flip`` (Inception-style random-resized-crop and
horizontal flip, the ImageNet default), ``pad_crop_flip`` (pad 4 and random crop, the CIFAR
default), ``pad_crop`` (for data where a flip changes the class, like digits), ``none``.
Flips are ``random`` (each view a coin toss) or ``alternate``: an image's flip is a coin toss in
its first epoch and the opposite of the previous epoch's ever after, so any two consecutive epochs
show every image both ways (the CIFAR speed recipes'), still a pure function of the step.
"""

from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np

from jaxvision.data import augment as augment_lib
from jaxvision.data.decode import INTERPOLATIONS, crop_resize, shape_of
from jaxvision.errors import UserError

AUGMENTATIONS = ("rrc_flip", "pad_crop_flip", "pad_crop", "none")
FLIPS = ("random", "alternate")
PAD_MODES = ("constant", "reflect")


def resize(image, height: int, width: int, interpolation: str) -> np.ndarray:
    """The whole image (pixels or `decode.EncodedImage`) scaled to (height, width)."""
    return crop_resize(image, (0, 0) + shape_of(image), height, width, interpolation)


def random_box(height: int, width: int, rng: np.random.Generator, scale=(0.08, 1.0),
               ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """Inception's crop (top, left, h, w): random area fraction `scale` and aspect `ratio`
    (log-uniform); after 10 failed draws, the central crop with the aspect clamped to `ratio`."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= width and 0 < ch <= height:
            return int(rng.integers(0, height - ch + 1)), int(rng.integers(0, width - cw + 1)), ch, cw
    aspect = width / height
    if aspect < ratio[0]:
        cw, ch = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        ch, cw = height, int(round(height * ratio[1]))
    else:
        cw, ch = width, height
    return (height - ch) // 2, (width - cw) // 2, ch, cw


def random_resized_crop(image, rng: np.random.Generator, size: int, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3), interpolation="bicubic"):
    """`random_box` of the image resized to `size`; an encoded image decodes only that box."""
    return crop_resize(image, random_box(*shape_of(image), rng, scale, ratio), size, size, interpolation)


def pad_random_crop(image, rng: np.random.Generator, size: int, interpolation="bicubic", pad: int = 0,
                    mode: str = "constant"):
    """Resize to `size`, pad by `pad` pixels on each side (0: size/8, 4 px at CIFAR's 32) with
    zeros (`mode` "constant") or the mirrored edge ("reflect"), take a random `size` crop: a
    translation by up to `pad` pixels each way."""
    pad = pad or max(1, size // 8)
    image = resize(image, size, size, interpolation)
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode=mode)
    top, left = rng.integers(0, 2 * pad + 1, size=2)
    return padded[top:top + size, left:left + size]


def first_flip(seed: int, index: int) -> bool:
    """The coin toss that starts image `index`'s alternating flips: a 64-bit mix of (seed, index)
    (splitmix64's finaliser): no generator to seed per image."""
    mask = (1 << 64) - 1
    x = (index * 0x9E3779B97F4A7C15 + (seed + 1) * 0xD1B54A32D192ED03) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return bool((x ^ (x >> 31)) >> 63)


def center_box(height: int, width: int, size: int, crop_pct: float) -> tuple[float, float, float, float]:
    """The evaluation view as a box (top, left, h, w) of the stored image, in fractional pixels:
    what resizing the short side to size / crop_pct and keeping the central size x size shows."""
    short = int(math.floor(size / crop_pct))
    scale = short / min(height, width)
    nh, nw = (short, max(short, int(round(width * scale)))) if height < width else \
        (max(short, int(round(height * scale))), short)
    sy, sx = height / nh, width / nw
    return (nh - size) // 2 * sy, (nw - size) // 2 * sx, size * sy, size * sx


def center_crop(image, size: int, crop_pct: float, interpolation="bicubic"):
    """Evaluation view: resize the short side to size / crop_pct, then the central size x size
    (an encoded image decodes only that part)."""
    return crop_resize(image, center_box(*shape_of(image), size, crop_pct), size, size, interpolation)


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
    flip: str = "random"  # random | alternate (module docstring)
    translate: int = 0  # pad_crop*: the largest shift in pixels; 0: size / 8
    pad_mode: str = "constant"  # pad_crop*: constant (zeros) | reflect
    seed: int = 0  # alternate flips: which images start flipped

    def __post_init__(self):
        if self.augment not in AUGMENTATIONS:
            raise UserError(f"unknown augment {self.augment!r}; choose from {', '.join(AUGMENTATIONS)}")
        object.__setattr__(self, "_randaugment",
                           augment_lib.RandAugment.parse(self.randaugment) if self.randaugment else None)
        if self.interpolation not in INTERPOLATIONS:
            raise UserError(f"unknown interpolation {self.interpolation!r}; choose from {', '.join(INTERPOLATIONS)}")
        if self.remode not in augment_lib.ERASE_MODES:
            raise UserError(f"unknown remode {self.remode!r}; choose from {', '.join(augment_lib.ERASE_MODES)}")
        if self.flip not in FLIPS:
            raise UserError(f"unknown flip {self.flip!r}; choose from {', '.join(FLIPS)}")
        if self.pad_mode not in PAD_MODES:
            raise UserError(f"unknown pad_mode {self.pad_mode!r}; choose from {', '.join(PAD_MODES)}")

    def __call__(self, example: dict, rng: np.random.Generator, *, index: int = 0, epoch: int = 0) -> dict:
        """`index` (the image's position in its source) and `epoch` decide alternating flips."""
        image = example["image"]
        if self.augment == "rrc_flip":
            image = random_resized_crop(image, rng, self.size, tuple(self.scale),
                                        interpolation=self.interpolation)
        elif self.augment in ("pad_crop_flip", "pad_crop"):
            image = pad_random_crop(image, rng, self.size, self.interpolation, self.translate, self.pad_mode)
        else:
            image = resize(image, self.size, self.size, self.interpolation)
        if self.augment.endswith("flip"):
            flip = rng.random() < 0.5  # drawn either way: the later draws do not depend on `flip`
            if self.flip == "alternate":
                flip = first_flip(self.seed, index) != bool(epoch % 2)
            if flip:
                image = cv2.flip(image, 1)  # a contiguous copy, 10x numpy's of a reversed view
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
