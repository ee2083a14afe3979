"""``asnn-dist bench data --resume``: what a mid-epoch resume costs, against processing the
samples it skips.

Why: a restart late in an ImageNet epoch used to decode and augment every consumed batch again
(up to a million images). A resumed ``ShardLoader`` now skips the consumed samples without
decoding them, and on local shards without reading their bytes (it walks the tar headers, which
keeps the shuffle exact; ``data/tarindex.py``). Measured on the local shards of ``bench data``
(same synthetic photo-like JPEGs, ImageNet train recipe), three passes per repeat:
- fresh to p: a fresh loader from the start of the epoch to the batch holding sample p (and the
  one after it, the reference the resumed batch is checked against, bit for bit);
- fresh, 1 batch: a fresh loader's first batch (worker start, prefetch, one batch);
- resumed, 1 batch: a loader restored at p (``load_state_dict``) to its first batch.
Resume cost = resumed - fresh (what getting back to p adds); processing p = (fresh to p) -
(fresh, 1 batch); the figure is their ratio (target <= 5 %), median over repeats, in CPU
seconds (this process and its finished DataLoader workers: other load on a shared machine
hardly moves it) and in wall-clock seconds (which it does move).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from typing import Any, Callable

import torch

TARGET = 0.05


def _pass(loader: Any, stop_after: int) -> tuple[float, float, Any, Any]:
    """Iterate to batch ``stop_after + 1``: (wall seconds, CPU seconds, the loader state after
    batch ``stop_after``, the last batch). Returning drops the iterator, which stops and joins
    the DataLoader workers, so their CPU time is counted."""
    from asnn_dist.bench.data import cpu_seconds

    wall, cpu = time.perf_counter(), cpu_seconds()
    state = None
    for i, batch in enumerate(loader.iter_with_keys()):
        if i + 1 == stop_after:
            state = loader.state_dict()
        if i == stop_after:
            break
    else:
        raise RuntimeError(f"the loader ended before batch {stop_after + 1}")
    del loader
    return time.perf_counter() - wall, cpu, state, batch


def _finish(started: tuple[float, float, Any, Any]) -> tuple[float, float, Any, Any]:
    from asnn_dist.bench.data import cpu_seconds

    gc.collect()  # the pass's workers are gone: count their CPU time
    wall, cpu, state, batch = started
    return wall, cpu_seconds() - cpu, state, batch


def measure(make: Callable[[], Any], fraction: float, repeats: int, evict: Callable[[], None]) -> dict[str, Any]:
    """Per repeat: fresh to p, fresh 1 batch, resumed 1 batch (module docstring)."""
    probe = make()
    k = max(1, min(len(probe) - 1, round(fraction * len(probe))))
    out: dict[str, Any] = {"batches": k, "epoch_batches": len(probe), "samples": k * probe.batch_size,
                           "exact": True, **{f"{a}_{b}": [] for a in ("wall", "cpu")
                                             for b in ("process", "fresh", "resumed")}}
    for _ in range(repeats):
        evict()
        wall_k, cpu_k, state, after = _finish(_pass(make(), k))
        evict()
        wall_1, cpu_1, _, _ = _finish(_pass(make(), 0))
        evict()
        resumed = make()
        resumed.load_state_dict(state)
        wall_r, cpu_r, _, got = _finish(_pass(resumed, 0))
        out["exact"] &= all(torch.equal(a, b) for a, b in zip(got[:3], after[:3])) and got[3] == after[3]
        for kind, fresh_k, fresh_1, res in (("wall", wall_k, wall_1, wall_r), ("cpu", cpu_k, cpu_1, cpu_r)):
            out[f"{kind}_process"].append(fresh_k - fresh_1)
            out[f"{kind}_fresh"].append(fresh_1)
            out[f"{kind}_resumed"].append(res)
    for kind in ("wall", "cpu"):
        cost = [r - f for r, f in zip(out[f"{kind}_resumed"], out[f"{kind}_fresh"])]
        out[f"{kind}_cost"] = cost
        out[f"{kind}_ratio"] = statistics.median(c / max(p, 1e-9) for c, p in zip(cost, out[f"{kind}_process"]))
    return out


def report(result: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [f"resume at batch {result['batches']} of {result['epoch_batches']} (p = {result['samples']} samples), "
             f"{args.workers} workers, batch {args.batch_size}, cache {args.cache}, {args.repeats} repeats "
             "(median; per repeat after it)"]
    rows = (("process p samples (fresh loader)", "process"), ("first batch, fresh loader", "fresh"),
            ("first batch, resumed at p", "resumed"), ("resume cost (resumed - fresh)", "cost"))
    for kind, unit in (("cpu", "CPU-s"), ("wall", "s")):
        for label, key in rows:
            values = result[f"{kind}_{key}"]
            lines.append(f"{label + ', ' + unit:<42}{statistics.median(values):>9.3f}   "
                         + " ".join(f"{v:.3f}" for v in values))
    for kind, name in (("cpu", "CPU time"), ("wall", "wall time")):
        ratio = result[f"{kind}_ratio"]
        lines.append(f"resume cost / processing p ({name}) = {100 * ratio:.1f} % "
                     f"({'met' if ratio <= TARGET else 'missed'}; target <= {100 * TARGET:.0f} %)")
    lines.append(f"resumed batch bit-identical to the uninterrupted pass: {'yes' if result['exact'] else 'NO'}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines.append(f"load average at the end: {load:.1f} on {os.cpu_count()} CPUs (wall times suffer from other load)")
    return "\n".join(lines)


def run(args: argparse.Namespace, work: Any) -> str:
    """Generate the data (as ``bench data``), build local shards, measure, return the table."""
    from asnn_dist.bench.data import evict, make_folder
    from asnn_dist.data.builders import build_folder_shards
    from asnn_dist.data.loader import ShardLoader
    from asnn_dist.data.recipes import TransformSpec

    width, height = (int(v) for v in args.image_size.lower().split("x"))
    folder, shards = work / "folder", work / "shards"
    make_folder(folder, args.samples, width, height, args.classes, args.workers)
    manifest = build_folder_shards(str(folder), str(shards), "train", samples_per_shard=args.samples_per_shard,
                                   workers=args.workers, progress=False).manifest
    spec = TransformSpec("imagenet", 3, args.out_size, augment=True)
    tars = [str(p) for p in shards.glob("*.tar")]

    def make() -> ShardLoader:
        return ShardLoader(manifest, batch_size=args.batch_size, num_workers=args.workers, train=True,
                           augment=True, recipe=spec, image_size=args.out_size, seed=0, shuffle_buffer=256)

    result = measure(make, args.resume_at, args.repeats, (lambda: evict(tars)) if args.cache == "cold" else
                     (lambda: None))
    return report(result, args)
