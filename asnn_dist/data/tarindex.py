"""Samples of a local shard from its tar headers alone, their bytes read only when asked for.

Why: a resumed epoch must walk its workers' streams up to the saved positions (the shuffle
buffer's draws depend on every sample before), but it needs the bytes only of the samples it
still decodes. Reading every consumed sample's bytes cost up to a sixth of decoding them on a
cold disk; reading a 512-byte header per member costs about 1/50 of it. Only plain ustar
archives of ``[dir/]<key>.<ext>`` regular files (what ``TarShardWriter`` writes) with exactly the
manifest's sample count are indexed; anything else (a cut archive, long names, other member
types, S3) returns None and goes through the full reader, whose samples and reports are the
same for such archives, so a resumed stream equals the uninterrupted one either way.
"""

from __future__ import annotations

import os
import re
from typing import Any

from asnn_dist.data import storage

BLOCK = 512
_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's key/extension split


class _Shard:
    """An open shard file shared by its lazy entries; closed when the last one is dropped."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        if hasattr(os, "posix_fadvise"):  # header reads skip whole members: no read-ahead
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)

    def read(self, offset: int, size: int) -> bytes:
        data = os.pread(self.fd, size, offset)
        if len(data) != size:
            raise OSError(f"short read at byte {offset} ({len(data)} of {size})")
        return data

    def __del__(self) -> None:
        if hasattr(self, "fd"):
            os.close(self.fd)


class LazyBytes:
    """One member's bytes, read on ``read()``."""

    __slots__ = ("shard", "offset", "size")

    def __init__(self, shard: _Shard, offset: int, size: int) -> None:
        self.shard, self.offset, self.size = shard, offset, size

    def read(self) -> bytes:
        return self.shard.read(self.offset, self.size)


def materialize(sample: dict[str, Any]) -> dict[str, Any]:
    """``sample`` with every lazy entry read (the full reader's samples come back as they are)."""
    if not any(isinstance(v, LazyBytes) for v in sample.values()):
        return sample
    return {k: v.read() if isinstance(v, LazyBytes) else v for k, v in sample.items()}


def _octal(field: bytes) -> int:
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _member(header: bytes) -> tuple[str, int] | None:
    """(name, size) of a plain ustar regular-file header; None for anything else."""
    checksum = _octal(header[148:156])
    if checksum != sum(header[:148]) + 8 * 32 + sum(header[156:]):
        return None
    if header[156:157] not in (b"0", b"\0") or not header[257:262] == b"ustar" or header[345:346] != b"\0":
        return None  # other member types, a name with a prefix field, pre-POSIX headers
    name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    return name, _octal(header[124:136])


def scan_shard(url: str, expected: int) -> list[dict[str, Any]] | None:
    """The samples of a local shard (``__key__``, ``__url__``, one lazy entry per extension),
    or None where only the full reader can tell what the archive holds."""
    if storage.scheme_of(url) not in ("", "file"):
        return None
    try:
        shard = _Shard(str(storage.local_path(url)))
        end = os.fstat(shard.fd).st_size
    except OSError:
        return None  # the full reader reports it
    samples: list[dict[str, Any]] = []
    offset = 0
    while True:
        if offset + BLOCK > end:
            return None  # cut before the end-of-archive blocks
        header = shard.read(offset, BLOCK)
        if header == bytes(BLOCK):
            break
        member = _member(header)
        if member is None:
            return None
        name, size = member
        data_at = offset + BLOCK
        offset = data_at + (size + BLOCK - 1) // BLOCK * BLOCK
        match = _NAME.match(name)
        if offset > end or match is None or "__" in name:
            return None  # cut, or a name webdataset would skip or split otherwise
        key, ext = match.group(1), match.group(2).lower()
        if not samples or samples[-1]["__key__"] != key:
            samples.append({"__key__": key, "__url__": url})
        if ext in samples[-1]:
            return None
        samples[-1][ext] = LazyBytes(shard, data_at, size)
    return samples if len(samples) == expected else None
