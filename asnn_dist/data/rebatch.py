"""Main-process re-batching: merge workers' partial batches and pad to a fixed batch count.

Why: every rank must yield exactly the same number of equally sized batches (collectives and
Ray reports are barriers), yet ranks hold slightly different sample counts and each DataLoader
worker ends with a partial batch. Full batches pass through untouched; partial ones are merged;
the tail is padded with repeats of this rank's own samples, flagged ``valid=False`` so training
can mask them and evaluation counts every real sample exactly once.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence

import torch

from asnn_dist.data.errors import DataError

# (images, labels, keys, *extra per-row tensors such as worker id and stream position)
Batch = Sequence[object]
OutBatch = tuple  # (images, labels, valid, keys, *extra)


def _rows(batch: Batch) -> int:
    return len(batch[1])  # type: ignore[arg-type]


def _concat(parts: list[Batch]) -> Batch:
    columns: list[object] = []
    for i in range(len(parts[0])):
        col: list = [p[i] for p in parts]
        columns.append([k for c in col for k in c] if isinstance(col[0], list) else torch.cat(col))
    return tuple(columns)


def _take(batch: Batch, index: torch.Tensor) -> Batch:
    rows = index.tolist()
    return tuple([c[i] for i in rows] if isinstance(c, list) else c[index] for c in batch)  # type: ignore[index]


def rebatch(
    batches: Iterable[Batch],
    batch_size: int,
    num_batches: int,
    expected_samples: int,
    where: str,
    skipped: Callable[[], int] = lambda: 0,
    filler: Callable[[], Batch] | None = None,
    truncate: bool = False,
) -> Iterator[OutBatch]:
    """Exactly ``num_batches`` batches of ``batch_size`` rows from workers' batches.

    ``expected_samples`` (from the manifest) is checked against what was read plus what was
    ``skipped()`` as corrupt, so shards that changed after their manifest was written are
    reported instead of silently skewing epochs. ``filler()`` gives a batch to pad with when
    this pass read nothing (a resumed epoch whose real samples were all consumed already).
    ``truncate`` stops after ``num_batches`` without the count check (an epoch restarted from
    its beginning after a layout change only has its remaining batches to give).
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
        return (batch[0], batch[1], valid, *batch[2:])

    for batch in batches:
        if truncate and emitted >= num_batches:
            return
        rows = _rows(batch)
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

    if not truncate and seen + skipped() != expected_samples:
        raise DataError(
            f"{where}: read {seen} samples (+{skipped()} skipped as corrupt) but the manifest lists "
            f"{expected_samples} for this rank; a shard changed after the manifest was written, "
            "rebuild the shards"
        )
    if pending_rows:
        tail = _concat(pending)
        fill = torch.arange(batch_size - pending_rows) % pending_rows
        padded = _concat([tail, _take(tail, fill)])
        yield emit(padded, pending_rows)
    while emitted < num_batches:
        if last is None and filler is not None:
            last = filler()
        if last is None:
            raise DataError(f"{where}: no samples to read for this rank; rebuild with more shards")
        source = last
        yield emit(_take(source, torch.arange(batch_size) % _rows(source)), 0)
