"""A serving artifact with the model card's preprocessing inside, so serving cannot disagree
with training: raw uint8 images (batch, H, W, 3) in, logits out. It is traced with the portable
ops (`jaxvision.models.ops`), whatever host exports it, and lowered for every platform in
`export.platforms` (cpu, cuda and tpu by default); `export.cpu_rewrites=true` is the explicit
choice of the CPU backend's XLA rewrites for a CPU-only artifact, which never holds oneDNN's
custom calls either.

The graph resizes the short side to floor(size / crop_pct) (antialiased, the card's
interpolation, rounded to uint8 like the host pipeline's PIL resize), takes the central
size x size crop, normalises with the card's mean/std and runs the model. `jax.export` serialises
it as StableHLO with a symbolic batch dimension and the weights as constants; reloading needs jax
only, not jaxvision:

    exported = jax.export.deserialize(open("WORKDIR/export/model.stablehlo", "rb").read())
    logits = exported.call(images_uint8)

or jax2onnx writes the same graph as ONNX (input "images", output "logits", batch "B"), for
onnxruntime and the runtimes that read ONNX:

    session = onnxruntime.InferenceSession("WORKDIR/export/model.onnx")
    logits = session.run(None, {"images": images_uint8})[0]
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import types

import jax
import jax.numpy as jnp
import numpy as np

from jaxvision import backends
from jaxvision.errors import DEPLOY_EXTRA, UserError
from jaxvision.models.ops import Ops
from jaxvision.train import step as step_lib

FORMATS = ("stablehlo", "onnx")
_METHODS = {"bicubic": "cubic", "bilinear": "linear", "nearest": "nearest"}


class ExportError(UserError):
    pass


def _resize_crop_matrix(n_in: int, n_resized: int, start: int, size: int, method: str) -> np.ndarray:
    """(size, n_in): resizing a line of n_in pixels to n_resized (antialiased) and keeping
    [start, start + size), as one linear map (resize is linear, so it is the resize of I)."""
    if n_resized == n_in:
        return np.eye(n_in, dtype=np.float32)[start:start + size]
    if method == "nearest":  # jax.image.resize's rule: the input pixel under each output centre
        m = np.eye(n_in, dtype=np.float32)[((np.arange(n_resized) + 0.5) * n_in / n_resized).astype(int)]
        return m[start:start + size]
    # What jax.image.resize computes, as a constant even while the serving function is traced
    # (jax2onnx replaces jax.image.resize itself during conversion).
    with jax.ensure_compile_time_eval():
        m = jax.image.scale_and_translate(jnp.eye(n_in, dtype=jnp.float32), (n_resized, n_in), (0,),
                                          jnp.array([n_resized / n_in]), jnp.array([0.0]),
                                          _METHODS[method], antialias=True)
    return np.asarray(m)[start:start + size]


def preprocess(images, *, size: int, crop_pct: float, interpolation: str, mean, std):
    """uint8 (B, H, W, 3) -> the normalised float32 (B, size, size, 3) the model was trained on.

    The resize and the crop are two constant matrices (rows, then columns): the same numbers as
    `jax.image.resize`, but plain contractions that every exporter (StableHLO, ONNX) takes with a
    symbolic batch."""
    _, h, w, _ = images.shape
    short = int(math.floor(size / crop_pct))
    nh, nw = (short, max(short, int(round(w * short / h)))) if h < w else (max(short, int(round(h * short / w))), short)
    rows = _resize_crop_matrix(h, nh, (nh - size) // 2, size, interpolation)
    cols = _resize_crop_matrix(w, nw, (nw - size) // 2, size, interpolation)
    x = images.astype(jnp.float32)
    x = jnp.einsum("oh,bhwc->bowc", rows, x)
    x = jnp.einsum("pw,bowc->bopc", cols, x)
    if (nh, nw) != (h, w):
        x = jnp.clip(jnp.round(x), 0, 255)  # the host pipeline resizes to uint8 too
    return step_lib.standardize(x / 255.0, mean, std)


def serving_fn(apply, variables, *, size: int, crop_pct: float, interpolation: str, mean, std):
    """images uint8 -> logits float32 of `apply(variables, images)`, the variables closed over as
    constants (int8 ones stay int8 in the artifact)."""
    def serve(images):
        x = preprocess(images, size=size, crop_pct=crop_pct, interpolation=interpolation, mean=mean, std=std)
        return apply(variables, x).astype(jnp.float32)
    return serve


def export_ops(fmt: str, cpu_rewrites: bool = False) -> Ops:
    """The ops an artifact is traced with: portable (pooling as views for ONNX, which jax2onnx
    translates exactly), or with `cpu_rewrites` the CPU backend's rewrites without oneDNN."""
    if cpu_rewrites:
        from jaxvision.backends.cpu.ops import CpuOps
        return CpuOps(native=False)
    return Ops(pool_by_views=fmt == "onnx")


def export_stablehlo(serve, input_size: tuple[int, int], platforms: tuple[str, ...]) -> bytes:
    batch = jax.export.symbolic_shape("batch")[0]
    spec = jax.ShapeDtypeStruct((batch, *input_size, 3), jnp.uint8)
    return bytes(jax.export.export(jax.jit(serve), platforms=platforms)(spec).serialize())


def export_onnx(serve, input_size: tuple[int, int], platforms=None) -> bytes:
    from jax2onnx import to_onnx  # installed: check_format ran first
    spec = types.SimpleNamespace(shape=("B", *input_size, 3), dtype=np.uint8)
    logging.getLogger("onnx_ir").setLevel(logging.ERROR)  # one warning per untyped shape constant
    proto = to_onnx(serve, [spec], model_name="jaxvision", input_names=["images"], output_names=["logits"])
    # jax2onnx (0.17) annotates the NHWC<->NCHW transposes around each Conv with wrong intermediate
    # shapes, which onnxruntime's shape inference then rejects at the first residual Add; the
    # annotations are optional, so they go and onnxruntime infers every shape itself.
    del proto.graph.value_info[:]
    return proto.SerializeToString()


def export_artifact(fmt: str, serve, input_size: tuple[int, int], platforms: tuple[str, ...]) -> bytes:
    return (export_stablehlo if fmt == "stablehlo" else export_onnx)(serve, input_size, platforms)


def write(out_dir: str, name: str, fmt: str, artifact: bytes, meta: dict) -> str:
    """OUT_DIR/NAME.FMT and its metadata OUT_DIR/NAME.json."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.{fmt}")
    with open(path, "wb") as f:
        f.write(artifact)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return path


def load(path: str):
    """The exported function `images uint8 -> logits`: through jax for StableHLO, through
    onnxruntime for ONNX."""
    if path.endswith(".onnx"):
        import onnxruntime
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        return lambda images: session.run(None, {"images": np.asarray(images, np.uint8)})[0]
    with open(path, "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    return exported.call


def check_platforms(text: str, fmt: str, cpu_rewrites: bool = False) -> tuple[str, ...]:
    """`export.platforms` ("cpu,cuda,tpu") as a tuple, checked before any work."""
    platforms = tuple(p.strip() for p in str(text).split(",") if p.strip())
    if not platforms:
        raise ExportError(f"config.export.platforms is empty: name some of {', '.join(backends.PLATFORMS)}")
    for p in platforms:
        backends.check_platform(p, "each of config.export.platforms")
    if cpu_rewrites and (platforms != ("cpu",) or fmt != "stablehlo"):
        raise ExportError("config.export.cpu_rewrites=true makes a CPU-only StableHLO artifact: "
                          "add --config.export.platforms=cpu --config.export.format=stablehlo")
    return platforms


def check_format(fmt: str, quantize: str = "") -> None:
    """Before any work: a known format whose packages are installed."""
    if fmt not in FORMATS:
        raise ExportError(f"config.export.format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if quantize and fmt != "stablehlo":
        raise ExportError(f"config.export.quantize={quantize} exports StableHLO only (jax2onnx cannot "
                          "convert qwix's quantized layers): add --config.export.format=stablehlo")
    missing = [m for m in ("jax2onnx", "onnxruntime") if fmt == "onnx" and importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"config.export.format=onnx needs {' and '.join(missing)}, not installed: {DEPLOY_EXTRA}")
