"""The per-worker read pipeline: which shards a DataLoader worker reads, and the stages it runs.

Why in its own module: this is the part that runs inside DataLoader worker processes. Exact
mode reads this rank's shards for the epoch split among workers (each sample once); resampled
mode draws shards with replacement forever (the main process takes a fixed number of batches).
Everything random is seeded by (seed, epoch, rank, worker), and augmentation per sample by
(seed, epoch, rank, worker, position), so a run is reproducible for a fixed worker count and a
resumed epoch skips consumed samples without decoding them. Failures travel to the main
process as data (``WorkerFailure``) so the user sees the original one-line error instead of a
worker traceback.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Iterator

from torch.utils.data import IterableDataset, get_worker_info

from asnn_dist.data.errors import DataError, UnreachableError
from asnn_dist.data.recipes import TransformSpec
from asnn_dist.data.samples import (Skipped, WorkerBatch, WorkerEnd, batched, decoded, numbered, read_shards,
                                    shuffled)
from asnn_dist.data.sharding import derive_seed


@dataclass(frozen=True)
class WorkerFailure:
    """A DataError caught in a worker, carried to the main process as data.

    Why: torch re-raises worker exceptions with the whole worker traceback glued into the
    message; passing the message (and whether the storage was unreachable) lets the loader
    raise the original one-line error.
    """

    message: str
    unreachable: bool = False

    def error(self) -> DataError:
        """The exception to raise in the main process."""
        return UnreachableError(self.message) if self.unreachable else DataError(self.message)


@dataclass(frozen=True)
class StreamSpec:
    """What one rank streams this epoch (picklable; every worker derives its own part)."""

    urls: tuple[str, ...]  # exact: this rank's shards in epoch order; resampled: all shards
    sizes: tuple[int, ...]  # manifest sample counts, aligned with urls
    batch_size: int
    ext: str
    num_classes: int
    transform: TransformSpec
    shuffle_buffer: int  # samples in the per-worker shuffle buffer (train only; <= 1: off)
    seed: int
    epoch: int
    rank: int
    train: bool = True  # shuffle samples (eval streams keep the written order)
    resampled: bool = False
    skip: tuple[int, ...] = ()  # resume: samples already consumed per worker (not decoded again)
    s3_settings: Any = None  # applied in workers so spawned ones reach the same endpoint


def _resampled_shards(spec: StreamSpec, rng: random.Random) -> Iterator[tuple[str, int]]:
    while True:
        index = rng.randrange(len(spec.urls))
        yield spec.urls[index], spec.sizes[index]


class RankStream(IterableDataset["WorkerBatch | Skipped | WorkerEnd | WorkerFailure"]):
    """One rank's stream for one epoch, split among DataLoader workers; yields worker batches.

    In exact mode workers yield full batches plus at most one partial batch at their end, then
    a ``WorkerEnd``; the main process puts them in a fixed order (ordering.py) and merges
    partials (rebatch.py). ``Skipped`` reports come along the batches.
    """

    def __init__(self, spec: StreamSpec) -> None:
        super().__init__()
        self.spec = spec

    def _stages(self, worker: int, num_workers: int) -> Iterator[WorkerBatch | Skipped | WorkerEnd]:
        spec = self.spec
        ids = (spec.seed, spec.epoch, spec.rank, worker)
        if spec.resampled:
            shards: Any = _resampled_shards(spec, random.Random(derive_seed("resample", *ids)))
        else:
            shards = list(zip(spec.urls, spec.sizes))[worker::num_workers]
        skip = spec.skip[worker] if worker < len(spec.skip) else 0
        stream: Any = read_shards(shards, lazy=skip > 0)
        if spec.train and spec.shuffle_buffer > 1:
            stream = shuffled(stream, spec.shuffle_buffer, random.Random(derive_seed("samples", *ids)))
        transform = spec.transform.build(derive_seed("augment", *ids))
        seed_for = (lambda position: derive_seed("augment", *ids, position)) if spec.transform.augment else None
        stream = decoded(numbered(stream, skip), transform, spec.ext, spec.num_classes, seed_for)
        return batched(stream, spec.batch_size, worker, end=not spec.resampled)

    def __iter__(self) -> Iterator[WorkerBatch | Skipped | WorkerEnd | WorkerFailure]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.spec.s3_settings is not None and info is not None:
            from asnn_dist.data import s3

            s3.configure(self.spec.s3_settings)
        try:
            yield from self._stages(worker, num_workers)
        except DataError as exn:
            yield WorkerFailure(str(exn), isinstance(exn, UnreachableError))
