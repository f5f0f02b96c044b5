"""Write a folder of ImageNet-like JPEGs for input-pipeline benchmarks (no ImageNet here): natural
photos shipped with scikit-image and scikit-learn, cropped, scaled to a long side of 350-500 px
at aspect ratios 3:4 to 16:9, flipped, colour-shifted, with sensor-like noise, saved at quality
80-97, so that no two files are alike; `--classes` folders of `--per-class` images (ImageNet's
layout: nXXXXXXXX/*.JPEG). They average 57 KiB against ImageNet's ~110 KB at about the same pixel
count: decoding follows pixels more than bytes, but these are somewhat cheaper to decode.

    pip install scikit-image   # for its sample photos; without it, scikit-learn's two
    python experiments/make_imagenet_like.py /tmp/imagenet_like [--classes 1000 --per-class 3]
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image, ImageEnhance
from tqdm import tqdm

SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
                  "retina", "colorwheel")


def photos() -> list[np.ndarray]:
    """The natural photos at hand: scikit-learn's two, and scikit-image's if it is installed."""
    from sklearn.datasets import load_sample_images

    out = list(load_sample_images().images)
    try:
        import skimage.data
    except ImportError:
        return out
    return out + [getattr(skimage.data, name)() for name in SKIMAGE_PHOTOS]


def variant(photo: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """A random crop (30-100% of the area), long side 350-500 px, aspect 3:4 to 16:9, maybe
    mirrored, with its brightness, contrast, saturation and channel balance shifted."""
    h, w = photo.shape[:2]
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(16 / 9)))
    area = rng.uniform(0.3, 1.0) * h * w
    ch, cw = min(h, int(np.sqrt(area / aspect))), min(w, int(np.sqrt(area * aspect)))
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    image = Image.fromarray(photo[top:top + ch, left:left + cw])
    long = rng.integers(350, 501)
    scale = long / max(ch, cw)
    image = image.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.BICUBIC)
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhance(image).enhance(rng.uniform(0.7, 1.3))
    gains = rng.uniform(0.85, 1.15, 3)
    pixels = np.asarray(image, np.float32) * gains
    # sensor-like noise: the detail that makes camera JPEGs ~3x larger than these clean samples
    pixels += rng.normal(0, rng.uniform(6, 14), pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--per-class", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sources, rng = photos(), np.random.default_rng(args.seed)
    total = 0
    for c in tqdm(range(args.classes), desc="classes"):
        folder = os.path.join(args.out, f"n{c:08d}")
        os.makedirs(folder, exist_ok=True)
        for i in range(args.per_class):
            path = os.path.join(folder, f"n{c:08d}_{i}.JPEG")
            variant(sources[rng.integers(len(sources))], rng).save(path, quality=int(rng.integers(80, 98)))
            total += os.path.getsize(path)
    n = args.classes * args.per_class
    print(f"wrote {n} JPEGs from {len(sources)} photos to {args.out}: {total / n / 1024:.0f} KiB on average")


if __name__ == "__main__":
    main()
