"""RandAugment (Cubuk et al. 2019) and Random Erasing (Zhong et al. 2017) on uint8 host images,
configured and behaving like timm's (`rand-m9-mstd0.5`, `reprob`, `remode`).

RandAugment string: ``rand`` then dash-separated options: ``m`` magnitude (0-10), ``n`` number of
ops, ``mstd`` magnitude noise std, ``mmax`` magnitude cap, ``p`` probability of each op.
Random erasing fills its box with per-pixel noise (``pixel``), one random colour (``rand``) or the
mean colour (``const``); it runs before normalisation, on uint8 pixels.
"""

from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from jaxvision.errors import UserError

_FILL = (124, 116, 104)  # ImageNet mean colour for pixels that geometric ops expose
_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
        "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
        "TranslateYRel")


@dataclasses.dataclass(frozen=True)
class RandAugment:
    magnitude: float = 9.0
    num_ops: int = 2
    magnitude_std: float = 0.0
    magnitude_max: float = 10.0
    prob: float = 0.5

    @classmethod
    def parse(cls, spec: str) -> "RandAugment":
        parts = spec.split("-")
        if parts[0] != "rand":
            raise UserError(f"RandAugment spec must start with 'rand' (like rand-m9-mstd0.5), got {spec!r}")
        keys = {"m": "magnitude", "n": "num_ops", "mstd": "magnitude_std", "mmax": "magnitude_max",
                "p": "prob"}
        values = {}
        for part in parts[1:]:
            key = next((k for k in sorted(keys, key=len, reverse=True) if part.startswith(k)), None)
            if key is None:
                raise UserError(f"unknown RandAugment option {part!r} in {spec!r}; options: m, n, mstd, mmax, p")
            values[keys[key]] = float(part[len(key):])
        if "num_ops" in values:
            values["num_ops"] = int(values["num_ops"])
        return cls(**values)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        img = Image.fromarray(image)
        for name in rng.choice(_OPS, self.num_ops, replace=True):
            if rng.random() > self.prob:
                continue
            m = self.magnitude
            if self.magnitude_std == float("inf"):
                m = rng.uniform(0, m)
            elif self.magnitude_std > 0:
                m = rng.normal(m, self.magnitude_std)
            img = _apply(str(name), img, min(max(m, 0.0), self.magnitude_max) / 10.0, rng)
        return np.asarray(img)


def _signed(value: float, rng) -> float:
    return -value if rng.random() < 0.5 else value


def _warp(img, matrix, rng, inverse: bool = True):
    """`img` under the 2x3 affine `matrix` (output -> input pixel when `inverse`), bilinear or
    bicubic at random as timm's, the exposed pixels `_FILL`. OpenCV's warp: 2-30x Pillow's."""
    flags = (cv2.INTER_LINEAR if rng.random() < 0.5 else cv2.INTER_CUBIC) | (cv2.WARP_INVERSE_MAP if inverse else 0)
    out = cv2.warpAffine(np.asarray(img), np.asarray(matrix, np.float64).reshape(2, 3), img.size,
                         flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=_FILL)
    return Image.fromarray(out)


def _apply(name: str, img: Image.Image, level: float, rng: np.random.Generator) -> Image.Image:
    """One op at `level` in [0, 1], with timm's level-to-argument mappings."""
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Invert":
        return ImageOps.invert(img)
    if name == "Rotate":  # counter-clockwise about the centre, as Pillow's rotate
        angle = _signed(level * 30.0, rng)
        return _warp(img, cv2.getRotationMatrix2D((img.size[0] / 2 - 0.5, img.size[1] / 2 - 0.5), angle, 1.0),
                     rng, inverse=False)
    if name == "Posterize":
        bits = int(level * 4)
        return img if bits >= 8 else ImageOps.posterize(img, max(bits, 1))
    if name == "Solarize":
        return ImageOps.solarize(img, int(level * 256))
    if name == "SolarizeAdd":
        add = int(level * 110)
        lut = [min(255, i + add) if i < 128 else i for i in range(256)] * len(img.getbands())
        return img.point(lut)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        enhancer = getattr(ImageEnhance, name)
        return enhancer(img).enhance(level * 1.8 + 0.1)
    if name == "ShearX":
        return _warp(img, (1, _signed(level * 0.3, rng), 0, 0, 1, 0), rng)
    if name == "ShearY":
        return _warp(img, (1, 0, 0, _signed(level * 0.3, rng), 1, 0), rng)
    if name == "TranslateXRel":
        return _warp(img, (1, 0, _signed(level * 0.45, rng) * img.size[0], 0, 1, 0), rng)
    if name == "TranslateYRel":
        return _warp(img, (1, 0, 0, 0, 1, _signed(level * 0.45, rng) * img.size[1]), rng)
    raise KeyError(name)


ERASE_MODES = ("pixel", "rand", "const")


def random_erase(image: np.ndarray, rng: np.random.Generator, prob: float, mode: str = "pixel",
                 area=(0.02, 1 / 3), aspect=(0.3, 1 / 0.3)) -> np.ndarray:
    """With probability `prob`, fill one random box (area fraction and log-aspect uniform)."""
    if mode not in ERASE_MODES:
        raise UserError(f"random erasing mode must be one of {', '.join(ERASE_MODES)}, not {mode!r}")
    if rng.random() >= prob:
        return image
    h, w, c = image.shape
    for _ in range(10):
        target = rng.uniform(*area) * h * w
        ratio = math.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1])))
        eh, ew = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < eh < h and 0 < ew < w:
            top, left = rng.integers(0, h - eh + 1), rng.integers(0, w - ew + 1)
            out = image.copy()
            if mode == "pixel":
                fill = rng.integers(0, 256, (eh, ew, c), dtype=np.uint8)
            elif mode == "rand":
                fill = rng.integers(0, 256, (1, 1, c), dtype=np.uint8)
            else:
                fill = np.asarray(_FILL[:c], np.uint8).reshape(1, 1, c)
            out[top:top + eh, left:left + ew] = fill
            return out
    return image
