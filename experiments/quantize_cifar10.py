"""Post-training int8 quantization (qwix) of a ResNet and a MobileNet trained on CIFAR-10.

    python experiments/quantize_cifar10.py /tmp/cifar10/train --resnet /tmp/jv_cifar --resnet-width 16 \
        --mobilenet /tmp/jv_cifar_mnv3

--resnet is a finished `configs/cifar10_resnet.py` run. --mobilenet is trained here first if it has
no checkpoint: mobilenetv3_large_100 on the same recipe (32 px, pad-crop-flip, SGD, cosine) for
--epochs. Each model runs `--mode quantize` (top-1 of float32 and int8 on the held-out validation
split, weight bytes) and `--mode export --config.export.quantize=int8` (artifact size); prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import os

import jax

from jaxvision.config import load
from jaxvision.deploy import modes
from jaxvision.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config_for(folder: str, model: str, width: int, epochs: float):
    config = load(os.path.join(ROOT, "configs", "cifar10_resnet.py"), folder)
    config.model.name = model
    config.model.kwargs = {"stem": "3x3", "width": width} if model == "resnet18" else {}
    config.num_epochs = epochs
    return config


def artifact_sizes(config, workdir: str) -> tuple[int, int]:
    """Bytes of the float32 and the int8 StableHLO exports."""
    sizes = []
    for q in ("", "int8"):
        config.export.quantize = q
        sizes.append(os.path.getsize(modes.export(config, workdir)))
    return sizes[0], sizes[1]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("--resnet", required=True, help="workdir of a configs/cifar10_resnet.py run")
    parser.add_argument("--resnet-width", type=int, default=16)
    parser.add_argument("--mobilenet", required=True, help="workdir; trained here if empty")
    parser.add_argument("--epochs", type=float, default=3.0, help="MobileNet training epochs")
    args = parser.parse_args()
    runs = [("resnet18", args.resnet, args.resnet_width), ("mobilenetv3_large_100", args.mobilenet, 0)]
    rows = []
    for model, workdir, width in runs:
        config = config_for(args.folder, model, width, args.epochs)
        if not os.path.exists(os.path.join(workdir, "summary.json")):
            os.makedirs(workdir, exist_ok=True)
            loop.train(config, workdir)
        result = modes.quantize(config, workdir)
        float_bytes, int8_bytes = artifact_sizes(config, workdir)
        rows.append((model, result, float_bytes, int8_bytes))
        with open(os.path.join(workdir, "quantize.json")) as f:
            assert json.load(f)["top1_int8"] == result["top1_int8"]

    print(f"\n# int8 post-training quantization on CIFAR-10 (`python experiments/quantize_cifar10.py "
          f"{args.folder} --resnet {args.resnet} --resnet-width {args.resnet_width} --mobilenet "
          f"{args.mobilenet}`)\n")
    print(f"qwix PTQ, int8 weights (per output channel) and int8 activations (dynamic absmax), "
          f"every convolution and dense layer; jax {jax.__version__}. Validation split: "
          f"{rows[0][1]['images']} held-out training JPEGs.\n")
    print("| model | top-1 float32 | top-1 int8 | change (points) | same top-1 class | weights float32 -> int8 "
          "| StableHLO artifact float32 -> int8 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for model, r, fb, qb in rows:
        print(f"| {model} | {r['top1_float32']:.2%} | {r['top1_int8']:.2%} | {r['top1_change_points']:+.2f} "
              f"| {r['agreement']:.2%} | {r['weights_mib_float32']:.2f} -> {r['weights_mib_int8']:.2f} MiB "
              f"({r['size_ratio']:.2f}x) | {fb / 2 ** 20:.2f} -> {qb / 2 ** 20:.2f} MiB ({qb / fb:.2f}x) |")


if __name__ == "__main__":
    main()
