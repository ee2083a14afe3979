"""Small helpers shared by the ``bench zero`` and ``bench train`` benchmarks.

Why a module of its own: both benchmarks print plain-text tables, need a free loopback port
for a process group and quiet the same library chatter; ``bench train`` also needs a one-rank
group in-process (and its clean removal) and samples the CPU time of the processes Ray starts.
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import threading
import time
from typing import Iterable, Sequence

from asnn_dist.testing.services import free_port

MIB = float(2**20)


def median(values: Iterable[float]) -> float:
    """Median of the values, NaN when there are none (a benchmark that measured nothing)."""
    data = [float(v) for v in values]
    return statistics.median(data) if data else float("nan")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Right-aligned plain-text table (floats with two decimals) that pastes into issues."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.2f}"
        return str(value)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) if text else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in text]
    return "\n".join(lines)


def local_group() -> None:
    """A one-rank gloo process group in this process (what DeepSpeed needs outside Ray)."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)


def close_local_group() -> None:
    """Destroy this process's group through DeepSpeed when it used it (which also drops the
    groups DeepSpeed cached), so that a later engine in this process starts clean."""
    import torch.distributed as dist

    ds_comm = sys.modules.get("deepspeed.comm.comm")  # holds the live backend (cdb)
    if ds_comm is not None and getattr(ds_comm, "cdb", None) is not None and dist.is_initialized():
        ds_comm.destroy_process_group()
    elif dist.is_initialized():
        dist.destroy_process_group()


def quiet_libraries() -> None:
    """Keep DeepSpeed's and torch's info logs and deprecation warnings out of the tables.

    The benchmarks that call this run on CPU tensors (gloo ranks), so DeepSpeed gets the CPU
    accelerator even on a GPU machine (otherwise it would move the engines to the GPU)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore::FutureWarning")
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    for name in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _interp(points: Sequence[tuple[float, float, float]], when: float, col: int) -> float:
    """Linear interpolation of column ``col`` of a time-sorted series, clamped at its ends."""
    if when <= points[0][0]:
        return points[0][col]
    for p0, p1 in zip(points, points[1:]):
        if when <= p1[0]:
            return p0[col] + (p1[col] - p0[col]) * (when - p0[0]) / max(p1[0] - p0[0], 1e-9)
    return points[-1][col]


class CpuSampler:
    """CPU seconds (user + system, and system alone) of this process's descendants over time,
    sampled by a thread with psutil.

    Why: the Ray worker reports wall-clock rates only; its CPU seconds per epoch separate time
    spent waiting for a core on a busy machine from extra work in the worker's code path,
    system time shows page-fault work, and the other Ray processes' CPU shows what the control
    plane takes from a small machine.
    """

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s = interval_s
        self.series: dict[int, tuple[str, list[tuple[float, float, float]]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def __enter__(self) -> "CpuSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            now = time.time()
            for proc in me.children(recursive=True):
                try:
                    with proc.oneshot():
                        times, label = proc.cpu_times(), " ".join(proc.cmdline())[:80]
                except psutil.Error:
                    continue
                points = self.series.get(proc.pid, ("", []))[1]
                points.append((now, times.user + times.system, times.system))
                self.series[proc.pid] = (label, points)  # Ray renames its workers: keep the latest
            self._stop.wait(self.interval_s)

    def cpu_between(self, t1: float, t2: float, match: str = "", exclude: str = "\0",
                    system_only: bool = False) -> float:
        """CPU seconds used in [t1, t2] by the processes whose command line contains ``match``
        and not ``exclude`` (interpolated between samples)."""
        col = 2 if system_only else 1
        return sum(_interp(pts, t2, col) - _interp(pts, t1, col) for label, pts in self.series.values()
                   if pts and match in label and exclude not in label)
