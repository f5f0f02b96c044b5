"""Crop-window JPEG decoding through the system's libjpeg-turbo (`jpeg.c`, built on first use).

Decoding is about two thirds of a training image's host time, and a random-resized crop keeps on
average half of the image, often at a smaller size than stored. libjpeg-turbo can skip the work
for the rest: DCT scaling decodes at k/8 of the size, a cropped scanline decodes only the crop's
columns, skipped scanlines skip the inverse DCT of the rows above and the rows below are never
read. TF's `decode_and_crop_jpeg` (big_vision's `decode_jpeg_and_inception_crop`) does the same.
Pillow exposes none of it but 1/2, 1/4 and 1/8 scaling, so `decode.py` falls back to Pillow when
this library cannot be built (no C compiler or no libjpeg headers: Debian/Ubuntu
`apt install libjpeg-turbo8-dev` or `libjpeg62-turbo-dev`).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import shutil

import numpy as np

from jaxvision import compiled

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jpeg.c")
_INT = ctypes.POINTER(ctypes.c_int)


class DecodeError(ValueError):
    """libjpeg rejected the data (or warned about it: truncated or corrupt)."""


def _load() -> ctypes.CDLL | str:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        return "no C compiler (cc, gcc or $CC)"

    def command(out: str) -> list[str]:
        return [compiler, "-O2", "-shared", "-fPIC", SOURCE, "-ljpeg", "-o", out]
    try:
        return ctypes.CDLL(compiled.shared_library(SOURCE, "libjaxvision_jpeg.so", command, compiler,
                                                   "the crop-window JPEG decoder"))
    except (compiled.BuildError, OSError) as e:
        return f"it does not build against libjpeg-turbo here ({str(e).splitlines()[-1][:200]})"


@functools.cache
def library() -> ctypes.CDLL | str:
    """The decoder, or one line saying why it is unavailable here (logged once per process)."""
    lib = _load()
    if isinstance(lib, str):
        logging.getLogger(__name__).warning(
            "jaxvision: no crop-window JPEG decoding, so whole images are decoded with Pillow "
            "(0.6x the host throughput): %s. Install a C compiler and libjpeg-turbo's headers "
            "(Debian/Ubuntu: apt install gcc libjpeg-dev).", lib)
        return lib
    lib.jv_jpeg_header.argtypes = [ctypes.c_char_p, ctypes.c_ulong, _INT, _INT, _INT, ctypes.c_char_p]
    lib.jv_jpeg_decode.argtypes = ([ctypes.c_char_p, ctypes.c_ulong] + [ctypes.c_int] * 5 +
                                   [ctypes.c_void_p, ctypes.c_int, _INT, _INT, ctypes.c_char_p])
    return lib


def is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def header(data: bytes) -> tuple[int, int, bool]:
    """(height, width, whether libjpeg decodes it to RGB: not CMYK / YCCK)."""
    w, h, rgb = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    message = ctypes.create_string_buffer(200)
    if library().jv_jpeg_header(data, len(data), w, h, rgb, message):
        raise DecodeError(message.value.decode())
    return h.value, w.value, bool(rgb.value)


def decode_window(data: bytes, eighths: int, box: tuple[int, int, int, int], scaled_width: int) -> np.ndarray:
    """uint8 (h, w, 3): `box` = (top, left, h, w) of the image decoded at `eighths` / 8 of its size,
    `scaled_width` pixels wide. A view into rows widened to whole iMCUs (strided), which cv2 and
    numpy take as it is."""
    top, left, height, width = box
    out = np.empty((height, scaled_width, 3), np.uint8)
    out_width, offset = ctypes.c_int(), ctypes.c_int()
    message = ctypes.create_string_buffer(200)
    if library().jv_jpeg_decode(data, len(data), eighths, left, top, width, height, out.ctypes.data,
                                scaled_width, out_width, offset, message):
        raise DecodeError(message.value.decode())
    rows = out.reshape(-1)[:height * out_width.value * 3].reshape(height, out_width.value, 3)
    return rows[:, offset.value:offset.value + width]
