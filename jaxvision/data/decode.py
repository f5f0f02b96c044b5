"""Images as sources hand them over (pixels, or the file's bytes) and the pixels a crop needs.

Folder and TFDS sources pass the encoded file on (`EncodedImage`); the transforms decide which
box they will keep, and `window` decodes only that box, at the smallest k/8 of the stored size
that still covers the output (libjpeg-turbo through `jpeg.py`; Pillow's 1/2, 1/4, 1/8 draft
otherwise, or for other formats the whole image), and `crop_resize` scales it with OpenCV.

An image that cannot be read raises `Unreadable` naming it, wherever the decoding happens.
"""

from __future__ import annotations

import functools
import io
import math

import cv2
import numpy as np
from PIL import Image

from jaxvision.data import jpeg

_INTERPOLATION = {"bicubic": cv2.INTER_CUBIC, "bilinear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}
_PIL_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}
INTERPOLATIONS = tuple(_INTERPOLATION)


class Unreadable(Exception):
    """An image that cannot be decoded; the message names it and says why."""


class EncodedImage:
    """A file's bytes and its name (a path or a record), with the size read from its header."""

    def __init__(self, data: bytes, name: str):
        self.data, self.name = data, name

    @functools.cached_property
    def _header(self) -> tuple[int, int, bool]:
        """(height, width, whether the crop-window decoder takes it)."""
        try:
            if jpeg.is_jpeg(self.data) and not isinstance(jpeg.library(), str):
                h, w, rgb = jpeg.header(self.data)
                # A file cut short is only noticed by decoding to its end, which a crop may not do:
                # one that does not end in EOI goes to Pillow, which reads it all and says so.
                return h, w, rgb and self.data[-2:] == b"\xff\xd9"
            with Image.open(io.BytesIO(self.data)) as im:
                return im.height, im.width, False
        except Exception as e:  # noqa: BLE001  (any failure to parse the header means: unreadable)
            raise Unreadable(f"{self.name}: {type(e).__name__}: {e}") from None

    @property
    def shape(self) -> tuple[int, int]:
        return self._header[:2]


def shape_of(image) -> tuple[int, int]:
    return image.shape[:2]


def pixels(image) -> np.ndarray:
    """The whole image as uint8 (H, W, 3)."""
    return window(image, (0, 0) + shape_of(image), *shape_of(image))[0]


def _snap(box, factor: float, height: int, width: int) -> tuple[int, int, int, int]:
    """`box` (top, left, h, w) in stored pixels -> the nearest box of whole pixels at `factor` of
    the size (at least one), inside that (height, width) image."""
    top, left, h, w = box
    y0, x0 = min(round(top * factor), height - 1), min(round(left * factor), width - 1)
    y1, x1 = min(max(round((top + h) * factor), y0 + 1), height), min(max(round((left + w) * factor), x0 + 1), width)
    return y0, x0, y1 - y0, x1 - x0


def window(image, box: tuple[int, int, int, int], out_height: int, out_width: int):
    """(uint8 pixels, the box they show in stored pixels): `box` = (top, left, h, w) decoded at the
    smallest k/8 of the stored size at which it still covers (out_height, out_width) (full size if
    it never does), its corners snapped to that size's pixel grid (so they move by less than half
    a pixel of it)."""
    if isinstance(image, np.ndarray):
        top, left, h, w = box
        return image[top:top + h, left:left + w], tuple(box)
    height, width = image.shape
    need = max(out_height / box[2], out_width / box[3])
    try:
        if image._header[2]:
            eighths = next((k for k in range(1, 9) if k / 8 >= need), 8)
            factor, sw = eighths / 8, -(-width * eighths // 8)  # libjpeg's scaled size rounds up
            snapped = _snap(box, factor, -(-height * eighths // 8), sw)
            array = jpeg.decode_window(image.data, eighths, snapped, sw)
        else:
            with Image.open(io.BytesIO(image.data)) as im:
                if need < 1:  # Pillow's JPEG draft: the largest of 1/2, 1/4, 1/8 that keeps >= need
                    im.draft("RGB", (math.ceil(width * need), math.ceil(height * need)))
                factor = 1 / round(width / im.width)  # libjpeg scales by exactly 1/2, 1/4 or 1/8
                snapped = _snap(box, factor, im.height, im.width)
                top, left, h, w = snapped
                array = np.asarray(im.convert("RGB"))[top:top + h, left:left + w]
    except Exception as e:  # noqa: BLE001  (any failure to decode means: unreadable)
        raise Unreadable(f"{image.name}: {type(e).__name__}: {e}") from None
    return array, tuple(v / factor for v in snapped)


def resize(image: np.ndarray, height: int, width: int, interpolation: str) -> np.ndarray:
    """`image` scaled to (height, width) by OpenCV; by pixel area where it shrinks more than
    twofold (no aliasing: after DCT scaling that is rare), else by `interpolation`."""
    if image.shape[:2] == (height, width):
        return image
    shrink = min(image.shape[0] / height, image.shape[1] / width)
    flag = cv2.INTER_AREA if shrink > 2 else _INTERPOLATION[interpolation]
    return cv2.resize(image, (width, height), interpolation=flag)


def crop_resize(image, box, height: int, width: int, interpolation: str) -> np.ndarray:
    """`box` (top, left, h, w) of `image` scaled to (height, width).

    Pixels in memory (`np.ndarray`) are resampled by Pillow from the box itself, fractional
    corners and antialiasing included: timm's view, and what the exported model's in-graph
    resize reproduces. An `EncodedImage` takes the fast path: the box snapped to the grid of the
    reduced decode (`window`), resampled by OpenCV, six times faster than Pillow per 224 px crop
    (tests/test_decode.py bounds the difference to Pillow on the full decode)."""
    if isinstance(image, EncodedImage):
        return resize(window(image, box, height, width)[0], height, width, interpolation)
    top, left, h, w = box
    return np.asarray(Image.fromarray(image).resize((width, height), _PIL_RESAMPLE[interpolation],
                                                    box=(left, top, left + w, top + h)))
