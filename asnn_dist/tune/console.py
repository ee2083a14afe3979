"""What ``asnn-dist tune`` prints: one line per trial event, never Tune's wide status tables.

A search runs many worker groups at once, so the per-run progress line of ``train``
(``train/progress.py``) would fight over one terminal line; instead every evaluation of every
trial gives one short line (its point, epoch and metric) plus the search's standing, and each
trial's end says whether it ran to the end or the scheduler stopped it.
"""

from __future__ import annotations

from typing import Any, Callable

from ray.tune import Callback

from asnn_dist.config import ExperimentConfig


def short_id(trial_id: str) -> str:
    return trial_id.rsplit("_", 1)[-1]


def point_text(point: dict[str, Any]) -> str:
    """``T=4 k=1 threshold adaptive`` style: the last part of every key, short."""
    parts = []
    for key, value in point.items():
        leaf = key.rsplit(".", 1)[-1]
        parts.append(f"{leaf}={value:.3g}" if isinstance(value, float) else f"{leaf}={value}")
    return " ".join(parts)


class SearchConsole(Callback):
    """Tune callback on the driver: trial started / evaluated / ended, with the search's standing."""

    def __init__(self, cfg: ExperimentConfig, total: int, echo: Callable[[str], Any] = print) -> None:
        assert cfg.tune is not None
        self.metric, self.mode, self.total, self.echo = cfg.tune.metric, cfg.tune.mode, total, echo
        self.best: float | None = None
        self.ended: dict[str, str] = {}
        self.running: set[str] = set()

    def _standing(self) -> str:
        done = sum(v == "finished" for v in self.ended.values())
        stopped = sum(v == "stopped" for v in self.ended.values())
        failed = sum(v == "error" for v in self.ended.values())
        best = f"{self.best:.4f}" if self.best is not None else "-"
        return (f"[{len(self.ended)}/{self.total} ended: {done} finished, {stopped} stopped, {failed} failed; "
                f"{len(self.running)} running; best {self.metric} {best}]")

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running.add(trial.trial_id)
        self.echo(f"tune: trial {short_id(trial.trial_id)} started: {point_text(trial.config.get('point', {}))}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        value = result.get(self.metric)
        if value is None or result.get("asnn_invalid"):
            return
        value = float(value)
        if self.best is None or (value > self.best if self.mode == "max" else value < self.best):
            self.best = value
        epochs = result.get("trial_epochs", "?")
        self.echo(f"tune: trial {short_id(trial.trial_id)} epoch {result.get('epoch', '?')}/{epochs}: "
                  f"{self.metric} {value:.4f} {self._standing()}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running.discard(trial.trial_id)
        last = trial.last_result or {}
        if last.get("asnn_invalid"):
            self.ended[trial.trial_id] = "invalid"
            self.echo(f"tune: trial {short_id(trial.trial_id)} skipped: {last.get('asnn_invalid_reason', '')}")
            return
        epoch, epochs = last.get("epoch", 0), last.get("trial_epochs", 0)
        finished = bool(epochs) and epoch >= epochs
        self.ended[trial.trial_id] = "finished" if finished else "stopped"
        how = "ran to the end" if finished else f"stopped by the scheduler at epoch {epoch}/{epochs}"
        self.echo(f"tune: trial {short_id(trial.trial_id)} {how} {self._standing()}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running.discard(trial.trial_id)
        self.ended[trial.trial_id] = "error"
        self.echo(f"tune: trial {short_id(trial.trial_id)} failed (see its error in the results table) "
                  f"{self._standing()}")
