"""The WebDataset tar format of a shard: the one writer every shard goes through.

Why this shape: each sample keeps its *encoded* image bytes (PNG/JPEG pass-through, no
re-encoding) and tar member times are fixed, so the same samples always give byte-identical
shards (and sha256). Planning, checking and resuming a build live in ``build.py`` (with
``shardwrite.py`` writing one planned shard); in-memory samples enter it as ``inline_entries``.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass
from typing import BinaryIO, Iterable

from asnn_dist.data.buildplan import Entry


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


def inline_entries(samples: Iterable[Sample]) -> list[Entry]:
    """Entries of in-memory samples for ``build.build_split`` with ``InlineSource`` (which
    reads each entry's bytes back), so bundled datasets go through the one shard builder."""
    return [Entry(key=s.key, label=s.label, ref=s.data, size=len(s.data)) for s in samples]
