"""Plots a person would rather look at than read, logged to MLflow as artifacts: learned
per-step leak/gain per layer, readout scales, and training curves from the run's history."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch import nn


def learned_neuron_params(model: nn.Module) -> dict[str, dict[str, list[float]]]:
    """layer name -> {"leak": [...], "gain": [...]} for every adaptive neuron layer."""
    out: dict[str, dict[str, list[float]]] = {}
    for name, mod in model.named_modules():
        leak, gain = getattr(mod, "leak", None), getattr(mod, "gain", None)
        if isinstance(leak, torch.Tensor) and isinstance(gain, torch.Tensor):
            out[name] = {"leak": leak.detach().float().flatten().tolist(), "gain": gain.detach().float().flatten().tolist()}
    return out


def _heatmaps(panels: dict[str, dict[str, list[float]]], path: str) -> Optional[str]:
    """One heatmap panel per title: rows = layers, columns = time steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {k: v for k, v in panels.items() if v}
    if not panels:
        return None
    rows_max = max(len(v) for v in panels.values())
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 1.2 + 0.45 * rows_max), squeeze=False)
    for ax, (title, rows) in zip(axes[0], panels.items()):
        names = list(rows)
        width = max(len(r) for r in rows.values())
        grid = torch.full((len(names), width), float("nan"))
        for i, n in enumerate(names):
            grid[i, : len(rows[n])] = torch.tensor(rows[n])
        im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis")
        ax.set_title(title)
        ax.set_xlabel("time step")
        ax.set_xticks(range(width), [str(t + 1) for t in range(width)])
        ax.set_yticks(range(len(names)), names, fontsize=7)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_neuron_heatmaps(model: nn.Module, path: str) -> Optional[str]:
    params = learned_neuron_params(model)
    return _heatmaps({f"learned {key} per layer and step": {n: p[key] for n, p in params.items()}
                      for key in ("leak", "gain")}, path)


def firing_rates_from_metrics(metrics: dict[str, float], prefix: str = "val_firing_rate_step/") -> dict[str, list[float]]:
    """``val_firing_rate_step/<layer>/t<k>`` metrics -> layer -> rates by step."""
    table: dict[str, dict[int, float]] = {}
    for key, value in metrics.items():
        if key.startswith(prefix):
            layer, step = key[len(prefix):].rsplit("/t", 1)
            table.setdefault(layer, {})[int(step)] = float(value)
    return {layer: [steps[t] for t in sorted(steps)] for layer, steps in table.items()}


def plot_firing_rates(metrics: dict[str, float], path: str) -> Optional[str]:
    return _heatmaps({"firing rate per layer and step (evaluation)": firing_rates_from_metrics(metrics)}, path)


def plot_training_curves(uri: str, run_id: str, path: str, keys: tuple[str, ...] = ("train_loss", "val_loss", "val_top1")) -> Optional[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    series = {k: client.get_metric_history(run_id, k) for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 3))
    axes = axes if len(series) > 1 else [axes]
    for ax, (key, hist) in zip(axes, series.items()):
        hist = sorted(hist, key=lambda m: m.step)
        ax.plot([m.step for m in hist], [m.value for m in hist], marker="." if len(hist) < 50 else None)
        ax.set_title(key)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def log_model_plots(model: nn.Module, uri: str, run_id: str, metrics: Optional[dict[str, float]] = None) -> list[str]:
    """Render and log the plots; returns the artifact file names that were logged."""
    from asnn_dist.tracking.client import RunLogger

    logger = RunLogger(uri, run_id)
    logged = []
    with tempfile.TemporaryDirectory() as tmp:
        for fn, name in ((lambda p: plot_neuron_heatmaps(model, p), "neuron_leak_gain.png"),
                         (lambda p: plot_training_curves(uri, run_id, p), "training_curves.png"),
                         (lambda p: plot_firing_rates(metrics or {}, p), "firing_rates.png")):
            out = fn(str(Path(tmp, name)))
            if out:
                logger.log_artifact(out, "plots")
                logged.append(name)
    return logged
