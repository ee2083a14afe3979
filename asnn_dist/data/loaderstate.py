"""Where a loader stands in its epoch, and how that position is saved and restored.

Why per-worker sample positions and not just a batch count: workers interleave, merge partial
batches and skip corrupt samples, so "batch k" does not map back to a place in the shards. Each
row carries its position in its worker's (deterministically shuffled) stream; the loader keeps,
per worker, one past the last position it handed out, and how many full batches of each worker
it handed out (where the fixed batch order of ordering.py continues). A resumed epoch rebuilds
the same streams and skips those positions before decoding, so every remaining sample comes
exactly once, in the same batches as without the stop, and the rank still yields exactly
``len(loader) - batches`` more batches. The anchor (the position before the last batch with
real rows) lets a pass resumed among the padding batches, which repeat that batch, rebuild it
(at most two batches decoded again).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from asnn_dist.data.errors import DataError

log = logging.getLogger(__name__)
STATE_VERSION = 2


class LoaderPosition:
    """Epoch, batches handed out this epoch, and per-worker sample positions."""

    def __init__(self, num_workers: int) -> None:
        self.num_workers = num_workers
        self.epoch = 0
        self.batches = 0
        self.samples = [0] * num_workers
        self.worker_batches = [0] * num_workers  # full batches handed out per worker (ordering.py)
        self.anchor: dict[str, Any] | None = None  # position before the last batch with real rows
        self.restarted = False  # restored with another layout: samples restart, batches don't

    def start_epoch(self, epoch: int) -> None:
        """Begin ``epoch`` at its first batch."""
        self.epoch = epoch
        self.finish_pass()

    def finish_pass(self) -> None:
        """A pass over the epoch ended: the next iteration starts the epoch again."""
        self.batches = 0
        self.samples = [0] * self.num_workers
        self.worker_batches = [0] * self.num_workers
        self.anchor = None
        self.restarted = False

    def snapshot(self) -> dict[str, Any]:
        """Where the pass stands now (what ``anchor`` holds)."""
        return {"batches": self.batches, "samples": list(self.samples),
                "worker_batches": list(self.worker_batches)}

    def consumed(self, origin: torch.Tensor, positions: torch.Tensor,
                 before: dict[str, Any] | None = None) -> None:
        """One batch was handed out: ``origin``/``positions`` of its valid rows; ``before``:
        the ``snapshot`` taken before it was made (becomes the anchor if it has real rows)."""
        self.batches += 1
        if origin.numel() == 0:
            return
        if before is not None:
            self.anchor = before
        for worker in origin.unique().tolist():
            last = int(positions[origin == worker].max())
            self.samples[worker] = max(self.samples[worker], last + 1)

    def state(self, layout: dict[str, Any], skipped: int) -> dict[str, Any]:
        """A JSON-able snapshot."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "batches_consumed": self.batches,
                "worker_samples": list(self.samples), "worker_batches": list(self.worker_batches),
                "anchor": self.anchor, "skipped_samples": skipped, **layout}

    def restore(self, state: dict[str, Any], layout: dict[str, Any], epoch_batches: int, mode: str) -> int:
        """Adopt ``state`` (see ``state``); returns the epoch's skipped-sample count so far."""
        try:
            version = int(state["version"])
            epoch = int(state["epoch"])
            batches = int(state["batches_consumed"])
            samples = [int(s) for s in state.get("worker_samples", [])]
            worker_batches = [int(s) for s in state.get("worker_batches", [])]
            anchor = state.get("anchor")
        except (KeyError, TypeError, ValueError) as exn:
            raise DataError(f"loader state is not a ShardLoader.state_dict() ({exn}); "
                            "pass the dict saved from state_dict()") from None
        if version != STATE_VERSION:
            raise DataError(f"loader state version {version} is not supported ({STATE_VERSION} is)")
        self.epoch = epoch
        self.batches = max(0, min(batches, epoch_batches))
        saved = {k: state.get(k) for k in layout}
        self.restarted = False
        if saved == layout and len(samples) == len(worker_batches) == self.num_workers:
            self.samples, self.worker_batches, self.anchor = samples, worker_batches, anchor
        else:
            self.restarted = mode == "exact" and self.batches > 0
            changed = sorted(k for k in layout if saved.get(k) != layout[k])
            self.samples = [0] * self.num_workers
            self.worker_batches = [0] * self.num_workers
            self.anchor = None
            if mode == "exact" and self.batches:
                log.warning(
                    "loader state was saved with another %s; epoch %d continues with its remaining "
                    "%d batches but reads its samples from the start", "/".join(changed), epoch,
                    epoch_batches - self.batches,
                )
        return int(state.get("skipped_samples", 0))
