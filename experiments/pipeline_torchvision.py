"""Host input pipeline at 224 px, images/s per core: jaxvision's grain pipeline against
torchvision's `ImageFolder` + `DataLoader` doing the same transforms with the same worker counts,
alternating in one run, on a folder of ImageNet-like JPEGs (`experiments/make_imagenet_like.py`).

    python experiments/pipeline_torchvision.py /tmp/imagenet_like [--seconds 10] [--workers 1 2]
        [--tfds /tmp/imagenet_like_tfds]

Training: random-resized-crop to 224 (bilinear, as torchvision) + flip, with and without
RandAugment (rand-m9-mstd0.5; torchvision: two ops at magnitude 9).
Evaluation: resize the short side to 256 + centre crop 224. Both output uint8 (jaxvision keeps
images uint8 on the host; torchvision's `PILToTensor`). jaxvision runs `workers` grain processes
of one read thread each, torchvision `workers` DataLoader processes. Per core = images/s / workers.
With --tfds, jaxvision also reads the folder as a TFDS ArrayRecord dataset (written there by
`jaxvision.data.folder_to_tfds` on first use), against the same torchvision `ImageFolder` figure.
"""

from __future__ import annotations

import argparse
import os

import torch
from absl import flags
import torchvision.transforms.v2 as T
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from jaxvision.data import folder_to_tfds, pipeline, sources, transforms
from pipeline_bench import rate  # experiments/ is the script's path

BATCH = 32


def forever(make):
    while True:
        yield from make()


class Repeated(sources.Source):
    """`source` `times` over, so that one evaluation pass outlasts the measurement: each pass
    starts its worker processes afresh (a few seconds), which an ImageNet-sized split amortises."""

    def __init__(self, source, times: int):
        self.source, self.times, self.class_names = source, times, source.class_names

    def __len__(self):
        return len(self.source) * self.times

    def raw(self, index):
        return self.source.raw(index % len(self.source))


def jaxvision_batches(source, kind: str, workers: int, randaugment: str):
    if kind == "train":
        t = transforms.TrainTransform(224, "rrc_flip", interpolation="bilinear", randaugment=randaugment)
        return iter(pipeline.train_batches(source, t, batch_size=BATCH, seed=0, threads=1, workers=workers))
    t = transforms.EvalTransform(224, 0.875, "bilinear")
    return forever(lambda: pipeline.eval_batches(Repeated(source, 20), t, batch_size=BATCH, threads=1,
                                                 workers=workers))


def torchvision_batches(folder: str, kind: str, workers: int, randaugment: str):
    if kind == "train":
        steps = [T.RandomResizedCrop(224, antialias=True), T.RandomHorizontalFlip()]
        steps += [T.RandAugment(num_ops=2, magnitude=9)] if randaugment else []
    else:
        steps = [T.Resize(256, antialias=True), T.CenterCrop(224)]
    data = ImageFolder(folder, transform=T.Compose(steps + [T.PILToTensor()]))
    loader = DataLoader(data, batch_size=BATCH, shuffle=kind == "train", num_workers=workers,
                        persistent_workers=True, drop_last=True)
    return forever(lambda: iter(loader))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tfds", help="data_dir for the folder as a TFDS ArrayRecord dataset")
    args = parser.parse_args()
    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    torch.set_num_threads(1)
    folder = sources.FolderSource(args.folder, "all")
    runs = [("train", "", folder), ("train", "rand-m9-mstd0.5", folder), ("eval", "", folder)]
    if args.tfds:
        name = "imagenet_like"
        if not os.path.isdir(os.path.join(args.tfds, name)):
            folder_to_tfds.build(args.folder, args.tfds, name)
        runs.append(("train", "", sources.TfdsSource(name, "train", args.tfds)))
    rows = []
    for kind, ra, source in runs:
        for workers in args.workers:
            got = {"jaxvision": rate(jaxvision_batches(source, kind, workers, ra), args.seconds) / workers,
                   "torchvision": rate(torchvision_batches(args.folder, kind, workers, ra), args.seconds) / workers}
            label = f"{kind}{' + RandAugment' if ra else ''}{' (TFDS ArrayRecord)' if source is not folder else ''}"
            rows.append((label, workers, got["jaxvision"], got["torchvision"]))
            print(rows[-1], flush=True)
    print(f"\n# Host pipeline at 224 px, images/s per core (`python experiments/pipeline_torchvision.py "
          f"{args.folder} --seconds {args.seconds:g}`), {os.cpu_count()} cores, batch {BATCH}\n")
    print("| transforms | workers | jaxvision / core | torchvision / core | ratio |\n|---|---:|---:|---:|---:|")
    for kind, workers, jv, tv in rows:
        print(f"| {kind} | {workers} | {jv:.0f} | {tv:.0f} | {jv / tv:.2f} |")


if __name__ == "__main__":
    main()
