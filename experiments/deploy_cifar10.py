"""Calibration, OOD rejection and the StableHLO and ONNX exports on a trained CIFAR-10 model.

    python experiments/deploy_cifar10.py /tmp/cifar10/train /tmp/jv_cifar

WORKDIR is a finished `configs/cifar10_resnet.py` run (README recipe). Runs `--mode calibrate`
against the bundled digits as the out-of-distribution set, `--mode export` in both formats, then
feeds every raw 32 px validation JPEG to each artifact (StableHLO loaded with jax alone, ONNX run
by onnxruntime) and compares its logits and accuracy with the in-process model on the training
pipeline's evaluation transform.
"""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np

from jaxvision.config import load
from jaxvision import trained
from jaxvision.deploy import export, modes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("workdir")
    parser.add_argument("--width", type=int, default=16, help="model.kwargs.width of the run")
    args = parser.parse_args()
    config = load(os.path.join(ROOT, "configs", "cifar10_resnet.py"), args.folder)
    config.model.kwargs.width = args.width
    config.calibrate.ood_dataset = "digits"
    cal = modes.calibrate(config, args.workdir)
    t = trained.load(config, args.workdir, evaluate=True)
    s, variables, shardings = t.setup, t.variables, t.shardings
    logits, labels = modes._split_logits(s, modes._logits_fn(s, shardings), variables, s.eval_source,
                                         "in-process logits")
    raw = np.stack([s.eval_source[i]["image"] for i in range(len(s.eval_source))])
    rows = [("validation top-1 (in-process model)", f"{np.mean(logits.argmax(1) == labels):.2%}")]
    for fmt, runtime in (("stablehlo", "jax.export"), ("onnx", "onnxruntime")):
        config.export.format = fmt
        path = modes.export(config, args.workdir)
        serve = export.load(path)
        exported = np.concatenate([np.asarray(serve(raw[i:i + 500])) for i in range(0, len(raw), 500)])
        rel = np.max(np.abs(exported - logits)) / np.max(np.abs(logits))
        rows += [
            (f"validation top-1 ({fmt} in {runtime}, raw uint8 JPEG pixels in)", f"{np.mean(exported.argmax(1) == labels):.2%}"),
            (f"{fmt} vs in-process: max abs logit difference / max abs logit", f"{rel:.1e}"),
            (f"{fmt} vs in-process: same top-1 class", f"{np.mean(exported.argmax(1) == logits.argmax(1)):.2%}"),
            (f"{fmt} artifact size", f"{os.path.getsize(path) / 2 ** 20:.1f} MiB"),
        ]
    print(f"\n# Deployment of the CIFAR-10 recipe (`python experiments/deploy_cifar10.py {args.folder} "
          f"{args.workdir} --width {args.width}`)\n")
    print(f"ResNet-18 (width {args.width}) from `configs/cifar10_resnet.py`, {len(labels)} validation images "
          f"(held out by file path), jax {jax.__version__}.\n")
    print("| measurement | value |\n|---|---:|")
    rows += [
        ("fitted temperature", f"{cal['temperature']:.3f}"),
        ("ECE (15 bins) before -> after temperature scaling", f"{cal['ece_before']:.2%} -> {cal['ece_after']:.2%}"),
        ("NLL before -> after", f"{cal['nll_before']:.4f} -> {cal['nll_after']:.4f}"),
        (f"OOD threshold ({cal['ood_score']}, keeps {cal['accept']:.0%} of validation)", f"{cal['ood_threshold']:.4f}"),
        ("AUROC vs digits (359 images), maximum softmax", f"{cal['auroc_msp']:.3f}"),
        ("AUROC vs digits, energy", f"{cal['auroc_energy']:.3f}"),
        ("digits rejected at that threshold", f"{cal['ood_rejected']:.2%}"),
    ]
    for name, value in rows:
        print(f"| {name} | {value} |")
    print(f"\nReliability diagram: {os.path.join(args.workdir, 'reliability.png')}")


if __name__ == "__main__":
    main()
