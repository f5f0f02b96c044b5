"""Where a training image's host time goes at 224 px: PIL's full JPEG decode, a decode at half size
(libjpeg's DCT scaling through `Image.draft`), Pillow's random-resized-crop of decoded pixels
(bilinear, bicubic), and jaxvision's whole training transform (RRC bilinear + flip) on the encoded
file, with the crop-window decoder and with its Pillow fallback; in ms per image on one core, over
a folder of ImageNet-like JPEGs (`experiments/make_imagenet_like.py`).

    python experiments/decode_costs.py /tmp/imagenet_like [--images 600]
"""

from __future__ import annotations

import argparse
import glob
import io
import os
import time

import numpy as np
from PIL import Image

from jaxvision.data import decode as decoding
from jaxvision.data import jpeg, transforms


def ms_per_call(fn, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - start) / n * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--images", type=int, default=600)
    args = parser.parse_args()
    raw = [open(f, "rb").read() for f in sorted(glob.glob(os.path.join(args.folder, "*", "*")))[:args.images]]
    n, rng = len(raw), np.random.default_rng(0)

    def decode(i, reduce: int = 1):
        image = Image.open(io.BytesIO(raw[i]))
        if reduce > 1:
            image.draft("RGB", (image.size[0] // reduce, image.size[1] // reduce))
        return np.asarray(image.convert("RGB"))

    pixels = [decode(i) for i in range(n)]
    train = transforms.TrainTransform(224, "rrc_flip", interpolation="bilinear")

    def train_transform(i):
        return train({"image": decoding.EncodedImage(raw[i], str(i)), "label": 0}, np.random.default_rng(i))

    fast = ms_per_call(train_transform, n)
    jpeg.library = lambda: "switched off for this row"
    rows = [("decode, full size", ms_per_call(decode, n)),
            ("decode at 1/2 (Image.draft)", ms_per_call(lambda i: decode(i, 2), n)),
            *((f"random-resized-crop to 224, {interp}",
               ms_per_call(lambda i: transforms.random_resized_crop(pixels[i], rng, 224, interpolation=interp), n))
              for interp in ("bilinear", "bicubic")),
            ("training transform on the file: crop-window decode + OpenCV + flip", fast),
            ("training transform on the file, Pillow fallback (no crop-window decoder)", ms_per_call(train_transform, n))]
    print(f"# Host cost per image, one core (`python experiments/decode_costs.py {args.folder}`): {n} JPEGs, "
          f"{np.mean([p.shape[0] * p.shape[1] for p in pixels]) / 1e3:.0f}k pixels on average\n")
    print("| step | ms / image |\n|---|---:|")
    for name, ms in rows:
        print(f"| {name} | {ms:.2f} |")


if __name__ == "__main__":
    main()
