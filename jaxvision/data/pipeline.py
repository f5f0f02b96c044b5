"""grain pipelines that feed the mesh.

Training data is a grain `MapDataset` all the way to the batch: the source shuffled with a fresh
permutation every epoch, augmented with per-element generators, cut into per-process chunks of
which each process takes its own. So batch `k` is a pure function of (seed, k), whatever the
number of processes: resuming at step `k` means slicing at `k`, and the iterator position saved in
a checkpoint is just that number. Host batches become global
`jax.Array`s (`jax.make_array_from_process_local_data`) in a background thread that keeps a few
steps ahead of the device.
"""

from __future__ import annotations

import math
import queue
import threading
from typing import Iterator

import grain
import jax
import numpy as np

from jaxvision.data.sources import Source, labels_of
from jaxvision.parallel.mesh import batch_sharding


def _read(ds: grain.MapDataset, threads: int, workers: int) -> grain.IterDataset:
    out = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * max(threads, 1)))
    if workers > 0:
        out = out.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return out


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
                  threads: int = 4, workers: int = 0, balanced: bool = False) -> Iterator[dict]:
    """Endless host batches of `batch_size` (this process's share of each global batch) from
    batch `start_step` on: each epoch a fresh permutation of the source (or, with `balanced`, a
    class-balanced draw). The global stream is the same for any number of processes: process p
    of n takes the p-th of every n consecutive chunks, i.e. its contiguous slice of each global
    batch, so runs on 1 or n hosts see identical global batches and can resume one another."""
    if balanced:
        ds = grain.MapDataset.range(len(source)).repeat().map_with_index(
            BalancedOrder(labels_of(source), seed)).map(source.__getitem__).seed(seed)
    else:
        ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat()
    ds = ds.random_map(transform).batch(batch_size, drop_remainder=True)
    ds = ds[jax.process_index()::jax.process_count()][start_step:]
    return iter(_read(ds, threads, workers))


def num_eval_batches(num_examples: int, batch_size: int) -> int:
    """Batches every process runs, so all processes take part in every eval step."""
    return math.ceil(math.ceil(num_examples / jax.process_count()) / batch_size)


class _EvalExample:
    """The transformed example at an index, or, for an unreadable image, a blank one with
    `valid` 0 that the batch's mask leaves out (never another image in its place)."""

    def __init__(self, source: Source, transform):
        self.source, self.transform = source, transform

    def __call__(self, index: int) -> dict:
        example = self.source.load(index)
        if example is None:
            size = self.transform.size
            return {"image": np.zeros((size, size, 3), np.uint8), "label": 0, "valid": False}
        return {**self.transform(example), "valid": True}


def eval_batches(source: Source, transform, *, batch_size: int, threads: int = 4) -> Iterator[dict]:
    """This process's share of the whole split, in order, each batch padded to `batch_size` with a
    `mask` marking real, readable examples; every process yields the same number of batches."""
    ds = grain.MapDataset.range(len(source))[jax.process_index()::jax.process_count()]
    ds = ds.map(_EvalExample(source, transform)).batch(batch_size, drop_remainder=False)
    template = None
    count = 0
    for batch in _read(ds, threads, 0):
        template = batch
        yield pad_batch(batch, batch_size, len(batch["label"]))
        count += 1
    for _ in range(num_eval_batches(len(source), batch_size) - count):
        yield pad_batch({k: v[:0] for k, v in template.items()}, batch_size, 0)


def pad_batch(batch: dict, size: int, real: int) -> dict:
    """`batch` padded with zeros to `size`, its `mask` 1 for the first `real` examples that are
    `valid` (all of them when the batch has no `valid`)."""
    valid = batch.get("valid", np.ones(len(batch["label"]), bool))
    out = {k: np.concatenate([v, np.zeros((size - len(v),) + v.shape[1:], v.dtype)])
           for k, v in batch.items() if k != "valid"}
    out["mask"] = ((np.arange(size) < real) & np.pad(np.asarray(valid, bool), (0, size - len(valid)))).astype(np.float32)
    return out


def to_global(batch: dict, mesh) -> dict:
    """Process-local numpy batch -> global `jax.Array`s sharded over the data-parallel axes."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
            for k, v in batch.items()}


def prefetch_to_mesh(batches: Iterator[dict], mesh, size: int = 2) -> Iterator[dict]:
    """Put batches on the devices `size` steps ahead, in a background thread, so host-to-device
    copies overlap the step. Errors in the pipeline are re-raised in the consumer; closing the
    generator stops and joins the thread (a thread left inside a JAX call at interpreter exit
    aborts the process)."""
    q: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for batch in batches:
                if stop.is_set() or not put(to_global(batch, mesh)):
                    return
            put(done)
        except BaseException as e:  # noqa: BLE001  (handed to the consumer)
            put(e)

    thread = threading.Thread(target=produce, daemon=True, name="prefetch_to_mesh")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()
