"""Put the workers' batches in one fixed order, whatever order the DataLoader delivers them in.

Why: torch's DataLoader hands out worker items round-robin from worker 0, and every item
(batch, skip report, end marker) takes a turn. A resumed epoch restarts the workers at their
saved sample positions, so the DataLoader's turn order no longer lines up with the interrupted
run's. The main process therefore fixes the order itself: full batch j of worker w comes after
batch j of every worker before w and before batch j + 1 of any worker (round-robin by batch
index; a worker drops out when it ends), starting from the per-worker batch counts saved with
the loader state. Each worker's last, partial batch comes after all full batches, in worker
order, so the merged tail batches (rebatch.py) do not depend on timing either. A skip report
comes out just before the batch that followed it in its worker's stream, so the epoch's skip
count at a checkpoint covers exactly the samples before it.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Iterable, Iterator

from asnn_dist.data.samples import Skipped, WorkerEnd


def worker_of(item: Any) -> int:
    """The worker an item came from (batches carry it per row, reports and end markers as a field)."""
    if isinstance(item, (Skipped, WorkerEnd)):
        return item.worker
    return int(item[3][0])


def ordered(items: Iterable[Any], batch_size: int, done: list[int]) -> Iterator[Any]:
    """Worker batches and skip reports of ``items`` in the fixed order (module docstring).

    ``done[w]``: full batches of worker w consumed before this pass; updated as batches come
    out (a suspended consumer has received exactly the counted ones). End markers are consumed
    here. An endless (resampled) stream has no end markers and no partial batches.
    """
    queues: list[deque[Any]] = [deque() for _ in done]
    active = list(range(len(done)))
    partials: dict[int, Any] = {}
    source = iter(items)
    while active:
        w = min(active, key=lambda k: (done[k], k))
        while True:
            while not queues[w]:
                item = next(source, None)
                if item is None:
                    break
                queues[worker_of(item)].append(item)
            if not queues[w]:  # the stream ended without this worker's end marker
                active.remove(w)
                break
            item = queues[w].popleft()
            if isinstance(item, Skipped):
                yield item
                continue
            if isinstance(item, WorkerEnd):
                active.remove(w)
                break
            if len(item[1]) < batch_size:
                partials[w] = item  # the worker's last batch; its end marker follows
                continue
            done[w] += 1
            yield item
            break
    for w in sorted(partials):
        yield partials[w]
