"""grain pipelines that feed the mesh.

Training data is a grain `MapDataset` all the way to the batch: the source shuffled with a fresh
permutation every epoch, augmented with per-element generators, cut into per-process chunks of
which each process takes its own. So batch `k` is a pure function of (seed, k), whatever the
number of processes: resuming at step `k` means slicing at `k`, and the iterator position saved in
a checkpoint is just that number. Evaluation is a grain dataset too, padded to the same number of
full batches on every process. Host batches become global `jax.Array`s
(`jax.make_array_from_process_local_data`) in grain's prefetch thread, a few steps ahead of the
device (`on_mesh`).
"""

from __future__ import annotations

import functools
import math
import os

import grain
import jax
import numpy as np

from jaxvision.data.decode import Unreadable
from jaxvision.data.sources import Source, first_readable, labels_of, report_unreadable
from jaxvision.parallel.mesh import batch_sharding


def worker_count(workers: int) -> int:
    """`config.data.workers` resolved: -1 is one per core this process may run on."""
    return len(os.sched_getaffinity(0)) if workers == -1 else workers


def _read(ds: grain.MapDataset, threads: int, workers: int) -> grain.IterDataset:
    out = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * max(threads, 1)))
    workers = worker_count(workers)
    if workers > 0:
        out = out.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return out


def _with_position(position: int, index: int) -> tuple[int, int]:
    return position, index


class _TrainExample:
    """grain random map: (position in the stream, source index) -> transformed example, the image
    decoded as the transform needs, which also learns the index and the epoch (for alternating
    flips); an unreadable image is reported and the next readable one takes its place, so batches
    keep their size and the data stay a pure function of the step."""

    def __init__(self, source: Source, transform):
        self.source, self.transform = source, transform

    def __call__(self, element: tuple[int, int], rng: np.random.Generator) -> dict:
        position, index = map(int, element)
        epoch = position // len(self.source)
        return first_readable(self.source, index,
                              lambda example: self.transform(example, rng, index=index, epoch=epoch))


class BalancedOrder:
    """Index stream in which every class is drawn equally often: epoch e is len(labels) draws with
    replacement, probability proportional to 1 / (size of the sample's class), from a generator
    seeded by (seed, e). Random access, so it stays a pure function of the position."""

    def __init__(self, labels: np.ndarray, seed: int):
        counts = np.bincount(labels)
        weights = 1.0 / counts[labels]
        self.p, self.n, self.seed = weights / weights.sum(), len(labels), seed
        self._epoch, self._order = -1, None

    def __call__(self, position: int, _) -> int:
        epoch = position // self.n
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order, self._epoch = rng.choice(self.n, self.n, replace=True, p=self.p), epoch
        return int(self._order[position % self.n])


def train_batches(source: Source, transform, *, batch_size: int, seed: int, start_step: int = 0,
                  threads: int = 4, workers: int = 0, balanced: bool = False) -> grain.IterDataset:
    """Endless host batches of `batch_size` (this process's share of each global batch) from
    batch `start_step` on: each epoch a fresh permutation of the source (or, with `balanced`, a
    class-balanced draw). The global stream is the same for any number of processes: process p
    of n takes the p-th of every n consecutive chunks, i.e. its contiguous slice of each global
    batch, so runs on 1 or n hosts see identical global batches and can resume one another."""
    if balanced:
        ds = grain.MapDataset.range(len(source)).repeat().map_with_index(
            BalancedOrder(labels_of(source), seed)).seed(seed)
    else:
        ds = grain.MapDataset.range(len(source)).seed(seed).shuffle().repeat()
    ds = ds.map_with_index(_with_position).random_map(_TrainExample(source, transform))
    ds = ds.batch(batch_size, drop_remainder=True)
    ds = ds[jax.process_index()::jax.process_count()][start_step:]
    return _read(ds, threads, workers)


def num_eval_batches(num_examples: int, batch_size: int) -> int:
    """Batches every process runs, so all processes take part in every eval step."""
    return math.ceil(math.ceil(num_examples / jax.process_count()) / batch_size)


class _EvalExample:
    """The transformed example at position i of this process's share, or a blank one with `mask`
    0 that every metric leaves out: past the share's end (padding to full batches) or for an
    unreadable image (never another image in its place)."""

    def __init__(self, source: Source, transform, indices: np.ndarray):
        self.source, self.transform, self.indices = source, transform, indices

    def __call__(self, position: int) -> dict:
        if position < len(self.indices):
            try:
                example = self.transform(self.source.raw(int(self.indices[position])))
                return {**example, "mask": np.float32(1)}
            except Unreadable as e:
                report_unreadable(e)
        size = self.transform.size
        return {"image": np.zeros((size, size, 3), np.uint8), "label": np.int32(0), "mask": np.float32(0)}


def eval_batches(source: Source, transform, *, batch_size: int, threads: int = 4,
                 workers: int = 0) -> grain.IterDataset:
    """This process's share of the whole split, in order, in batches of `batch_size` with a `mask`
    marking real, readable examples; every process yields the same number of batches."""
    indices = np.arange(len(source))[jax.process_index()::jax.process_count()]
    total = num_eval_batches(len(source), batch_size) * batch_size
    ds = grain.MapDataset.range(total).map(_EvalExample(source, transform, indices))
    return _read(ds.batch(batch_size), threads, workers)


def pad_batch(batch: dict, size: int, real: int) -> dict:
    """`batch` padded with zeros to `size`, with a `mask` 1 for its first `real` examples."""
    out = {k: np.concatenate([v, np.zeros((size - len(v),) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
    out["mask"] = (np.arange(size) < real).astype(np.float32)
    return out


def to_global(batch: dict, mesh) -> dict:
    """Process-local numpy batch -> global `jax.Array`s sharded over the data-parallel axes."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
            for k, v in batch.items()}


def on_mesh(batches: grain.IterDataset, mesh, size: int = 2) -> grain.DatasetIterator:
    """The batches as global arrays, put on the devices `size` steps ahead by grain's prefetch
    thread so that host-to-device copies overlap the step; pipeline errors are raised in the
    consumer. Close it when done: that joins the thread (one left inside a JAX call at
    interpreter exit aborts the process)."""
    placed = batches.map(functools.partial(to_global, mesh=mesh))
    return iter(grain.experimental.ThreadPrefetchIterDataset(placed, prefetch_buffer_size=size))
