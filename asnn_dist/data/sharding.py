"""Which shards each rank reads in an epoch, and how many batches every rank yields.

Why here and not in webdataset's node splitter: all ranks must agree on the per-epoch shard
order and on one batch count (a rank that runs out early would hang the others' collectives),
so both come from the manifest and (seed, epoch) alone -- no communication needed.
"""

from __future__ import annotations

import hashlib
import math
import random

from asnn_dist.data.errors import DataError


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts (same on every machine and Python run)."""
    text = ":".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big") >> 1


def shard_order(num_shards: int, epoch: int, seed: int, shuffle: bool) -> list[int]:
    """Shard indices in reading order: reshuffled per epoch when ``shuffle``, else as written."""
    order = list(range(num_shards))
    if shuffle:
        random.Random(derive_seed("shards", seed, epoch)).shuffle(order)
    return order


def rank_shards(
    num_shards: int, rank: int, world_size: int, epoch: int, seed: int, shuffle: bool
) -> list[int]:
    """Shard indices read by ``rank`` this epoch: every ``world_size``-th of the epoch's order."""
    return shard_order(num_shards, epoch, seed, shuffle)[rank::world_size]


def check_enough_shards(num_shards: int, world_size: int, num_workers: int, where: str) -> None:
    """DataError unless every rank's every DataLoader worker gets at least one shard."""
    readers = world_size * max(1, num_workers)
    if num_shards < readers:
        raise DataError(
            f"{where}: {num_shards} shards are too few for {world_size} rank(s) x "
            f"{max(1, num_workers)} loader worker(s); at least {readers} shards are needed. "
            "Rebuild the shards with a smaller samples_per_shard, use fewer workers/ranks, "
            "or use mode='resampled'"
        )


def max_rank_samples(sizes: list[int], world_size: int, epoch: int, seed: int, shuffle: bool) -> int:
    """Most samples any rank can read in an epoch.

    Without shuffling this is exact for the fixed assignment. With shuffling it is the bound over
    every possible assignment (the ceil(S/W) largest shards), so the batch count stays the same
    across epochs and can be used for learning-rate schedules.
    """
    if shuffle:
        per_rank = math.ceil(len(sizes) / world_size)
        return sum(sorted(sizes, reverse=True)[:per_rank])
    return max(
        sum(sizes[i] for i in rank_shards(len(sizes), r, world_size, epoch, seed, shuffle))
        for r in range(world_size)
    )


def batches_per_rank(
    sizes: list[int], world_size: int, batch_size: int, epoch: int, seed: int, shuffle: bool
) -> int:
    """Batches every rank yields per epoch (the largest rank's samples, rounded up)."""
    return math.ceil(max_rank_samples(sizes, world_size, epoch, seed, shuffle) / batch_size)


def resampled_batches(epoch_length: int, world_size: int, batch_size: int) -> int:
    """Batches every rank yields per resampled epoch: ``epoch_length`` samples over all ranks."""
    if epoch_length < 1:
        raise DataError(f"epoch_length must be >= 1 sample, got {epoch_length}")
    return math.ceil(epoch_length / (world_size * batch_size))
