"""The per-worker read pipeline: shard URLs -> decoded, shuffled, batched samples.

Why in its own module: this is the part that runs inside DataLoader worker processes, built from
webdataset stages (shard list, tar expansion, key grouping, shuffle buffer, batching) with our
own storage opener, so shards are read through ``storage`` (local today, s3:// next) and any
failure becomes a DataError naming the shard URL.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from asnn_dist.data import storage
from asnn_dist.data.errors import DataError
from asnn_dist.data.sharding import derive_seed
from asnn_dist.data.transforms import ImageTransform

Batch = tuple[torch.Tensor, torch.Tensor, list[str]]


@dataclass(frozen=True)
class WorkerFailure:
    """A DataError caught in a worker, carried to the main process as data.

    Why: torch re-raises worker exceptions with the whole worker traceback glued into the
    message; passing the message through lets the loader raise the original one-line error.
    """

    message: str


def open_shards(src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """{url} -> {url, stream}, opened through the storage layer (DataError when missing)."""
    for item in src:
        url = item["url"]
        yield {"url": url, "stream": storage.open_read(url)}


def expand_shards(src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Tar members of each shard as {fname, data, __url__}, then an end-of-shard marker {}."""
    for item in src:
        url, stream = item["url"], item["stream"]
        try:
            for member in tar_file_iterator(stream):
                member["__url__"] = url
                yield member
        except DataError:
            raise
        except Exception as exn:
            detail = str(exn).split(" @ ")[0] or type(exn).__name__
            raise DataError(
                f"{url}: unreadable shard ({detail}); check the file is a complete tar archive "
                "or rebuild the shards"
            ) from None
        finally:
            stream.close()
        # Keeps group_by_keys from merging the last sample of one shard with the next.
        yield {}


def decode_samples(
    src: Iterable[dict[str, Any]], transform: ImageTransform, ext: str, num_classes: int
) -> Iterator[tuple[torch.Tensor, int, str]]:
    """Grouped tar samples -> (image tensor, label, key)."""
    for sample in src:
        key, url = sample.get("__key__"), sample.get("__url__")
        where = f"sample {key!r} in {url}"
        if ext not in sample or "cls" not in sample:
            present = sorted(k for k in sample if not k.startswith("__"))
            raise DataError(
                f"{where}: expected entries '{ext}' and 'cls', found {present}; "
                "the shard does not match its manifest, rebuild the shards"
            )
        try:
            label = int(sample["cls"])
        except ValueError:
            raise DataError(f"{where}: label {sample['cls']!r} is not an integer; rebuild the shards") from None
        if not 0 <= label < num_classes:
            raise DataError(f"{where}: label {label} outside 0..{num_classes - 1}; rebuild the shards")
        yield transform(sample[ext], where), label, str(key)


def collate(samples: list[tuple[torch.Tensor, int, str]]) -> Batch:
    """(image, label, key) list -> (images [B, C, H, W], labels [B] int64, keys)."""
    images = torch.stack([s[0] for s in samples])
    labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)
    return images, labels, [s[2] for s in samples]


class RankStream(IterableDataset["Batch | WorkerFailure"]):
    """One rank's shards for one epoch, split among DataLoader workers; yields worker batches.

    Workers yield full batches plus at most one partial batch at their end; the main process
    merges partials (see rebatch.py). Shuffle and augmentation are seeded by (seed, epoch, rank,
    worker), so a run is reproducible for a fixed worker count.
    """

    def __init__(
        self,
        urls: list[str],
        batch_size: int,
        ext: str,
        channels: int,
        num_classes: int,
        image_size: int,
        train: bool,
        augment: bool,
        max_shift: int | None,
        shuffle_buffer: int,
        seed: int,
        epoch: int,
        rank: int,
    ) -> None:
        super().__init__()
        self.urls = urls
        self.batch_size = batch_size
        self.ext = ext
        self.channels = channels
        self.num_classes = num_classes
        self.image_size = image_size
        self.train = train
        self.augment = augment
        self.max_shift = max_shift
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epoch = epoch
        self.rank = rank

    def _stages(self, worker: int, num_workers: int) -> list[Any]:
        ids = (self.seed, self.epoch, self.rank, worker)
        transform = ImageTransform(
            self.channels,
            self.image_size,
            augment=self.train and self.augment,
            max_shift=self.max_shift,
            generator=torch.Generator().manual_seed(derive_seed("augment", *ids)),
        )
        stages: list[Any] = [
            wds.SimpleShardList(self.urls[worker::num_workers]),
            open_shards,
            expand_shards,
            group_by_keys,
        ]
        if self.train and self.shuffle_buffer > 1:
            rng = random.Random(derive_seed("samples", *ids))
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng))
        stages.append(
            functools.partial(
                decode_samples, transform=transform, ext=self.ext, num_classes=self.num_classes
            )
        )
        stages.append(wds.batched(self.batch_size, collation_fn=collate, partial=True))
        return stages

    def __iter__(self) -> Iterator[Batch | WorkerFailure]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        try:
            yield from wds.DataPipeline(*self._stages(worker, num_workers))
        except DataError as exn:
            yield WorkerFailure(str(exn))
