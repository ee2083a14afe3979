"""Main-process re-batching: merge workers' partial batches and pad to a fixed batch count.

Why: every rank must yield exactly the same number of equally sized batches (collectives and
Ray reports are barriers), yet ranks hold slightly different sample counts and each DataLoader
worker ends with a partial batch. Full batches pass through untouched; partial ones are merged;
the tail is padded with repeats of this rank's own samples, flagged ``valid=False`` so training
can mask them and evaluation counts every real sample exactly once.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from asnn_dist.data.errors import DataError

Batch = tuple[torch.Tensor, torch.Tensor, list[str]]
OutBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]


def _concat(parts: list[Batch]) -> Batch:
    images = torch.cat([p[0] for p in parts])
    labels = torch.cat([p[1] for p in parts])
    keys = [k for p in parts for k in p[2]]
    return images, labels, keys


def _take(batch: Batch, index: torch.Tensor) -> Batch:
    keys = batch[2]
    return batch[0][index], batch[1][index], [keys[i] for i in index.tolist()]


def rebatch(
    batches: Iterable[Batch],
    batch_size: int,
    num_batches: int,
    expected_samples: int,
    where: str,
) -> Iterator[OutBatch]:
    """Exactly ``num_batches`` batches of ``batch_size`` rows from workers' batches.

    ``expected_samples`` (from the manifest) is checked against what was read, so shards that
    changed after their manifest was written are reported instead of silently skewing epochs.
    """
    emitted = 0
    seen = 0
    pending: list[Batch] = []
    pending_rows = 0
    last: Batch | None = None

    def emit(batch: Batch, valid_rows: int) -> OutBatch:
        nonlocal emitted, last
        if emitted >= num_batches:
            raise DataError(
                f"{where}: read more samples than the manifest lists ({expected_samples} for this "
                "rank); the shards changed after the manifest was written, rebuild them"
            )
        emitted += 1
        last = batch
        valid = torch.zeros(batch_size, dtype=torch.bool)
        valid[:valid_rows] = True
        return batch[0], batch[1], valid, batch[2]

    for batch in batches:
        rows = len(batch[1])
        seen += rows
        if rows == batch_size:
            yield emit(batch, batch_size)
            continue
        pending.append(batch)
        pending_rows += rows
        if pending_rows >= batch_size:
            merged = _concat(pending)
            yield emit(_take(merged, torch.arange(batch_size)), batch_size)
            pending_rows -= batch_size
            pending = [_take(merged, torch.arange(batch_size, batch_size + pending_rows))] if pending_rows else []

    if seen != expected_samples:
        raise DataError(
            f"{where}: read {seen} samples but the manifest lists {expected_samples} for this rank; "
            "a shard is truncated or changed after the manifest was written, rebuild the shards"
        )
    if pending_rows:
        tail = _concat(pending)
        fill = torch.arange(batch_size - pending_rows) % pending_rows
        padded = _concat([tail, _take(tail, fill)])
        yield emit(padded, pending_rows)
    while emitted < num_batches:
        if last is None:
            raise DataError(f"{where}: no samples to read for this rank; rebuild with more shards")
        source = last
        yield emit(_take(source, torch.arange(batch_size) % len(source[1])), 0)
