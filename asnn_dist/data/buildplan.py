"""What a shard build writes where: source entries, the (seeded) order, and the split into shards.

Why a plan separate from the writing: the plan is a pure function of the source listing and
the settings, so an interrupted build recomputes exactly the same shard contents and can keep
the shards it already finished; its hash goes into the manifest so a changed source or setting
is noticed. Entries carry only a reference to their bytes (a relative path, an index, or the
bytes of small in-memory datasets), so plans for 1.28 M images stay small and picklable.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import dataclass
from typing import Protocol, Sequence

from asnn_dist.data.errors import DataError

_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_/-]")
TAR_OVERHEAD = 3 * 512  # two member headers + padding per sample, for byte-sized shards


@dataclass(frozen=True)
class Entry:
    """One source sample: a unique key, its class index, where its bytes are, their size if known."""

    key: str
    label: int
    ref: str | int | bytes
    size: int = 0


class Source(Protocol):
    """Reads the bytes of an entry; must be picklable (it travels to build worker processes)."""

    def read(self, entry: Entry) -> bytes: ...

    def describe(self, entry: Entry) -> str: ...


class InlineSource:
    """Entries that carry their own bytes (small bundled datasets such as digits)."""

    def read(self, entry: Entry) -> bytes:
        assert isinstance(entry.ref, bytes)
        return entry.ref

    def describe(self, entry: Entry) -> str:
        return entry.key


@dataclass(frozen=True)
class ShardPlan:
    """Shard ``index`` of a split and the entries it will hold, in writing order."""

    index: int
    entries: tuple[Entry, ...]


def make_key(relative: str) -> str:
    """A tar-safe sample key from a relative file path: extension dropped, odd characters -> '_'."""
    stem = relative.rsplit(".", 1)[0] if "." in relative.rsplit("/", 1)[-1] else relative
    key = _BAD_KEY_CHARS.sub("_", stem.replace("\\", "/")).strip("/")
    if not key or key.startswith("__") or key.startswith("-"):
        key = "k" + key
    return key


def unique_keys(keys: Sequence[str]) -> list[str]:
    """``keys`` with duplicates made unique by a ``-N`` suffix (first one keeps its name)."""
    seen: set[str] = set(keys)
    counts: dict[str, int] = {}
    out: list[str] = []
    for key in keys:
        if key in counts:
            n = counts[key]
            while f"{key}-{n}" in seen:
                n += 1
            counts[key] = n + 1
            seen.add(f"{key}-{n}")
            out.append(f"{key}-{n}")
        else:
            counts[key] = 2
            out.append(key)
    return out


def balanced_sizes(total: int, per_shard: int) -> list[int]:
    """Shard sizes for ``total`` samples: at most ``per_shard`` each, differing by at most one."""
    if total < 1:
        raise DataError("cannot write shards for 0 samples; check the source dataset")
    count = math.ceil(total / per_shard)
    base, extra = divmod(total, count)
    return [base + 1 if i < extra else base for i in range(count)]


def plan_shards(
    entries: Sequence[Entry],
    samples_per_shard: int | None = None,
    shard_bytes: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
) -> list[ShardPlan]:
    """Split ``entries`` (shuffled with ``seed`` first when ``shuffle``) into shards.

    ``samples_per_shard`` gives balanced shards (sizes differ by at most one); ``shard_bytes``
    fills each shard up to that many bytes (entry sizes plus tar headers) instead.
    """
    if (samples_per_shard is None) == (shard_bytes is None):
        raise DataError("give exactly one of samples_per_shard and shard_bytes")
    if samples_per_shard is not None and samples_per_shard < 1:
        raise DataError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if shard_bytes is not None and shard_bytes < 1:
        raise DataError(f"shard_bytes must be >= 1, got {shard_bytes}")
    order = list(entries)
    if not order:
        raise DataError("the source has no samples; check the source folder or dataset")
    if shuffle:
        random.Random(seed).shuffle(order)
    groups: list[list[Entry]] = []
    if samples_per_shard is not None:
        start = 0
        for size in balanced_sizes(len(order), samples_per_shard):
            groups.append(order[start : start + size])
            start += size
    else:
        assert shard_bytes is not None
        current: list[Entry] = []
        filled = 0
        for entry in order:
            cost = entry.size + TAR_OVERHEAD
            if current and filled + cost > shard_bytes:
                groups.append(current)
                current, filled = [], 0
            current.append(entry)
            filled += cost
        groups.append(current)
    return [ShardPlan(i, tuple(g)) for i, g in enumerate(groups)]


def plan_hash(plan: Sequence[ShardPlan]) -> str:
    """Hex sha256 over every shard's keys, labels, references and sizes (inline bytes hashed)."""
    digest = hashlib.sha256()
    for shard in plan:
        digest.update(f"shard {shard.index}\n".encode())
        for e in shard.entries:
            ref = hashlib.sha256(e.ref).hexdigest() if isinstance(e.ref, bytes) else repr(e.ref)
            digest.update(f"{e.key}\t{e.label}\t{ref}\t{e.size}\n".encode())
    return digest.hexdigest()
