"""The search's results as a person reads them: one table row per trial, the Pareto front of
top-1 against energy, and the plots logged to the parent MLflow run.

Pure functions of ``TrialRecord`` lists (built from Tune's ResultGrid in ``search.py``), so the
table, the front and the plots are tested without running a search.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

ENERGY_KEY = "val_energy/total_pj"
SOPS_KEY = "val_sops_per_sample"
ANYTIME = "val_anytime_top1_t"


@dataclass
class TrialRecord:
    """One trial: its point, how it ended, its last metrics and its learning curve."""

    trial_id: str
    point: dict[str, Any]
    status: str  # finished | stopped (by the scheduler) | error | invalid
    metrics: dict[str, Any]
    curve: list[tuple[float, float]] = field(default_factory=list)  # (epoch, metric) per evaluation
    mlflow_run_id: Optional[str] = None
    error: Optional[str] = None
    tk: Optional[tuple[int, int]] = None  # (encoding.num_steps, encoding.direct_steps) of the trial

    def value(self, key: str, default: float = float("nan")) -> float:
        try:
            return float(self.metrics.get(key, default))
        except (TypeError, ValueError):
            return default

    def best(self, mode: str = "max") -> float:
        values = [v for _, v in self.curve if not math.isnan(v)]
        if not values:
            return float("nan")
        return max(values) if mode == "max" else min(values)

    def anytime(self) -> list[float]:
        steps = sorted(int(k[len(ANYTIME):]) for k in self.metrics if k.startswith(ANYTIME))
        return [self.value(f"{ANYTIME}{t}") for t in steps]


def _num(x: float) -> bool:
    return not math.isnan(x) and not math.isinf(x)


def best_trial(records: list[TrialRecord], metric: str, mode: str = "max") -> Optional[TrialRecord]:
    """The finished trial with the best final metric (only finished trials have a final model)."""
    done = [r for r in records if r.status == "finished" and _num(r.value(metric))]
    if not done:
        return None
    return (max if mode == "max" else min)(done, key=lambda r: r.value(metric))


def pareto_front(records: list[TrialRecord], metric: str = "val_top1", cost: str = ENERGY_KEY) -> list[TrialRecord]:
    """Finished trials that no other finished trial beats on both metric (higher) and cost (lower)."""
    pts = [r for r in records if r.status == "finished" and _num(r.value(metric)) and _num(r.value(cost))]
    front = []
    for r in pts:
        dominated = any(o is not r and o.value(metric) >= r.value(metric) and o.value(cost) <= r.value(cost)
                        and (o.value(metric) > r.value(metric) or o.value(cost) < r.value(cost)) for o in pts)
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: r.value(cost))


def table_rows(records: list[TrialRecord], metric: str, mode: str = "max") -> list[dict[str, Any]]:
    """One flat row per trial: id, status, the point's values, metrics, energy and anytime top-1."""
    keys = list(dict.fromkeys(k for r in records for k in r.point))
    steps = max((len(r.anytime()) for r in records), default=0)
    rows = []
    for r in records:
        row: dict[str, Any] = {"trial_id": r.trial_id, "status": r.status, "mlflow_run_id": r.mlflow_run_id or ""}
        row.update({"T": r.tk[0] if r.tk else "", "k": r.tk[1] if r.tk else ""})
        row.update({k: r.point.get(k, "") for k in keys})
        row.update({"epochs_done": r.value("epoch"), metric: r.value(metric), f"best_{metric}": r.best(mode),
                    "val_top5": r.value("val_top5"), "energy_uj_per_image": r.value(ENERGY_KEY) * 1e-6,
                    "sops_per_image": r.value(SOPS_KEY), "firing_rate": r.value("val_firing_rate/mean")})
        anytime = r.anytime()
        row.update({f"anytime_top1_t{t + 1}": anytime[t] if t < len(anytime) else "" for t in range(steps)})
        row["error"] = (r.error or "").splitlines()[0][:200] if r.error else ""
        rows.append(row)
    return rows


def write_csv(rows: list[dict[str, Any]], path: str) -> str:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return path


# --- plots ------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str, legend_size: Optional[int] = None) -> str:
    """Grid and legend (line plots), then write and free the figure."""
    ax = fig.axes[0]
    if legend_size is not None:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def plot_tk_heatmap(records: list[TrialRecord], path: str, metric: str = "val_top1") -> Optional[str]:
    """Best metric by time steps T (rows) and direct steps k (columns), over all other keys."""
    cells: dict[tuple[int, int], float] = {}
    for r in records:
        tk, best = r.tk, r.best()
        if tk is not None and _num(best):
            cells[tk] = max(cells.get(tk, -math.inf), best)
    if not cells:
        return None
    plt = _plt()
    ts, ks = sorted({t for t, _ in cells}), sorted({k for _, k in cells})
    grid = [[cells.get((t, k), math.nan) for k in ks] for t in ts]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(ks), 1.0 + 0.6 * len(ts)))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if _num(v):
                ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="w", fontsize=8)
    ax.set_xticks(range(len(ks)), [str(k) for k in ks])
    ax.set_yticks(range(len(ts)), [str(t) for t in ts])
    ax.set_xlabel("direct steps k (k = T: direct coding, 0: pure temporal)")
    ax.set_ylabel("time steps T")
    ax.set_title(f"best {metric} by (T, k)")
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def plot_pareto(records: list[TrialRecord], path: str, metric: str = "val_top1") -> Optional[str]:
    """Top-1 against energy per image (SOPs when no energy), the Pareto front marked."""
    cost = ENERGY_KEY if any(_num(r.value(ENERGY_KEY)) for r in records) else SOPS_KEY
    scale, unit = (1e-6, "energy per image (uJ, 45 nm)") if cost == ENERGY_KEY else (1.0, "SOPs per image")
    pts = [r for r in records if r.status in ("finished", "stopped") and _num(r.value(metric)) and _num(r.value(cost))]
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for status, style in (("finished", dict(marker="o", color="tab:blue")), ("stopped", dict(marker="x", color="0.6"))):
        sel = [r for r in pts if r.status == status]
        if sel:
            ax.scatter([r.value(cost) * scale for r in sel], [r.value(metric) for r in sel], label=status, **style)
    front = pareto_front(records, metric, cost)
    if front:
        ax.plot([r.value(cost) * scale for r in front], [r.value(metric) for r in front], "r-o", mfc="none",
                label="Pareto front")
        for r in front:
            ax.annotate(r.trial_id.rsplit("_", 1)[-1], (r.value(cost) * scale, r.value(metric)), fontsize=7)
    ax.set_xlabel(unit)
    ax.set_ylabel(metric)
    return _save(fig, path, legend_size=8)


def plot_anytime(records: list[TrialRecord], path: str, metric: str = "val_top1", top: int = 5) -> Optional[str]:
    """Anytime top-1 (using the first t steps) of the best finished trials."""
    done = sorted([r for r in records if r.status == "finished" and r.anytime()], key=lambda r: -r.value(metric))[:top]
    if not done:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in done:
        vals = r.anytime()
        label = f"{r.trial_id.rsplit('_', 1)[-1]} " + " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in r.point.items())
        ax.plot(range(1, len(vals) + 1), vals, marker="o", label=label[:60])
    ax.set_xlabel("time steps used t")
    ax.set_ylabel("anytime top-1")
    ax.set_title(f"anytime accuracy of the {len(done)} best trials")
    return _save(fig, path, legend_size=6)


def plot_curves(records: list[TrialRecord], path: str, metric: str = "val_top1") -> Optional[str]:
    """Every trial's metric by epoch; trials the scheduler stopped are grey, dashed, ending in x."""
    curved = [r for r in records if r.curve]
    if not curved:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in curved:
        xs, ys = [x for x, _ in r.curve], [y for _, y in r.curve]
        if r.status == "stopped":
            ax.plot(xs, ys, "--", color="0.6", lw=1)
            ax.plot(xs[-1:], ys[-1:], "x", color="tab:red")
        else:
            ax.plot(xs, ys, "-", lw=1.2, marker="." if len(xs) < 30 else None)
    ax.plot([], [], "--x", color="0.6", mec="tab:red", label="stopped early by the scheduler")
    ax.plot([], [], "-", color="tab:blue", label="ran to the end")
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"learning curves of {len(curved)} trials")
    return _save(fig, path, legend_size=8)


def render_all(records: list[TrialRecord], folder: str, metric: str, mode: str) -> list[str]:
    """The table and every plot that has data, written into ``folder``; returns the files."""
    out = [write_csv(table_rows(records, metric, mode), str(Path(folder, "results.csv")))]
    for fn, name in ((plot_tk_heatmap, "best_top1_by_T_k.png"), (plot_pareto, "top1_vs_energy_pareto.png"),
                     (plot_anytime, "anytime_best_trials.png"), (plot_curves, "learning_curves.png")):
        made = fn(records, str(Path(folder, name)), metric)
        if made:
            out.append(made)
    return out


def seed_table(records: list[TrialRecord], metric: str = "val_top1", seed_key: str = "seed") -> list[str]:
    """Markdown rows: mean +- std of the metric and energy over seeds, one row per other point
    (finished trials only); empty when the space has no seed key."""
    import statistics

    groups: dict[tuple, list[TrialRecord]] = {}
    for r in records:
        if r.status == "finished" and seed_key in r.point:
            key = tuple((k, v) for k, v in r.point.items() if k != seed_key)
            groups.setdefault(key, []).append(r)
    if not groups:
        return []
    names = [k.rsplit(".", 1)[-1] for k, _ in next(iter(groups))]
    lines = ["| " + " | ".join(names) + f" | seeds | {metric} (mean +- std) | energy uJ/image | SOPs/image |",
             "|" + "---|" * (len(names) + 4)]
    for key, rs in groups.items():
        vals = [r.value(metric) for r in rs]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        energy = statistics.mean(r.value(ENERGY_KEY) for r in rs) * 1e-6
        sops = statistics.mean(r.value(SOPS_KEY) for r in rs)
        lines.append("| " + " | ".join(str(v) for _, v in key) +
                     f" | {len(rs)} | {statistics.mean(vals):.4f} +- {sd:.4f} | {energy:.4f} | {sops:.3g} |")
    return lines
