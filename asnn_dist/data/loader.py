"""ShardLoader: the streaming, rank-aware loader the training loop iterates over.

Why: exact epochs at any scale. Each rank reads its own slice of an epoch-shuffled shard list
(every sample read exactly once per epoch over all ranks and workers), and every rank yields the
same number of full batches with a ``valid`` mask on padding rows (see rebatch.py), so
collectives never wait on a rank that ran out early and evaluation counts each sample once.
"""

from __future__ import annotations

import functools
import random
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, get_worker_info

from asnn_dist.data.errors import DataError
from asnn_dist.data.manifest import Manifest, load_manifest
from asnn_dist.data.pipeline import RankStream, WorkerFailure
from asnn_dist.data.rebatch import OutBatch as KeyedBatch
from asnn_dist.data.rebatch import rebatch
from asnn_dist.data.sharding import batches_per_rank, check_enough_shards, derive_seed, rank_shards

LoaderBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _seed_worker(base: tuple[int, int, int], worker_id: int) -> None:
    """Seed global RNGs in a DataLoader worker from (seed, epoch, rank, worker)."""
    seed = derive_seed("worker", *base, worker_id)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _passthrough(batch: object) -> object:
    """DataLoader collate_fn: workers already batch; keep tensors and key lists as they are."""
    return batch


class ShardLoader:
    """Iterate ``(images [B,C,H,W] float32, labels [B] int64, valid [B] bool)`` batches.

    ``len()`` is the same on every rank; call ``set_epoch`` before each epoch (train mode
    reshuffles shards with ``seed + epoch`` and samples within a per-worker buffer).
    ``iter_with_keys()`` also yields each row's sample key (for tests and debugging).
    """

    def __init__(
        self,
        manifest: Manifest | str,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        train: bool = True,
        image_size: int | None = None,
        seed: int = 0,
        shuffle_buffer: int = 256,
        augment: bool = False,
        max_shift: int | None = None,
    ) -> None:
        self.manifest = load_manifest(manifest) if isinstance(manifest, str) else manifest
        self.urls = self.manifest.shard_urls()
        where = f"split {self.manifest.split!r} at {self.manifest.base_url}"
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        if num_workers < 0:
            raise DataError(f"num_workers must be >= 0, got {num_workers}")
        check_enough_shards(len(self.urls), world_size, num_workers, where)
        self.image_size = image_size or self._native_size()
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.train = train
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.augment = augment
        self.max_shift = max_shift
        self.epoch = 0
        self._sizes = [s.num_samples for s in self.manifest.shards]

    def _native_size(self) -> int:
        image = self.manifest.image
        if image.height != image.width or image.height == 0:
            raise DataError(
                f"split {self.manifest.split!r} at {self.manifest.base_url}: images are "
                f"{image.height}x{image.width} (0 = varying); set image_size to batch them"
            )
        return image.height

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; in train mode it reseeds shard order, shuffle and augmentation."""
        self.epoch = epoch

    def __len__(self) -> int:
        return batches_per_rank(
            self._sizes, self.world_size, self.batch_size, self.epoch, self.seed, self.train
        )

    def rank_shard_indices(self, epoch: int | None = None) -> list[int]:
        """Manifest indices of the shards this rank reads in ``epoch`` (default: current)."""
        epoch = self.epoch if epoch is None else epoch
        return rank_shards(len(self._sizes), self.rank, self.world_size, epoch, self.seed, self.train)

    def num_rank_samples(self, epoch: int | None = None) -> int:
        """Real (valid) samples this rank yields in ``epoch``; the rest of ``len()*B`` is padding."""
        return sum(self._sizes[i] for i in self.rank_shard_indices(epoch))

    def _stream(self) -> RankStream:
        image = self.manifest.image
        return RankStream(
            urls=[self.urls[i] for i in self.rank_shard_indices()],
            batch_size=self.batch_size,
            ext=image.ext,
            channels=image.channels,
            num_classes=self.manifest.num_classes,
            image_size=self.image_size,
            train=self.train,
            augment=self.augment,
            max_shift=self.max_shift,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            epoch=self.epoch,
            rank=self.rank,
        )

    def _worker_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        """Batches from the workers (or in-process), turning worker failures into DataError."""
        stream = self._stream()
        if self.num_workers == 0 or get_worker_info() is not None:
            source: Iterator[object] = iter(stream)
        else:
            source = iter(DataLoader(
                stream,
                batch_size=None,
                num_workers=self.num_workers,
                persistent_workers=False,
                collate_fn=_passthrough,
                worker_init_fn=functools.partial(_seed_worker, (self.seed, self.epoch, self.rank)),
            ))
        for item in source:
            if isinstance(item, WorkerFailure):
                raise DataError(item.message)
            yield item  # type: ignore[misc]

    def iter_with_keys(self) -> Iterator[KeyedBatch]:
        """Like iterating the loader, plus the sample key of every row (padding rows included)."""
        where = f"rank {self.rank} of split {self.manifest.split!r} at {self.manifest.base_url}"
        yield from rebatch(
            self._worker_batches(),
            self.batch_size,
            len(self),
            self.num_rank_samples(),
            where,
        )

    def __iter__(self) -> Iterator[LoaderBatch]:
        for images, labels, valid, _ in self.iter_with_keys():
            yield images, labels, valid
