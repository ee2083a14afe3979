"""``asnn-dist tune``: the search driver. Checks everything, opens the parent MLflow run, runs
Ray Tune over the trial points (each trial a distributed training run, ``trainable.py``), and
hands the ResultGrid to ``finish.py`` (table, plots, registry).

Resume: Tune's experiment state lives under ``run.storage_path``/``<search name>`` (local or
s3://). Rerunning the same command finds it (``Tuner.can_restore``) and continues: finished
trials are kept, unfinished ones restart and their TorchTrainer resumes from its checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from asnn_dist.config import ExperimentConfig, dump_config
from asnn_dist.errors import UserError
from asnn_dist.config.space import Domain, Sampled, parse_space, sample_points

SEARCH_KIND_TAG = "asnn.kind"
INTERRUPTED_EXIT = 130


@dataclass
class SearchOutcome:
    name: str
    parent_run_id: str
    records: list[Any]
    best: Any
    pareto: list[Any]
    registered_version: Optional[str]
    alias_moved: bool
    interrupted: bool
    experiment_path: str


def search_name(cfg: ExperimentConfig) -> str:
    assert cfg.tune is not None
    return cfg.tune.name or f"{cfg.name}-search"


def default_concurrency(cfg: ExperimentConfig, resources: dict[str, float]) -> int:
    """Trials whose workers all fit at once: CPUs (or GPUs) over one trial's worker group."""
    assert cfg.tune is not None
    if cfg.run.use_gpu:
        fit = resources.get("GPU", 0.0) // cfg.run.num_workers
    else:
        fit = resources.get("CPU", 0.0) // (cfg.run.num_workers * cfg.run.cpus_per_worker + cfg.tune.trial_driver_cpus)
    return max(1, int(fit))


def scheduler_for(cfg: ExperimentConfig, points: list[dict[str, Any]]):
    """ASHA counted in the workers' epochs or evaluations (``time_attr``), or FIFO."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    assert cfg.tune is not None
    sch = cfg.tune.scheduler
    if sch.name == "fifo":
        return FIFOScheduler()
    epochs = max([int(p.get("optim.epochs", cfg.optim.epochs)) for p in points] or [cfg.optim.epochs])
    max_t = sch.max_t
    if max_t is None:
        if sch.time_attr == "evaluation" and cfg.run.eval_every_steps:
            raise UserError("tune.scheduler.max_t: set it when counting evaluations with run.eval_every_steps > 0 "
                            "(the number of evaluations of a full trial)")
        max_t = epochs
    if sch.grace_period > max_t:
        raise UserError(f"tune.scheduler.grace_period={sch.grace_period} exceeds max_t={max_t}")
    return ASHAScheduler(time_attr=sch.time_attr, max_t=max_t, grace_period=sch.grace_period,
                         reduction_factor=sch.reduction_factor)


def space_and_searcher(cfg: ExperimentConfig, sampled: Sampled, domains: list[Domain]) -> tuple[dict, Any, int]:
    """(param_space, search_alg, num_samples): a grid over the checked points, or Optuna's TPE."""
    from ray import tune

    assert cfg.tune is not None
    if cfg.tune.search.name != "optuna":
        return {"point": tune.grid_search(sampled.points)}, None, 1
    try:
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:  # pragma: no cover - depends on the extra
        raise UserError("tune.search.name=optuna needs Optuna: pip install 'asnn-dist[optuna]'") from None
    space: dict[str, Any] = {}
    for d in domains:
        if d.kind == "fixed":
            space[d.key] = d.values[0]
        elif d.kind in ("grid", "choice"):
            space[d.key] = tune.choice(list(d.values))
        elif d.kind == "randint":
            space[d.key] = tune.randint(int(d.low), int(d.high))
        else:
            space[d.key] = getattr(tune, d.kind)(d.low, d.high)
    searcher = OptunaSearch(seed=cfg.tune.search.seed)
    return {"point": space}, searcher, cfg.tune.num_samples


def start_parent_run(cfg: ExperimentConfig, name: str, sampled: Sampled) -> str:
    """The search's MLflow run (reopened when the search resumes): space, scheduler, search."""
    from mlflow.tracking import MlflowClient

    from asnn_dist.tracking.client import RunLogger, check_tracking_server, experiment_id
    from asnn_dist.train.launcher import RUN_NAME_TAG

    assert cfg.tune is not None
    check_tracking_server(cfg.tracking.uri)
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    exp_id = experiment_id(client, cfg.tracking.experiment, cfg.tracking.artifact_location)
    found = client.search_runs([exp_id], max_results=1, filter_string=(
        f"tags.`{RUN_NAME_TAG}` = '{name}' and tags.`{SEARCH_KIND_TAG}` = 'search'"))
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=name, tags={RUN_NAME_TAG: name, SEARCH_KIND_TAG: "search"})
    logger = RunLogger(cfg.tracking.uri, run.info.run_id)
    t = cfg.tune
    params = {f"space.{k}": json.dumps(v) for k, v in _flat_space(cfg).items()}
    params.update({"num_samples": str(t.num_samples), "metric": t.metric, "mode": t.mode,
                   "search": t.search.name, "search.seed": str(t.search.seed), "trials": str(len(sampled.points)),
                   "max_concurrent_trials": str(t.max_concurrent_trials), "scheduler": t.scheduler.name})
    if t.scheduler.name == "asha":
        params.update({f"scheduler.{k}": str(v) for k, v in t.scheduler.model_dump().items() if k != "name"})
    logger.log_params(params)
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "search.yaml").write_text(dump_config(cfg))
        Path(tmp, "points.json").write_text(json.dumps(sampled.points, indent=1))
        logger.log_artifact(str(Path(tmp, "search.yaml")))
        logger.log_artifact(str(Path(tmp, "points.json")))
    return run.info.run_id


def _flat_space(cfg: ExperimentConfig) -> dict[str, Any]:
    from asnn_dist.config.space import flatten_space

    assert cfg.tune is not None
    return flatten_space(cfg.tune.space)


class Interrupts:
    """Ctrl-C (SIGINT) and ``ray job stop`` (SIGTERM) become Tune's graceful stop, and are noted.

    Tune's own SIGINT handler stops the search but says nothing afterwards, and trials it stops
    on the way out look like ended ones; so Tune's handler is switched off
    (TUNE_DISABLE_SIGINT_HANDLER) and both signals set ``interrupted`` and send SIGUSR1, which
    Tune handles exactly like its SIGINT (save the experiment state, stop the trials)."""

    def __init__(self) -> None:
        self.interrupted = False

    def _handler(self, signum: int, frame: Any) -> None:
        self.interrupted = True
        os.kill(os.getpid(), signal.SIGUSR1)

    @contextlib.contextmanager
    def catching(self) -> Iterator["Interrupts"]:
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        for sig in saved:
            signal.signal(sig, self._handler)
        try:
            yield self
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)
            if env is None:
                os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
            else:
                os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = env


def run_search(cfg: ExperimentConfig, echo: Any = print, points: Optional[list[dict[str, Any]]] = None) -> SearchOutcome:
    """Validate, sample, start (or resume) the search, then finish it (``finish.finish_search``).
    ``points`` replaces the sampled points (``bench tune`` runs a chosen few)."""
    import ray
    from ray import tune

    from asnn_dist.train.launcher import prepare_data
    from asnn_dist.train.ray_setup import init_ray
    from asnn_dist.train.storage import ray_storage, s3_endpoint
    from asnn_dist.tune.console import SearchConsole
    from asnn_dist.tune.finish import finish_search
    from asnn_dist.tune.trainable import StopTrainRunOnCleanup, TrialSetup, run_trial

    if cfg.tune is None:
        raise UserError("the config has no 'tune' section: add tune.space (see configs/tune/)")
    # Tune's own console (a config box, wide status tables) is replaced by SearchConsole's lines.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    name = search_name(cfg)
    domains = parse_space(cfg)
    sampled = sample_points(cfg, domains) if cfg.tune.search.name != "optuna" else Sampled(points=[])
    if points is not None:
        sampled = Sampled(points=list(points))
    for note in sampled.notes():
        echo(f"tune: {note}")
    prepare_data(cfg)
    storage_path, storage_fs = ray_storage(cfg.run.storage_path, s3_endpoint(cfg.s3.endpoint_url), cfg.s3.region)
    parent = start_parent_run(cfg, name, sampled)
    init_ray(cfg)
    concurrency = cfg.tune.max_concurrent_trials or default_concurrency(cfg, ray.available_resources())
    param_space, searcher, num_samples = space_and_searcher(cfg, sampled, domains)
    setup = TrialSetup(config=cfg.model_dump(mode="json"), parent_run_id=parent, search_name=name)
    with_setup = tune.with_parameters(run_trial, setup=setup)
    with_setup.__mixins__ = (StopTrainRunOnCleanup,)  # Tune's function trainable inherits it
    trainable = tune.with_resources(with_setup,
                                    {"CPU": cfg.tune.trial_driver_cpus, "memory": cfg.tune.trial_driver_memory_mb * 2**20})
    path = f"{storage_path.rstrip('/')}/{name}"
    total = num_samples if searcher is not None else len(sampled.points)
    console = SearchConsole(cfg, total, echo=echo)
    if tune.Tuner.can_restore(path, storage_filesystem=storage_fs):
        echo(f"tune: resuming search {name} from {cfg.run.storage_path.rstrip('/')}/{name} "
             "(finished trials are kept, unfinished ones continue from their checkpoints)")
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True,
                                   param_space=param_space, storage_filesystem=storage_fs)
    else:
        echo(f"tune: search {name}: {total} trials, {concurrency} at a time, {cfg.run.num_workers} workers each, "
             f"scheduler {cfg.tune.scheduler.name}, metric {cfg.tune.metric} ({cfg.tune.mode})")
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(metric=cfg.tune.metric, mode=cfg.tune.mode, num_samples=num_samples,
                                        scheduler=scheduler_for(cfg, sampled.points), search_alg=searcher,
                                        max_concurrent_trials=concurrency, trial_name_creator=_trial_name,
                                        trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_fs,
                                      verbose=0, callbacks=[console], log_to_file=True),
        )
    _set_console(tuner, console)
    with Interrupts().catching() as signals:
        grid = tuner.fit()
    return finish_search(cfg, name, parent, grid, path, storage_fs, echo=echo, interrupted=signals.interrupted)


def _trial_name(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def _set_console(tuner: Any, console: Any) -> None:
    """A restored Tuner keeps the callbacks it was pickled with; give it this run's console."""
    internal = getattr(tuner, "_local_tuner", None)
    run_config = getattr(internal, "_run_config", None)
    if run_config is not None:
        run_config.callbacks = [console]
        run_config.verbose = 0
