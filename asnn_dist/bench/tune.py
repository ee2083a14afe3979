"""Search benchmark: what Ray Tune costs on top of training, and what ASHA saves over FIFO.

Run: ``asnn-dist bench tune [CONFIG] [--trials 4] [--set k=v ...] [--skip-overhead] [--skip-asha]``.

Overhead: the first N points of the search run once as N ``run_training`` calls one after
another (the ``asnn-dist train`` path) and once as a search of those N points with one trial at
a time (FIFO), on the same local Ray instance and the same data. The figure is wall time per
trial-epoch, search over sequential runs (the issue's bar: at most 1.10).

ASHA vs FIFO: the whole search space once with FIFO (every trial to the end) and once with
ASHA, concurrency as configured. For each, the trial-epochs spent (in the order the reports
arrived) until a trial first reached the target top-1, the lower of the two searches' best:
ASHA should need at most 0.60 of FIFO's. Totals and best top-1 of both are printed too.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

DEFAULT_CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "tune" / "digits-encoding-mix.yaml")


def _load(config: str, workdir: str, overrides: list[str], *more: str):
    from asnn_dist.config import load_config

    return load_config(config, [f"workdir={workdir}", "run.progress=false", "tracking.registered_model=null",
                                *overrides, *more])


def overhead(config: str, workdir: str, overrides: list[str], trials: int) -> dict[str, float]:
    """Wall seconds per trial-epoch: N sequential training runs vs a one-at-a-time search of them."""
    from asnn_dist.train.launcher import run_training
    from asnn_dist.tune.search import run_search
    from asnn_dist.config.space import sample_points, trial_config

    stamp = int(time.time())
    cfg = _load(config, workdir, overrides, f"tune.name=bench-overhead-{stamp}", "tune.scheduler.name=fifo",
                "tune.max_concurrent_trials=1")
    points = sample_points(cfg).points[:trials]
    epochs = sum(trial_config(cfg, p, "x").optim.epochs for p in points)
    t0 = time.monotonic()
    for i, p in enumerate(points):
        run_training(trial_config(cfg, p, f"bench-seq-{stamp}-{i}"))
    sequential = time.monotonic() - t0
    t1 = time.monotonic()
    run_search(cfg, echo=lambda _: None, points=points)
    searched = time.monotonic() - t1
    return {"trials": float(len(points)), "trial_epochs": float(epochs), "sequential_s": sequential,
            "search_s": searched, "sequential_s_per_epoch": sequential / epochs, "search_s_per_epoch": searched / epochs,
            "ratio": searched / sequential}


def epochs_to_reach(grid: Any, metric: str, target: float) -> tuple[float, float, float]:
    """(trial-epochs until the target was first reached, trial-epochs in all, best metric), the
    reports of all trials merged in arrival order."""
    events = []
    for result in grid:
        df = result.metrics_dataframe
        if df is None or metric not in df:
            continue
        prev = 0.0
        for ts, epoch, value in zip(df["timestamp"], df["epoch"], df[metric]):
            events.append((float(ts), float(epoch) - prev, float(value)))
            prev = float(epoch)
    events.sort()
    spent, reached, best = 0.0, float("nan"), float("-inf")
    for _, epochs, value in events:
        spent += epochs
        best = max(best, value)
        if value >= target and reached != reached:
            reached = spent
    return reached, spent, best


def asha_vs_fifo(config: str, workdir: str, overrides: list[str]) -> dict[str, float]:
    """Both schedulers over the whole space; trial-epochs until the lower of the two bests."""
    from asnn_dist.tune.search import run_search

    out: dict[str, Any] = {}
    grids = {}
    metric = "val_top1"
    for sched in ("fifo", "asha"):
        cfg = _load(config, workdir, overrides, f"tune.scheduler.name={sched}",
                    f"tune.name=bench-{sched}-{int(time.time())}")
        metric = cfg.tune.metric
        t0 = time.monotonic()
        res = run_search(cfg, echo=lambda _: None)
        out[f"{sched}_s"] = time.monotonic() - t0
        grids[sched] = _grid(res.experiment_path)
    target = min(epochs_to_reach(g, metric, float("inf"))[2] for g in grids.values())
    for s, g in grids.items():
        reached, total, b = epochs_to_reach(g, metric, target)
        out.update({f"{s}_epochs_to_target": reached, f"{s}_epochs_total": total, f"{s}_best": b})
    out["target"] = target
    out["ratio"] = out["asha_epochs_to_target"] / out["fifo_epochs_to_target"]
    return out


def _grid(path: str) -> Any:
    from ray.tune import ExperimentAnalysis
    from ray.tune.result_grid import ResultGrid

    return ResultGrid(ExperimentAnalysis(path))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="asnn-dist bench tune", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help="search config (default: the digits demo search)")
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--trials", type=int, default=4, help="trials of the overhead comparison (default 4)")
    parser.add_argument("--skip-overhead", action="store_true", help="skip the search-vs-sequential comparison")
    parser.add_argument("--skip-asha", action="store_true", help="skip the ASHA-vs-FIFO comparison")
    parser.add_argument("--workdir", default=None, help="keep shards, MLflow and Ray results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="asnn-bench-tune-") as tmp:
        work = args.workdir or tmp
        if not args.skip_overhead:
            o = overhead(args.config, work, args.overrides, args.trials)
            print(f"overhead: {int(o['trials'])} trials, {int(o['trial_epochs'])} trial-epochs: sequential train "
                  f"{o['sequential_s_per_epoch']:.2f} s/trial-epoch, search (1 at a time) {o['search_s_per_epoch']:.2f} "
                  f"s/trial-epoch -> search/sequential = {o['ratio']:.3f} (bar: <= 1.10)")
        if not args.skip_asha:
            a = asha_vs_fifo(args.config, work, args.overrides)
            print(f"ASHA vs FIFO: target top-1 {a['target']:.4f} (the lower best of the two); trial-epochs to reach it: "
                  f"ASHA {a['asha_epochs_to_target']:.0f}, FIFO {a['fifo_epochs_to_target']:.0f} -> ratio {a['ratio']:.2f} "
                  f"(bar: <= 0.60); in all: ASHA {a['asha_epochs_total']:.0f} trial-epochs, best {a['asha_best']:.4f}, "
                  f"{a['asha_s']:.0f} s; FIFO {a['fifo_epochs_total']:.0f} trial-epochs, best {a['fifo_best']:.4f}, "
                  f"{a['fifo_s']:.0f} s")
    return 0
