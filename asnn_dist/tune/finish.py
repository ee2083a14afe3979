"""After ``Tuner.fit``: every trial's MLflow child run closed with how it ended, the results
table and plots on the parent run, the Pareto-optimal trials tagged, and the best finished
trial's consolidated model registered (``@champion`` moves only if it beats the holder).

An interrupted search (Ctrl-C, ``ray job stop``) stops here without registering anything: the
same command continues it, and this step runs when it completes.
"""

from __future__ import annotations

import math
import tempfile
from typing import Any, Callable, Optional

from asnn_dist.config import ExperimentConfig
from asnn_dist.tune.results import TrialRecord, best_trial, pareto_front, render_all, seed_table
from asnn_dist.tune.trainable import INVALID_KEY, PARENT_TAG, TRIAL_ID_TAG, trial_run_name

STATUS_TAG = "asnn.trial_status"
PARETO_TAG = "asnn.pareto"
REGISTERED_TAG = "asnn.registered_version"
MLFLOW_STATUS = {"finished": "FINISHED", "stopped": "KILLED", "error": "FAILED", "invalid": "KILLED"}


def _trials(grid: Any) -> list[Any]:
    """Tune's Trial objects behind the ResultGrid (status, id), in the grid's order."""
    return list(getattr(getattr(grid, "_experiment_analysis", None), "trials", None) or [])


def _status(trial: Any, result: Any) -> str:
    last = result.metrics or {}
    if last.get(INVALID_KEY):
        return "invalid"
    if trial.status == "ERROR" or result.error is not None:
        return "error"
    epochs = last.get("trial_epochs")
    return "finished" if epochs and last.get("epoch", 0) >= epochs else "stopped"


def collect_records(cfg: ExperimentConfig, grid: Any, children: dict[str, str]) -> list[TrialRecord]:
    """One TrialRecord per trial: point, status, last metrics, learning curve, child run id."""
    from asnn_dist.config.space import trial_config

    assert cfg.tune is not None
    metric = cfg.tune.metric
    records = []
    for trial, result in zip(_trials(grid), grid):
        point = dict((result.config or {}).get("point") or {})
        df = result.metrics_dataframe
        curve: list[tuple[float, float]] = []
        if df is not None and metric in df and "epoch" in df:
            curve = [(float(e), float(v)) for e, v in zip(df["epoch"], df[metric]) if not math.isnan(float(v))]
        status = _status(trial, result)
        tk = None
        try:
            tc = trial_config(cfg, point, "x")
            tk = (tc.encoding.num_steps, tc.encoding.direct_steps)
        except Exception:  # noqa: BLE001 - an invalid optuna draw has no (T, k)
            pass
        records.append(TrialRecord(trial.trial_id, point, status, dict(result.metrics or {}), curve,
                                   children.get(trial.trial_id), str(result.error) if result.error else None, tk))
    return records


def child_runs(client: Any, cfg: ExperimentConfig, parent: str) -> dict[str, str]:
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent}'", max_results=5000)
    return {r.data.tags.get(TRIAL_ID_TAG): r.info.run_id for r in runs if r.data.tags.get(TRIAL_ID_TAG)}


def register_best(cfg: ExperimentConfig, name: str, best: TrialRecord, storage_fs: Any) -> Any:
    """The best trial's final consolidated model into the registry, logged in its child run."""
    from ray.train import Checkpoint

    from asnn_dist.train.checkpointing import load_final_model
    from asnn_dist.train.launcher import register_model
    from asnn_dist.config.space import trial_config

    path = best.metrics.get("checkpoint_path")
    if not path or not best.mlflow_run_id:
        return None
    tcfg = trial_config(cfg, best.point, trial_run_name(name, best.trial_id))
    with Checkpoint(path=path, filesystem=storage_fs).as_directory() as folder:
        state_dict, meta = load_final_model(folder)
    metrics = {**meta.get("metrics", {}), **{k: v for k, v in best.metrics.items() if isinstance(v, (int, float))}}
    return register_model(tcfg, best.mlflow_run_id, state_dict, meta, metrics, plots=False)


def finish_search(cfg: ExperimentConfig, name: str, parent: str, grid: Any, path: str, storage_fs: Any,
                  echo: Callable[[str], Any] = print, interrupted: bool = False):
    from mlflow.tracking import MlflowClient

    from asnn_dist.tracking.client import RunLogger
    from asnn_dist.tune.search import SearchOutcome

    assert cfg.tune is not None
    metric, mode = cfg.tune.metric, cfg.tune.mode
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    trials = _trials(grid)
    records = collect_records(cfg, grid, child_runs(client, cfg, parent))
    if interrupted or any(t.status not in ("TERMINATED", "ERROR") for t in trials):
        client.set_tag(parent, "asnn.search_state", "interrupted")
        client.set_terminated(parent, "KILLED")
        done = sum(r.status == "finished" for r in records)
        echo(f"tune: search {name} interrupted ({done} trial(s) finished so far); run the same command again "
             "to continue it")
        return SearchOutcome(name, parent, records, None, [], None, False, True, path)
    for r in records:
        if r.mlflow_run_id:
            client.set_tag(r.mlflow_run_id, STATUS_TAG, r.status)
            client.set_terminated(r.mlflow_run_id, MLFLOW_STATUS[r.status])
    front = pareto_front(records, metric)
    for r in front:
        if r.mlflow_run_id:
            client.set_tag(r.mlflow_run_id, PARETO_TAG, "true")
    logger = RunLogger(cfg.tracking.uri, parent)
    best = best_trial(records, metric, mode)
    counts = {s: sum(r.status == s for r in records) for s in ("finished", "stopped", "error", "invalid")}
    logger.log_metrics({f"trials_{s}": float(n) for s, n in counts.items()}, 0)
    client.set_tag(parent, "asnn.pareto_trials", ",".join(r.trial_id for r in front) or "-")
    client.set_tag(parent, "asnn.search_state", "finished")
    if best is not None:
        logger.log_metrics({f"best_{metric}": best.value(metric)}, 0)
        client.set_tag(parent, "asnn.best_trial", best.trial_id)
        client.set_tag(parent, "asnn.best_run_id", best.mlflow_run_id or "")
    with tempfile.TemporaryDirectory() as tmp:
        for file in render_all(records, tmp, metric, mode):
            logger.log_artifact(file, "results")
    registered, moved = client.get_run(parent).data.tags.get(REGISTERED_TAG), False
    if best is not None and cfg.tune.register_best and cfg.tracking.registered_model and not registered:
        reg = register_best(cfg, name, best, storage_fs)
        if reg is not None:
            registered, moved = reg.version, reg.alias_moved
            client.set_tag(parent, REGISTERED_TAG, reg.version)
            if best.mlflow_run_id:
                client.set_tag(best.mlflow_run_id, REGISTERED_TAG, reg.version)
    client.set_terminated(parent, "FINISHED")
    return SearchOutcome(name, parent, records, best, front, registered, moved, False, path)


def summary_lines(outcome: Any, cfg: ExperimentConfig) -> list[str]:
    """The closing lines of ``asnn-dist tune``: counts, best trial, Pareto front, registry, MLflow."""
    assert cfg.tune is not None
    metric = cfg.tune.metric
    recs = outcome.records
    counts = {s: sum(r.status == s for r in recs) for s in ("finished", "stopped", "error", "invalid")}
    lines = [f"search {outcome.name}: {len(recs)} trials, " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)]
    best: Optional[TrialRecord] = outcome.best
    if best is not None:
        lines.append(f"best trial {best.trial_id}: {metric} {best.value(metric):.4f} ({_point(best.point)})")
    if outcome.pareto:
        lines.append("Pareto front (top-1 vs energy): " + "; ".join(
            f"{r.trial_id} {r.value(metric):.4f} @ {r.value('val_energy/total_pj') * 1e-6:.3f} uJ" for r in outcome.pareto))
    if outcome.registered_version:
        name = cfg.tracking.registered_model
        moved = f"alias @{cfg.tracking.alias} -> v{outcome.registered_version}" if outcome.alias_moved else \
            f"alias @{cfg.tracking.alias} kept on the better earlier version"
        lines.append(f"registered models:/{name}/{outcome.registered_version} ({moved})")
    per_seed = seed_table(recs, metric)
    if per_seed:
        lines += ["per point over seeds:", *per_seed]
    lines.append(f"MLflow parent run {outcome.parent_run_id} in {cfg.tracking.uri} (results/results.csv and plots)")
    return lines


def _point(point: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items())
