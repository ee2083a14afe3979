"""Worker-side sample stream stages: shards -> samples -> (shuffle) -> numbered -> decoded -> batches.

Why our own small stages around webdataset's tar reader: corrupt data must be *counted*, not
just dropped. A truncated shard keeps the samples before the cut and reports how many the
manifest promised but never came; a sample that fails to decode is reported with its key. The
reports (``Skipped``) travel down the stream as data, past shuffling and batching, to the main
process, which adds them to the epoch's ``skipped_samples``. A missing or unreadable shard is
still one DataError naming its URL. Every sample gets its position in this worker's (shuffled)
stream, so a resumed epoch can skip exactly the samples already consumed, without decoding them;
augmentation is seeded per sample by that position (``decoded``'s ``seed_for``), so a sample's
augmentation does not depend on how many samples before it were decoded or skipped.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch.utils.data import default_collate
from webdataset.tariterators import group_by_keys, tar_file_iterator

from asnn_dist.data import storage
from asnn_dist.data.errors import DataError
from asnn_dist.data.s3 import register_webdataset_scheme
from asnn_dist.data.shardwrite import IMAGE_EXTS
from asnn_dist.data.tarindex import materialize, scan_shard

register_webdataset_scheme()  # anyone streaming shards can also use wds.WebDataset("s3://...")

# (images [B, C, H, W], labels [B], keys, worker id per row [B], stream position per row [B])
WorkerBatch = tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Skipped:
    """``count`` samples left out of the epoch, and why (one line naming the shard or sample).

    ``worker`` (set by ``batched``) and ``position`` (in the worker's stream: the sample's, or
    the next sample's for a cut shard) let a resumed loader count each report once;
    ``replayed``: it came before a resumed stream's first position (counted before the stop).
    """

    count: int
    reason: str
    worker: int = -1
    position: int = -1
    replayed: bool = False


@dataclass(frozen=True)
class WorkerEnd:
    """A worker's stream ended (the main process then stops waiting for its next batch)."""

    worker: int


def _members(stream: Any, url: str, counter: list[int]) -> Iterator[dict[str, Any]]:
    for member in tar_file_iterator(stream):
        counter[0] += 1
        member["__url__"] = url
        yield member


def shard_samples(url: str, expected: int) -> Iterator[dict[str, Any] | Skipped]:
    """Samples of one shard; a cut-off shard yields what it holds plus a ``Skipped`` for the rest.

    DataError when the shard is missing, unreadable from its first byte, or holds more samples
    than its manifest entry (it was rewritten after the manifest).
    """
    stream = storage.open_read(url)
    members = [0]
    read = 0
    problem = ""
    try:
        for sample in group_by_keys(_members(stream, url, members)):
            read += 1
            if read > expected:
                raise DataError(
                    f"{url}: holds more samples than the manifest lists ({expected}); the shard "
                    "changed after its manifest was written, rebuild the shards"
                )
            yield sample
    except DataError:
        raise
    except Exception as exn:  # noqa: BLE001 - tarfile/IO errors of many kinds
        detail = " ".join(str(exn).split(" @ ")[0].split()) or type(exn).__name__
        if members[0] == 0:
            raise DataError(
                f"{url}: unreadable shard ({detail}); check it is a complete tar archive or "
                "rebuild the shards"
            ) from None
        problem = f" ({detail})"
    finally:
        stream.close()
    if read < expected:
        yield Skipped(expected - read, f"{url}: truncated tar, {read} of {expected} samples "
                                       f"readable{problem}; rebuild this shard")


def read_shards(shards: Iterable[tuple[str, int]], lazy: bool = False) -> Iterator[dict[str, Any] | Skipped]:
    """Samples of each (url, expected count) in turn. ``lazy`` (a resumed stream, which skips
    its first samples undecoded): local shards are read from their headers, and a sample's
    bytes only when it is decoded (``tarindex``); the samples are the same."""
    for url, expected in shards:
        indexed = scan_shard(url, expected) if lazy else None
        yield from indexed if indexed is not None else shard_samples(url, expected)


def shuffled(src: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle through a buffer of ``size`` items (fills up before the first item comes out)."""
    buffer: list[Any] = []
    for item in src:
        if len(buffer) < size:
            buffer.append(item)
            continue
        index = rng.randrange(size)
        buffer[index], item = item, buffer[index]
        yield item
    rng.shuffle(buffer)
    yield from buffer


def numbered(src: Iterable[Any], skip: int = 0) -> Iterator[tuple[int, dict[str, Any]] | Skipped]:
    """(position, sample) for samples at positions >= ``skip``; ``Skipped`` reports pass through,
    marked ``replayed`` when they came before position ``skip`` (a resumed epoch counted them)."""
    position = 0
    for item in src:
        if isinstance(item, Skipped):
            yield dataclasses.replace(item, position=position, replayed=position < skip)
            continue
        if position >= skip:
            yield position, item
        position += 1


def _image_bytes(sample: dict[str, Any], ext: str) -> bytes | None:
    if ext in sample:
        return sample[ext]
    return next((sample[e] for e in IMAGE_EXTS if e in sample), None)


def decoded(
    src: Iterable[Any], transform: Callable[[bytes, str], torch.Tensor], ext: str, num_classes: int,
    seed_for: Callable[[int], int] | None = None,
) -> Iterator[tuple[torch.Tensor, int, str, int] | Skipped]:
    """(image, label, key, position) per sample; undecodable or incomplete samples become ``Skipped``.

    With ``seed_for``, ``transform.reseed(seed_for(position))`` runs before every sample, so its
    augmentation is a function of its position alone (a resumed stream draws the same crops).
    """
    for item in src:
        if isinstance(item, Skipped):
            yield item
            continue
        position, sample = item
        sample = materialize(sample)
        where = f"sample {sample.get('__key__')!r} in {sample.get('__url__')}"
        data = _image_bytes(sample, ext)
        if data is None or "cls" not in sample:
            present = sorted(k for k in sample if not k.startswith("__"))
            yield Skipped(1, f"{where}: incomplete sample (entries {present}, expected '{ext}' and 'cls')",
                          position=position)
            continue
        try:
            label = int(sample["cls"])
        except ValueError:
            yield Skipped(1, f"{where}: label {sample['cls'][:20]!r} is not an integer", position=position)
            continue
        if not 0 <= label < num_classes:
            yield Skipped(1, f"{where}: label {label} outside 0..{num_classes - 1}", position=position)
            continue
        if seed_for is not None:
            transform.reseed(seed_for(position))  # type: ignore[attr-defined]
        try:
            image = transform(data, where)
        except DataError as exn:
            yield Skipped(1, str(exn), position=position)
            continue
        yield image, label, str(sample["__key__"]), position


def batched(
    src: Iterable[Any], batch_size: int, worker: int, end: bool = False
) -> Iterator[WorkerBatch | Skipped | WorkerEnd]:
    """Full batches, then one partial batch at the end (and a ``WorkerEnd`` when ``end``);
    ``Skipped`` reports pass through at once, tagged with ``worker``."""
    rows: list[tuple[torch.Tensor, int, str, int]] = []
    for item in src:
        if isinstance(item, Skipped):
            yield dataclasses.replace(item, worker=worker)
            continue
        rows.append(item)
        if len(rows) == batch_size:
            yield collate(rows, worker)
            rows = []
    if rows:
        yield collate(rows, worker)
    if end:
        yield WorkerEnd(worker)


def collate(rows: list[tuple[torch.Tensor, int, str, int]], worker: int) -> WorkerBatch:
    """Stack rows into a worker batch tagged with the worker id.

    ``default_collate`` stacks straight into shared memory inside a DataLoader worker, saving
    the copy torch would otherwise make to send the batch to the main process.
    """
    images = default_collate([r[0] for r in rows])
    labels = torch.tensor([r[1] for r in rows], dtype=torch.int64)
    origin = torch.full((len(rows),), worker, dtype=torch.int64)
    positions = torch.tensor([r[3] for r in rows], dtype=torch.int64)
    return images, labels, [r[2] for r in rows], origin, positions
