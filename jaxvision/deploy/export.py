"""A serving artifact with the model card's preprocessing inside, so serving cannot disagree
with training: raw uint8 images (batch, H, W, 3) in, logits out.

The graph resizes the short side to floor(size / crop_pct) (antialiased, the card's
interpolation, rounded to uint8 like the host pipeline's PIL resize), takes the central
size x size crop, normalises with the card's mean/std and runs the model. `jax.export` serialises
it as StableHLO with a symbolic batch dimension and the weights as constants; reloading needs jax
only, not jaxvision:

    exported = jax.export.deserialize(open("WORKDIR/export/model.stablehlo", "rb").read())
    logits = exported.call(images_uint8)
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp

from jaxvision.errors import UserError
from jaxvision.train import step as step_lib

FORMATS = ("stablehlo",)
_METHODS = {"bicubic": "cubic", "bilinear": "linear", "nearest": "nearest"}


class ExportError(UserError):
    pass


def preprocess(images, *, size: int, crop_pct: float, interpolation: str, mean, std):
    """uint8 (B, H, W, 3) -> the normalised float32 (B, size, size, 3) the model was trained on."""
    _, h, w, _ = images.shape
    short = int(math.floor(size / crop_pct))
    nh, nw = (short, max(short, int(round(w * short / h)))) if h < w else (max(short, int(round(h * short / w))), short)
    x = images.astype(jnp.float32)
    if (nh, nw) != (h, w):
        x = jax.image.resize(x, (x.shape[0], nh, nw, 3), _METHODS[interpolation], antialias=True)
        x = jnp.clip(jnp.round(x), 0, 255)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[:, top:top + size, left:left + size]
    return step_lib.standardize(x / 255.0, mean, std)


def serving_fn(model, variables, *, size: int, crop_pct: float, interpolation: str, mean, std):
    """images uint8 -> logits float32, the variables closed over as constants."""
    def serve(images):
        x = preprocess(images, size=size, crop_pct=crop_pct, interpolation=interpolation, mean=mean, std=std)
        return model.apply(variables, x, train=False).astype(jnp.float32)
    return serve


def export_stablehlo(serve, input_size: tuple[int, int]) -> bytes:
    batch = jax.export.symbolic_shape("batch")[0]
    spec = jax.ShapeDtypeStruct((batch, *input_size, 3), jnp.uint8)
    return bytes(jax.export.export(jax.jit(serve))(spec).serialize())


def write(out_dir: str, fmt: str, artifact: bytes, meta: dict) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"model.{fmt}")
    with open(path, "wb") as f:
        f.write(artifact)
    with open(os.path.join(out_dir, "model.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return path


def load(path: str):
    """The exported function `images uint8 -> logits` (jax only)."""
    with open(path, "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    return exported.call


def check_format(fmt: str) -> None:
    if fmt == "onnx":
        raise ExportError("config.export.format=onnx is not available yet: export StableHLO "
                          "(config.export.format=stablehlo) and convert it, or follow issue 9")
    if fmt not in FORMATS:
        raise ExportError(f"config.export.format must be one of {', '.join(FORMATS)}, not {fmt!r}")
