"""ShardLoader: the streaming, rank-aware loader the training loop iterates over.

Why: equal work at any scale. In exact mode each rank reads its own slice of an epoch-shuffled
shard list (every sample read exactly once per epoch over all ranks and workers) and every rank
yields the same number of full batches, with a ``valid`` mask on padding rows (rebatch.py), so
collectives never wait on a rank that ran out early and evaluation counts each sample once.
Resampled mode draws shards with replacement for a fixed number of batches per rank (no shard
count requirement). Corrupt samples are skipped and counted (``skipped_samples``), and the
position in the epoch can be saved and restored (``state_dict``) to resume mid-epoch: the
resumed loader skips the consumed samples without decoding them and yields the very batches
an uninterrupted pass would have (augmentation is seeded per sample by its stream position, and
the main process puts worker batches in a fixed order, ordering.py).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import random
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, get_worker_info

from asnn_dist.data.errors import DataError
from asnn_dist.data.loaderstate import LoaderPosition
from asnn_dist.data.manifest import Manifest, load_manifest
from asnn_dist.data.ordering import ordered
from asnn_dist.data.pipeline import RankStream, StreamSpec, WorkerFailure
from asnn_dist.data.rebatch import rebatch
from asnn_dist.data.recipes import RECIPES, TransformSpec
from asnn_dist.data.samples import Skipped
from asnn_dist.data.sharding import (
    batches_per_rank,
    check_enough_shards,
    derive_seed,
    rank_shards,
    resampled_batches,
)

log = logging.getLogger(__name__)
LoaderBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
KeyedBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]
MODES = ("exact", "resampled")


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
    ``recipe`` picks the transforms ("digits", "cifar", "imagenet", or a ``TransformSpec`` for
    finer control); random augmentation runs only when ``train`` and ``augment``.
    ``mode="resampled"`` yields ``ceil(epoch_length / (world_size * batch_size))`` batches per
    rank drawn with replacement (default epoch_length: the split's sample count).
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
        recipe: str | TransformSpec = "digits",
        mode: str = "exact",
        epoch_length: int | None = None,
        s3_endpoint_url: str | None = None,
        pin_memory: bool = False,
        log_skipped: int = 20,
    ) -> None:
        if s3_endpoint_url is not None:  # before a manifest URL on that endpoint is read
            from asnn_dist.data import s3

            s3.configure(endpoint_url=s3_endpoint_url)
        self.manifest = load_manifest(manifest) if isinstance(manifest, str) else manifest
        self.urls = self.manifest.shard_urls()
        where = f"split {self.manifest.split!r} at {self.manifest.base_url}"
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world_size {world_size}")
        if num_workers < 0:
            raise DataError(f"num_workers must be >= 0, got {num_workers}")
        if mode not in MODES:
            raise DataError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if mode == "resampled" and not train:
            raise DataError(f"{where}: evaluation needs mode='exact' (each sample once); "
                            "resampled epochs are for training")
        if mode == "exact":
            check_enough_shards(len(self.urls), world_size, num_workers, where)
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.train = train
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.augment = augment
        self.max_shift = max_shift
        self.mode = mode
        self.epoch_length = epoch_length if epoch_length is not None else self.manifest.num_samples
        self.pin_memory = pin_memory
        self.log_skipped = log_skipped
        self.transform = self._transform_spec(recipe, image_size)
        self.image_size = self.transform.image_size or 0
        self._sizes = [s.num_samples for s in self.manifest.shards]
        self._s3_settings = self._s3()
        self.position = LoaderPosition(max(1, num_workers))
        self.skipped_samples = 0  # corrupt samples skipped this epoch (log it with the metrics)
        self.skipped_reasons: list[str] = []  # the first few reasons, one line each
        self._pass_skipped = 0
        self._counted: list[tuple[int, int]] = []  # (worker, position) of the reports counted this epoch
        self._ahead = [0] * max(1, num_workers)  # restored: reports counted before the stop, not yet passed

    @property
    def epoch(self) -> int:
        return self.position.epoch

    @property
    def batches_consumed(self) -> int:
        """Batches of the current epoch already handed out (what a resumed run skips)."""
        return self.position.batches

    def _transform_spec(self, recipe: str | TransformSpec, image_size: int | None) -> TransformSpec:
        spec = recipe if isinstance(recipe, TransformSpec) else None
        name = spec.recipe if spec is not None else str(recipe)
        if name not in RECIPES:
            raise DataError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
        size = image_size or (spec.image_size if spec is not None else None)
        if size is None:
            size = 224 if name == "imagenet" else self._native_size()
        changes = dict(recipe=name, channels=self.manifest.image.channels, image_size=size,
                       augment=self.train and self.augment, max_shift=self.max_shift)
        return dataclasses.replace(spec or TransformSpec(), **changes)

    def _native_size(self) -> int:
        image = self.manifest.image
        if image.height != image.width or image.height == 0:
            raise DataError(
                f"split {self.manifest.split!r} at {self.manifest.base_url}: images are "
                f"{image.height}x{image.width} (0 = varying); set image_size to batch them"
            )
        return image.height

    def _s3(self) -> Any:
        """This process's S3 settings, handed to workers (spawned ones start with defaults)."""
        if not any(u.startswith("s3://") for u in self.urls):
            return None
        from asnn_dist.data import s3

        return s3.settings()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (a new one starts at its first batch; the restored one continues)."""
        if epoch != self.position.epoch:
            self.position.start_epoch(epoch)
            self._reset_skipped()

    def __len__(self) -> int:
        """Batches per epoch on every rank (the whole epoch, also after a mid-epoch restore)."""
        if self.mode == "resampled":
            return resampled_batches(self.epoch_length, self.world_size, self.batch_size)
        return batches_per_rank(
            self._sizes, self.world_size, self.batch_size, self.epoch, self.seed, self.train
        )

    def state_dict(self) -> dict[str, Any]:
        """The loader's position (epoch, batches consumed, per-worker sample positions); JSON-able.

        It is per rank: save each rank's own (all ranks have the same ``batches_consumed``).
        """
        ahead = [0] * len(self._ahead)
        for worker, position in self._counted:  # counted, but a resumed stream reports them again
            if position >= self.position.samples[worker]:
                ahead[worker] += 1
        return {**self.position.state(self._layout(), self.skipped_samples), "reports_ahead": ahead}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the saved epoch at the saved batch on the next iteration.

        With another rank/worker/batch layout the epoch's remaining batch count is kept (so ranks
        stay in step) but its samples restart from the epoch's beginning, with a warning.
        """
        self._reset_skipped()
        self.skipped_samples = self.position.restore(state, self._layout(), len(self), self.mode)
        ahead = [int(a) for a in state.get("reports_ahead", [])]
        if len(ahead) == len(self._ahead) and not self.position.restarted:
            self._ahead = ahead

    def _reset_skipped(self) -> None:
        self.skipped_samples = 0
        self.skipped_reasons = []
        self._counted = []
        self._ahead = [0] * len(self._ahead)

    def _layout(self) -> dict[str, Any]:
        return {"mode": self.mode, "rank": self.rank, "world_size": self.world_size,
                "num_workers": self.num_workers, "batch_size": self.batch_size, "seed": self.seed}

    def rank_shard_indices(self, epoch: int | None = None) -> list[int]:
        """Manifest indices of the shards this rank reads in ``epoch`` (default: current)."""
        epoch = self.epoch if epoch is None else epoch
        return rank_shards(len(self._sizes), self.rank, self.world_size, epoch, self.seed, self.train)

    def num_rank_samples(self, epoch: int | None = None) -> int:
        """Real (valid) samples this rank yields in ``epoch``; the rest of ``len()*B`` is padding."""
        if self.mode == "resampled":
            return len(self) * self.batch_size
        return sum(self._sizes[i] for i in self.rank_shard_indices(epoch))

    def _spec(self, skip: list[int]) -> StreamSpec:
        if self.mode == "resampled":
            urls, sizes = self.urls, self._sizes
        else:
            order = self.rank_shard_indices()
            urls, sizes = [self.urls[i] for i in order], [self._sizes[i] for i in order]
        return StreamSpec(
            urls=tuple(urls), sizes=tuple(sizes), batch_size=self.batch_size,
            ext=self.manifest.image.ext, num_classes=self.manifest.num_classes,
            transform=self.transform, shuffle_buffer=self.shuffle_buffer, seed=self.seed,
            epoch=self.epoch, rank=self.rank, train=self.train,
            resampled=self.mode == "resampled", skip=tuple(skip), s3_settings=self._s3_settings,
        )

    def _note_skipped(self, item: Skipped) -> None:
        """Count a report once per epoch, also across a resume: reports before the resumed
        position come back ``replayed``, and the first ``_ahead[w]`` others of worker w were
        counted before the stop."""
        self._pass_skipped += item.count
        if item.replayed:
            return
        worker = max(item.worker, 0)
        self._counted.append((worker, item.position))
        if self._ahead[worker] > 0:
            self._ahead[worker] -= 1
            return
        self.skipped_samples += item.count
        if len(self.skipped_reasons) < self.log_skipped:
            self.skipped_reasons.append(item.reason)
            log.warning("skipped %d corrupt sample(s): %s", item.count, item.reason)

    def _worker_batches(self, skip: list[int], done: list[int], note: bool = True) -> Iterator[tuple[Any, ...]]:
        """Batches from the workers (or in-process) in the fixed order of ``ordered``, starting at
        per-worker sample positions ``skip`` and batch counts ``done`` (updated in place); counts
        skips when ``note``, raises worker failures."""
        for item in ordered(self._worker_items(skip), self.batch_size, done):
            if isinstance(item, Skipped):
                if note:
                    self._note_skipped(item)
                continue
            yield item

    def _worker_items(self, skip: list[int]) -> Iterator[object]:
        """Everything the workers send, as it arrives; raises worker failures."""
        stream = RankStream(self._spec(skip))
        if self.num_workers == 0 or get_worker_info() is not None:
            source: Iterator[object] = iter(stream)
        else:
            source = iter(DataLoader(
                stream, batch_size=None, num_workers=self.num_workers, persistent_workers=False,
                collate_fn=_passthrough, pin_memory=self.pin_memory,
                worker_init_fn=functools.partial(_seed_worker, (self.seed, self.epoch, self.rank)),
            ))
        try:
            for item in source:
                if isinstance(item, WorkerFailure):
                    raise item.error()
                yield item
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()  # in-process generators; DataLoader iterators stop their workers when dropped

    def _filler(self) -> tuple[Any, ...]:
        size, channels, b = self.image_size, self.manifest.image.channels, self.batch_size
        none = torch.full((b,), -1, dtype=torch.int64)
        return torch.zeros(b, channels, size, size), torch.zeros(b, dtype=torch.int64), [""] * b, none, none

    def iter_with_keys(self) -> Iterator[KeyedBatch]:
        """Like iterating the loader, plus the sample key of every row (padding rows included)."""
        if self.position.batches == 0:
            self._reset_skipped()
        self._pass_skipped = 0
        remaining = len(self) - self.position.batches
        if remaining <= 0:
            self.position.finish_pass()
            return
        if self.mode == "resampled":
            yield from self._resampled(remaining)
        else:
            yield from self._exact(remaining)
        self.position.finish_pass()

    def _exact(self, remaining: int) -> Iterator[KeyedBatch]:
        where = f"rank {self.rank} of split {self.manifest.split!r} at {self.manifest.base_url}"
        pos = self.position
        expected = self.num_rank_samples() - sum(pos.samples)
        batches = rebatch(
            self._worker_batches(list(pos.samples), pos.worker_batches), self.batch_size, remaining, expected, where,
            skipped=lambda: self._pass_skipped, filler=self._last_real_batch, truncate=pos.restarted,
        )
        before = pos.snapshot()
        for images, labels, valid, keys, origin, positions in batches:
            pos.consumed(origin[valid], positions[valid], before if bool(valid.any()) else None)
            yield images, labels, valid, keys
            before = pos.snapshot()

    def _last_real_batch(self) -> tuple[Any, ...]:
        """What padding batches repeat when a pass resumed after the last batch with real rows:
        that batch, rebuilt from the anchor (zeros where there is none, as for a rank without
        samples)."""
        anchor = self.position.anchor
        if anchor is None or self.position.restarted:
            return self._filler()
        source = self._worker_batches(list(anchor["samples"]), list(anchor["worker_batches"]), note=False)
        batches = rebatch(source, self.batch_size, 1, 0, "replay", filler=self._filler, truncate=True)
        try:
            images, labels, _, keys, origin, positions = next(batches)
        finally:
            batches.close()
        return images, labels, keys, origin, positions

    def _resampled(self, remaining: int) -> Iterator[KeyedBatch]:
        valid = torch.ones(self.batch_size, dtype=torch.bool)
        pos = self.position
        source = self._worker_batches(list(pos.samples), pos.worker_batches)
        try:
            for _ in range(remaining):
                images, labels, keys, origin, positions = next(source)
                pos.consumed(origin, positions)
                yield images, labels, valid.clone(), keys
        finally:
            source.close()  # stops the endless workers

    def __iter__(self) -> Iterator[LoaderBatch]:
        for images, labels, valid, _ in self.iter_with_keys():
            yield images, labels, valid
