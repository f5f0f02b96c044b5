"""Input pipeline throughput against what the train step consumes, on this machine.

    python experiments/pipeline_bench.py /tmp/cifar10/train [--seconds 20]

1. CIFAR-10 image folder (32 px JPEGs), the `cifar10_resnet` recipe's transforms (decode,
   pad-crop, flip, batch 128): host images/s, with the grain read threads the recipe uses.
2. 224 px: the same images re-encoded once as 256x256 JPEGs under /tmp (the size of an ImageNet
   JPEG after the usual resize), random-resized-crop to 224 and flip: host images/s.
3. What the steps consume: the `cifar10_resnet` train step (images/s, from a short run of the
   jitted step on pipeline batches) and the ResNet-50 step at 224 px, batch 16 (from bench.py's
   measurement method), so the table shows pipeline / step for each.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
from PIL import Image
from tqdm import tqdm

from jaxvision.config import load
from jaxvision.data import pipeline, sources, transforms
from jaxvision.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rate(batches, seconds: float) -> float:
    """Images/s of an endless batch iterator, after its first batch (start-up) is out."""
    next(batches)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch = next(batches)
        n += len(batch["label"] if isinstance(batch, dict) else batch[1])  # grain's dict, torch's tuple
    return n / (time.perf_counter() - start)


def host_rate(source, transform, batch: int, seconds: float, threads: int) -> float:
    return rate(iter(pipeline.train_batches(source, transform, batch_size=batch, seed=0, threads=threads)), seconds)


def make_224_folder(source: sources.FolderSource, out: str, count: int = 2000) -> str:
    """Re-encode `count` images as 256x256 JPEGs (quality 90), one folder per class."""
    if os.path.isdir(out) and sum(len(f) for _, _, f in os.walk(out)) >= count:
        return out
    for i in tqdm(range(count), desc="writing 256 px JPEGs"):
        ex = source[i * (len(source) // count)]
        folder = os.path.join(out, source.class_names[ex["label"]])
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(ex["image"]).resize((256, 256), Image.BICUBIC).save(
            os.path.join(folder, f"{i}.jpg"), quality=90)
    return out


def step_rate(config, steps: int = 20) -> float:
    s = loop.setup(config, evaluate=False)
    tx = s.optimizer(1000)
    init, shapes, shardings = s.abstract_state(tx)
    state = jax.jit(init, out_shardings=shardings)()
    step = loop.jit_train_step(s, tx, shapes, shardings)
    host = iter(pipeline.train_batches(s.train_source, loop.train_transform(s), batch_size=config.batch_size,
                                       seed=0))
    batches = [pipeline.to_global(next(host), s.mesh) for _ in range(4)]
    state, m = step(state, batches[0], None)
    jax.block_until_ready(m)
    start = time.perf_counter()
    for i in range(steps):
        state, m = step(state, batches[i % 4], None)
    jax.block_until_ready(m)
    return steps * config.batch_size / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", nargs="?", default="/tmp/cifar10/train")
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    cfg = load(os.path.join(ROOT, "configs", "cifar10_resnet.py"), args.folder)
    src = sources.FolderSource(args.folder, "train", 0.1)
    t32 = transforms.TrainTransform(32, "pad_crop_flip", interpolation="bilinear")
    cifar_host = host_rate(src, t32, 128, args.seconds, cfg.data.threads)
    big = sources.FolderSource(make_224_folder(src, "/tmp/jv_jpeg256"), "all")
    t224 = transforms.TrainTransform(224, "rrc_flip")
    big_host = host_rate(big, t224, 16, args.seconds, cfg.data.threads)
    cifar_step = step_rate(cfg)
    r50 = cfg.copy_and_resolve_references()
    r50.model.name, r50.model.kwargs, r50.data.image_size, r50.batch_size = "resnet50", {}, 224, 16
    r50.data.dataset, r50.data.train_split = "folder:/tmp/jv_jpeg256", "all"
    r50_step = step_rate(r50, steps=4)
    print(f"\n# Input pipeline vs train step (`python experiments/pipeline_bench.py {args.folder}`)\n")
    print(f"{os.cpu_count()} CPU cores; grain read threads: {cfg.data.threads}; host time measured "
          f"over {args.seconds:.0f} s with the device idle, step time with the pipeline idle.\n")
    print("| data | host pipeline img/s | train step img/s | pipeline / step |\n|---|---:|---:|---:|")
    print(f"| CIFAR-10 folder, 32 px, pad-crop + flip, batch 128 | {cifar_host:.0f} | {cifar_step:.0f} "
          f"(cifar10_resnet) | {cifar_host / cifar_step:.1f} |")
    print(f"| 256 px JPEGs, RRC 224 + flip, batch 16 | {big_host:.0f} | {r50_step:.1f} (resnet50) | "
          f"{big_host / r50_step:.1f} |")


if __name__ == "__main__":
    main()
