"""``asnn-dist bench data --resume``: what a mid-epoch resume costs, against processing the
samples it skips.

Why: a restart late in an ImageNet epoch used to decode and augment every consumed batch again
(up to a million images). A resumed ``ShardLoader`` now skips the consumed samples without
decoding them, and on local shards without reading their bytes (it walks the tar headers, which
keeps the shuffle exact; ``data/tarindex.py``). Measured on the local shards of ``bench data``
(same synthetic photo-like JPEGs, ImageNet train recipe), per repeat:
- ``process p``: a fresh loader from the start of the epoch to its batch holding sample p;
- ``first batch, fresh``: a fresh loader to its first batch (worker start, one batch decoded);
- ``first batch, resumed``: a loader restored at p (``load_state_dict``) to its first batch.
The resume cost is ``resumed - fresh`` (what getting back to p adds), its ratio to
``process p`` is the figure (target <= 5 %), median over repeats. The resumed batch is checked
bit-identical to the uninterrupted pass's. Wall-clock times: on a shared machine other load
moves them, which the repeats and the median absorb only in part.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any, Callable

import torch

TARGET = 0.05


def _pass(loader: Any, stop_after: int) -> tuple[float, float, Any, Any]:
    """A pass of ``stop_after + 1`` batches: (seconds to the first batch, seconds to batch
    ``stop_after``, the loader state after it, the batch that follows it)."""
    start = time.perf_counter()
    first = last = 0.0
    state = None
    for i, batch in enumerate(loader.iter_with_keys()):
        if i == 0:
            first = time.perf_counter() - start
        if i + 1 == stop_after:
            last = time.perf_counter() - start
            state = loader.state_dict()
        if i == stop_after:
            return first, last, state, batch
    raise RuntimeError(f"the loader ended before batch {stop_after + 1}")


def measure(make: Callable[[], Any], fraction: float, repeats: int, evict: Callable[[], None]) -> dict[str, Any]:
    """Per repeat: process p (fresh loader to batch k), its first batch, a resumed loader's first batch."""
    probe = make()
    k = max(1, min(len(probe) - 1, round(fraction * len(probe))))
    out: dict[str, Any] = {"batches": k, "epoch_batches": len(probe), "samples": k * probe.batch_size,
                           "process": [], "fresh": [], "resumed": [], "exact": True}
    for _ in range(repeats):
        evict()
        fresh_first, process, state, after = _pass(make(), k)
        evict()
        resumed = make()
        resumed.load_state_dict(state)
        resumed_first, _, _, got = _pass(resumed, 0)
        out["exact"] &= all(torch.equal(a, b) for a, b in zip(got[:3], after[:3])) and got[3] == after[3]
        out["process"].append(process)
        out["fresh"].append(fresh_first)
        out["resumed"].append(resumed_first)
    cost = [max(r - f, 0.0) for r, f in zip(out["resumed"], out["fresh"])]
    out["cost"] = cost
    out["ratio"] = statistics.median(c / p for c, p in zip(cost, out["process"]))
    return out


def report(result: dict[str, Any], args: argparse.Namespace) -> str:
    med = {k: statistics.median(result[k]) for k in ("process", "fresh", "resumed", "cost")}
    ratio = result["ratio"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        f"resume at batch {result['batches']} of {result['epoch_batches']} (p = {result['samples']} samples), "
        f"{args.workers} workers, batch {args.batch_size}, cache {args.cache}, {args.repeats} repeats (median s)",
        f"{'process p samples (fresh loader)':<40}{med['process']:>9.3f} s   "
        + " ".join(f"{v:.3f}" for v in result["process"]),
        f"{'first batch, fresh loader':<40}{med['fresh']:>9.3f} s   " + " ".join(f"{v:.3f}" for v in result["fresh"]),
        f"{'first batch, resumed at p':<40}{med['resumed']:>9.3f} s   "
        + " ".join(f"{v:.3f}" for v in result["resumed"]),
        f"{'resume cost (resumed - fresh)':<40}{med['cost']:>9.3f} s",
        f"resume cost / processing p = {100 * ratio:.1f} % ({'met' if ratio <= TARGET else 'missed'}; target <= "
        f"{100 * TARGET:.0f} %); resumed batch bit-identical: {'yes' if result['exact'] else 'NO'}",
        f"load average at the end: {load:.1f} on {os.cpu_count()} CPUs (wall times suffer from other load)",
    ]
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
