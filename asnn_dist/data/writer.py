"""Write samples into WebDataset tar shards plus a manifest.

Why this shape: each sample keeps its *encoded* image bytes (PNG/JPEG pass-through, no
re-encoding), shards are balanced so ranks get near-equal work, tar member times are fixed so
the same samples always give byte-identical shards (and sha256), and the manifest is written
last so its presence means every shard is complete.
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Iterator, Sequence

from tqdm import tqdm

import asnn_dist
from asnn_dist.data import storage
from asnn_dist.data.buildplan import balanced_sizes
from asnn_dist.data.errors import DataError
from asnn_dist.data.manifest import (
    ImageInfo,
    Manifest,
    ShardInfo,
    manifest_url,
    write_manifest,
)

# Keys become tar member names "<key>.<ext>"; WebDataset splits a key from its extension at
# the first dot and skips names starting with "__", so both are forbidden.
_KEY_RE = re.compile(r"^(?!__)[A-Za-z0-9_-][A-Za-z0-9_/-]*$")


@dataclass(frozen=True)
class Sample:
    """One labelled image: a unique key, its encoded bytes, their extension and the label."""

    key: str
    data: bytes
    ext: str
    label: int


class _HashingFile:
    """Write-through wrapper that hashes and counts bytes, so shards are never read back."""

    def __init__(self, inner: BinaryIO) -> None:
        self.inner = inner
        self.digest = hashlib.sha256()
        self.num_bytes = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.num_bytes += len(data)
        return self.inner.write(data)

    def flush(self) -> None:
        self.inner.flush()


class TarShardWriter:
    """Sequential WebDataset tar writer: members ``<key>.<ext>`` in sorted ext order, fixed metadata.

    Why not webdataset's TarWriter: importing webdataset pulls in torch, and shard-writing worker
    processes should start in a fraction of a second. The member layout is the same.
    """

    def __init__(self, out: BinaryIO) -> None:
        self.hashing = _HashingFile(out)
        self.tar = tarfile.open(fileobj=self.hashing, mode="w|")  # type: ignore[call-overload]
        self.count = 0

    def write(self, key: str, entries: dict[str, bytes]) -> None:
        """Add one sample: ``entries`` maps extension (``jpg``, ``cls``) to bytes."""
        for ext in sorted(entries):
            data = entries[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o444
            info.uname = info.gname = "bigdata"
            self.tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self) -> tuple[str, int]:
        """Finish the archive; returns (hex sha256, byte count) of everything written."""
        self.tar.close()
        return self.hashing.digest.hexdigest(), self.hashing.num_bytes

    def abort(self) -> None:
        """Drop the unfinished archive (its file is discarded by the caller's open_write)."""
        self.tar.closed = True
        self.tar.fileobj.closed = True  # else tarfile's __del__ flushes into the discarded file

    def __enter__(self) -> TarShardWriter:
        return self

    def __exit__(self, kind: object, *_: object) -> None:
        if kind is not None and not self.tar.closed:
            self.abort()


def shard_name(split: str, index: int) -> str:
    """File name of shard ``index`` of ``split``: ``<split>-000000.tar``."""
    return f"{split}-{index:06d}.tar"


def _check_sample(sample: Sample, image: ImageInfo, num_classes: int, split: str) -> None:
    if not _KEY_RE.match(sample.key):
        raise DataError(
            f"sample key {sample.key!r} in split {split!r} is not usable as a tar member name; "
            "use letters, digits, '_', '-' or '/', without dots and not starting with '__'"
        )
    if sample.ext != image.ext:
        raise DataError(
            f"sample {sample.key!r} has extension {sample.ext!r} but the split stores "
            f"{image.ext!r} images; convert it or write it to a separate split"
        )
    if not 0 <= sample.label < num_classes:
        raise DataError(
            f"sample {sample.key!r} has label {sample.label}, outside 0..{num_classes - 1} "
            f"({num_classes} classes); check the class list"
        )


def _write_one_shard(
    url: str, samples: Iterator[Sample], count: int, image: ImageInfo, num_classes: int,
    split: str, bar: tqdm,
) -> tuple[int, str, int]:
    """Write up to ``count`` samples to ``url``; returns (samples written, sha256, bytes)."""
    seen: set[str] = set()
    with storage.open_write(url) as raw, TarShardWriter(raw) as tar:
        for sample in samples:
            _check_sample(sample, image, num_classes, split)
            if sample.key in seen:
                raise DataError(f"duplicate sample key {sample.key!r} in {url}; keys must be unique")
            seen.add(sample.key)
            tar.write(sample.key, {image.ext: sample.data, "cls": str(sample.label).encode("ascii")})
            bar.update(1)
            if tar.count == count:
                break
        digest, num_bytes = tar.close()
    return tar.count, digest, num_bytes


def write_shards(
    samples: Iterable[Sample],
    out_dir: str,
    split: str,
    classes: list[str],
    samples_per_shard: int,
    image_info: ImageInfo,
    progress: bool = True,
    total: int | None = None,
    params: dict[str, object] | None = None,
) -> Manifest:
    """Write ``samples`` to ``<out_dir>/<split>-NNNNNN.tar`` shards, then the manifest.

    With a known total (``samples`` is a sequence, or ``total`` is given) shard sizes differ by at
    most one; otherwise shards are filled to ``samples_per_shard`` and the last may be smaller.
    """
    if samples_per_shard < 1:
        raise DataError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if total is None and isinstance(samples, Sequence):
        total = len(samples)
    # A stale manifest must not vouch for shards that are about to be replaced.
    storage.remove(manifest_url(out_dir, split))
    sizes: Iterator[int]
    if total is not None:
        planned = balanced_sizes(total, samples_per_shard)
        sizes = iter(planned)
    else:
        planned = []
        sizes = iter(lambda: samples_per_shard, None)  # endless
    stream = iter(samples)
    shards: list[ShardInfo] = []
    desc = f"write {split}"
    with tqdm(total=total, desc=desc, unit="img", unit_scale=True, disable=not progress) as bar:
        for index, size in enumerate(sizes):
            name = shard_name(split, index)
            url = storage.join(out_dir, name)
            written, digest, num_bytes = _write_one_shard(
                url, stream, size, image_info, len(classes), split, bar
            )
            if written == 0:
                storage.remove(url)
                break
            shards.append(ShardInfo(name=name, num_samples=written, num_bytes=num_bytes, sha256=digest))
            if written < size:
                break
    count = sum(s.num_samples for s in shards)
    leftover = next(stream, None) is not None
    if total is not None and (count != total or leftover):
        raise DataError(
            f"split {split!r}: expected {total} samples but the source gave "
            f"{'more' if leftover else count}; check the total passed to write_shards"
        )
    if count == 0:
        raise DataError(f"split {split!r}: the source gave no samples; check the source dataset")
    manifest = Manifest(
        split=split,
        shards=shards,
        classes=list(classes),
        num_samples=count,
        image=image_info,
        created_by=f"asnn-dist {asnn_dist.__version__}",
        params=dict(params or {}),
    )
    write_manifest(manifest, out_dir)
    return manifest
