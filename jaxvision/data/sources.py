"""Random-access data sources for grain: the bundled digits, an image folder, TFDS ArrayRecord.

A source yields ``{"image", "label"}`` by index. `raw(i)` hands the image over as stored: pixels
(uint8 (H, W, 3)) for in-memory data, the encoded file (`decode.EncodedImage`) for folders and
TFDS, so that a transform decodes only the crop it keeps. `source[i]` decodes it, serving the next
readable image in place of an unreadable one, which is reported once per process with its path.
The pipeline (`pipeline.py`) applies the same rule to `raw` plus the transform in training (one
corrupt JPEG in a million never stops a run, and the data order stays a pure function of the step
for exact resume); evaluation leaves an unreadable image out of every metric, never replaced.

Dataset names: ``digits``, ``folder:/path/to/root`` (one subfolder per class), ``tfds:NAME``.
"""

from __future__ import annotations

import hashlib
import os
from typing import Sequence

import numpy as np
from absl import logging

from jaxvision.data import decode
from jaxvision.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


class DataError(UserError):
    """A dataset cannot be opened as configured; the message says what to change."""


def read_file(path: str) -> decode.EncodedImage:
    """An image file's bytes, not yet decoded; `decode.Unreadable` if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return decode.EncodedImage(f.read(), path)
    except OSError as e:
        raise decode.Unreadable(f"{path}: {type(e).__name__}: {e}") from None


def read_image(path: str) -> np.ndarray:
    """uint8 (H, W, 3) of an image file (any format PIL reads); `decode.Unreadable` if it cannot
    be decoded."""
    return decode.pixels(read_file(path))


_warned: set = set()  # what this process has warned about already


def warn_once(key, message: str, *args) -> None:
    if key not in _warned:
        _warned.add(key)
        logging.warning(message, *args)


def report_unreadable(error: decode.Unreadable) -> None:
    warn_once(("unreadable", str(error)), "skipping unreadable image %s", error)


class Source:
    """Base: `raw` (as stored) and `__getitem__` (decoded; the next readable one in place of an
    unreadable element); subclasses implement `raw`."""

    class_names: Sequence[str]

    def __len__(self) -> int:
        raise NotImplementedError

    def raw(self, index: int) -> dict:
        """The example with its image as stored; may raise `decode.Unreadable`."""
        raise NotImplementedError

    def _describe(self, index: int) -> str:
        return f"element {index}"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __getitem__(self, index: int) -> dict:
        return first_readable(self, index, lambda example: {**example, "image": decode.pixels(example["image"])})


def first_readable(source: Source, index: int, use):
    """`use(source.raw(i))` for the first i from `index` on (cyclically) whose image reads,
    reporting the unreadable ones; a clear error after 100 in a row."""
    n = len(source)
    for attempt in range(min(n, 100)):
        try:
            return use(source.raw((index + attempt) % n))
        except decode.Unreadable as e:
            report_unreadable(e)
    raise DataError(f"100 consecutive unreadable images from {source._describe(index)} on; "
                    "is this really an image dataset?")


class ArraySource(Source):
    """In-memory images and labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str]):
        self.images, self.labels, self.class_names = images, labels, list(class_names)

    def __len__(self):
        return len(self.labels)

    def raw(self, index):
        return {"image": self.images[index], "label": int(self.labels[index])}


def digits(split: str, test_fraction: float = 0.2) -> ArraySource:
    """scikit-learn's 1,797 handwritten 8x8 digits (bundled: works offline), as RGB uint8, with a
    fixed stratified-by-chance split: "train" (80%), "test" (20%) or "all"."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.repeat(np.round(data.images * (255 / 16)).astype(np.uint8)[..., None], 3, axis=-1)
    order = np.random.RandomState(0).permutation(len(images))
    n_test = int(round(len(images) * test_fraction))
    index = {"test": order[:n_test], "train": order[n_test:], "all": order}
    if split not in index:
        raise DataError(f"digits has splits train, test, all; not {split!r}")
    pick = np.sort(index[split])
    return ArraySource(images[pick], data.target[pick], [str(d) for d in range(10)])


def _in_validation(relative_path: str, fraction: float) -> bool:
    """Stable split membership from the file's path: adding files never moves the others."""
    h = int.from_bytes(hashlib.md5(relative_path.encode()).digest()[:4], "little")
    return h / 2 ** 32 < fraction


class _Layout:
    """What a folder scan found besides the images it reads, to warn about once each."""

    def __init__(self):
        self.counts, self.nested, self.other = {}, 0, []

    def warn(self, root: str, classes: list[str]) -> None:
        empty = [c for c in classes if not self.counts.get(c)]
        if empty:
            warn_once((root, "empty"), "%s: %d class folder(s) without images, which still count as classes: %s",
                      root, len(empty), ", ".join(empty[:10]))
        if len(classes) == 1:
            warn_once((root, "single"), "%s has a single class folder (%s): every image has the same label, so "
                      "accuracy is trivially 100%%; expected %s/<class>/<image> with one folder per class",
                      root, classes[0], root)
        if self.nested:
            warn_once((root, "nested"), "%s: %d images in subfolders of class folders are ignored (only "
                      "<class>/<image> is read)", root, self.nested)
        if self.other:
            warn_once((root, "other"), "%s: %d files that are not images (%s) are ignored, e.g. %s", root,
                      len(self.other), ", ".join(IMAGE_SUFFIXES), ", ".join(self.other[:3]))


class FolderSource(Source):
    """``root/<class>/<image>``: classes are the sorted subfolder names."""

    def __init__(self, root: str, split: str = "all", val_fraction: float = 0.1):
        root = os.path.expanduser(root)
        if not os.path.isdir(root):
            raise DataError(f"data directory {root} does not exist; extract the dataset there "
                            f"(one subfolder per class) or fix config.data.dataset")
        if split not in ("train", "val", "all"):
            raise DataError(f"an image folder has splits train, val (config.data.val_fraction "
                            f"of it, chosen by file path) and all; not {split!r}")
        self.root = root
        self.class_names = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not self.class_names:
            raise DataError(f"{root} has no class subfolders; expected {root}/<class>/<image>")
        files, labels, layout = [], [], _Layout()
        for label, name in enumerate(self.class_names):
            for entry in sorted(os.scandir(os.path.join(root, name)), key=lambda e: e.name):
                if entry.is_dir():
                    layout.nested += sum(f.lower().endswith(IMAGE_SUFFIXES) for _, _, fs in os.walk(entry.path) for f in fs)
                    continue
                if not entry.name.lower().endswith(IMAGE_SUFFIXES):
                    layout.other.append(f"{name}/{entry.name}")
                    continue
                layout.counts[name] = layout.counts.get(name, 0) + 1
                rel = f"{name}/{entry.name}"
                if split == "all" or (split == "val") == _in_validation(rel, val_fraction):
                    files.append(rel)
                    labels.append(label)
        layout.warn(root, self.class_names)
        if not files:
            raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) for split {split!r} under {root}")
        self.files, self.labels = files, np.asarray(labels, np.int64)

    def __len__(self):
        return len(self.files)

    def _describe(self, index):
        return os.path.join(self.root, self.files[index])

    def raw(self, index):
        return {"image": read_file(self._describe(index)), "label": int(self.labels[index])}


class TfdsSource(Source):
    """A prepared TFDS dataset read through `tfds.data_source` (ArrayRecord; no TensorFlow)."""

    def __init__(self, name: str, split: str, data_dir: str | None = None):
        import tensorflow_datasets as tfds

        try:
            self.source = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                           decoders={"image": tfds.decode.SkipDecoding()})
            info = tfds.builder(name, data_dir=data_dir).info
        except tfds.core.registered.DatasetNotFoundError:
            raise DataError(f"TFDS has no dataset {name!r}") from None
        except Exception as e:  # noqa: BLE001  (tfds raises many kinds for "not prepared")
            raise DataError(
                f"TFDS dataset {name} (split {split!r}) cannot be read from data_dir "
                f"{data_dir or '~/tensorflow_datasets'}: {type(e).__name__}: {str(e).splitlines()[0]}\n"
                f"Prepare it in ArrayRecord format (tfds build {name} --file_format=array_record "
                f"--data_dir=DIR) and set config.data.data_dir=DIR") from None
        self.name = name
        self.class_names = list(info.features["label"].names)

    def __len__(self):
        return len(self.source)

    def _describe(self, index):
        return f"{self.name} record {index}"

    def raw(self, index):
        record = self.source[index]
        return {"image": decode.EncodedImage(record["image"], self._describe(index)), "label": int(record["label"])}


def labels_of(source: Source) -> np.ndarray:
    """All labels of a source: kept in memory by the digits and folder sources; read (with a
    progress bar) from the records otherwise."""
    labels = getattr(source, "labels", None)
    if labels is None:
        from tqdm import tqdm
        labels = [source.raw(i)["label"] for i in tqdm(range(len(source)), desc="reading labels")]
    return np.asarray(labels, np.int64)


def open_source(dataset: str, split: str, *, data_dir: str | None = None,
                val_fraction: float = 0.1) -> Source:
    """A source from a dataset name (see module docstring)."""
    kind, _, arg = dataset.partition(":")
    if kind == "digits" and not arg:
        return digits(split)
    if kind == "folder" and arg:
        return FolderSource(arg, split, val_fraction)
    if kind == "tfds" and arg:
        return TfdsSource(arg, split, data_dir)
    raise DataError(f"unknown dataset {dataset!r}; use digits, folder:/path/to/root or tfds:NAME")
