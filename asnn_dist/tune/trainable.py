"""One Tune trial = one full distributed training run (Ray Train V2's Tune pattern).

The trial's function runs in a small Tune actor (``tune.trial_driver_cpus``, default no CPU):
it builds the same ``TorchTrainer`` as ``asnn-dist train`` (``launcher.build_trainer``: N workers,
the worker loop, DeepSpeed ZeRO, checkpoints) and waits for it. The workers' evaluation reports
reach Tune through ``SearchReportCallback`` on the Train controller, so the scheduler (ASHA)
sees every evaluation and can stop the trial; stopping kills the trial actor, which owns the
Train controller, which owns the worker group and its placement group, so all of it goes.

Run names come from the trial id (``<search>-<trial id>``), which Tune keeps across a resumed
search: a restarted trial builds a TorchTrainer with the same name and storage, and Ray Train
resumes it from its last checkpoint, logging into the same (nested) MLflow run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ray.train.v2._internal.execution.callback import ControllerCallback
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback

TRIAL_ID_TAG = "asnn.trial_id"
SEARCH_TAG = "asnn.search_name"
PARENT_TAG = "mlflow.parentRunId"
INVALID_KEY = "asnn_invalid"


@dataclass(frozen=True)
class TrialSetup:
    """What every trial needs from the search driver (passed with ``tune.with_parameters``)."""

    config: dict[str, Any]  # the resolved search config (ExperimentConfig as JSON data)
    parent_run_id: str
    search_name: str


class SearchReportCallback(TuneReportCallback):
    """Forward the workers' evaluation reports to Tune, with the trial's time units.

    Checkpoint-only reports (``checkpoint.every_steps``) carry no metric and are not forwarded:
    Tune would reject a result without the searched metric. Nor is the final one: the trial
    reports it itself once the run is finished (``run_trial``). Each forwarded result carries
    ``evaluation`` (evaluations so far in this Train run) next to the workers' ``epoch``, so
    ASHA counts epochs or evaluations, never Tune's ``training_iteration``."""

    def __init__(self, metric: str, trial_epochs: int) -> None:
        super().__init__()
        self.metric, self.trial_epochs, self.evaluations = metric, trial_epochs, 0

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        first = metrics[0]
        if self.metric not in first:
            return
        self.evaluations += 1
        if first.get("epoch", 0) >= self.trial_epochs:
            return  # the final result goes to Tune from the trial after finish_run (see run_trial)
        out = {**first, "evaluation": self.evaluations, "trial_epochs": self.trial_epochs}
        if checkpoint is not None:
            out[CHECKPOINT_PATH_KEY] = checkpoint.path
        self._training_actor_item_queue.put(out)


class ControllerMailbox(ControllerCallback):
    """Hands the trial the handle of its Train controller (from inside the controller), so a
    stopped trial can abort its run the graceful way (``StopTrainRunOnCleanup``)."""

    def __init__(self, mailbox: Any) -> None:
        self.mailbox = mailbox

    def after_controller_start(self, train_run_context: Any) -> None:
        import ray

        self.mailbox.put(ray.get_runtime_context().current_actor)


_MAILBOX: Optional[Any] = None  # this trial actor's mailbox (one trial per actor process)
_STOPPING = False


class StopTrainRunOnCleanup:
    """Mixin of the trial's Tune actor: when Tune stops the trial (ASHA, end of search), abort
    its Train controller before the actor exits. An aborted controller stops its workers, its
    placement group and Ray Train's detached PlacementGroupCleaner itself. Without this the
    controller just dies with its owner, and the cleanup is left to that cleaner, which polls the
    state API: where the poll fails (Ray 2.60 finds the cluster by auto-detection, which fails
    with several local Ray instances on one machine) the cleaner never removes the group and
    never exits (seen in tests/integration/test_tune_search.py)."""

    def cleanup(self) -> None:  # Trainable.cleanup, called by Trainable.stop
        import ray

        global _STOPPING
        _STOPPING = True
        if _MAILBOX is not None:
            try:
                controller = _MAILBOX.get(block=False)
                ray.get(controller.abort.remote(), timeout=60)
            except Exception:  # noqa: BLE001 - finished already, or the controller is gone
                pass
        super().cleanup()  # type: ignore[misc]


def trial_run_name(search_name: str, trial_id: str) -> str:
    return f"{search_name}-{trial_id}"


def invalid_result(metric: str, mode: str, why: str) -> dict[str, Any]:
    """What a trial reports when the sampler (optuna) drew a config the schema forbids."""
    return {metric: float("-inf") if mode == "max" else float("inf"), INVALID_KEY: 1, "epoch": 0, "evaluation": 0,
            "asnn_invalid_reason": why[:500]}


def run_trial(config: dict[str, Any], setup: Optional[TrialSetup] = None) -> None:
    """Tune function trainable: validate the trial's config, train it on N workers, log it nested."""
    from ray import tune
    from ray.util.queue import Queue

    from asnn_dist.config import ExperimentConfig
    from asnn_dist.errors import ConfigError
    from asnn_dist.train.launcher import build_trainer, finish_run, fit_trainer, save_resolved_config, start_mlflow_run
    from asnn_dist.config.space import parse_space, trial_config

    assert setup is not None
    search_cfg = ExperimentConfig.model_validate(setup.config)
    assert search_cfg.tune is not None
    trial_id = tune.get_context().get_trial_id()
    # Fixed values of the space: grid/random points hold them already, Optuna's draws may not.
    point = {**{d.key: d.values[0] for d in parse_space(search_cfg) if d.kind == "fixed"}, **dict(config["point"])}
    try:
        cfg = trial_config(search_cfg, point, trial_run_name(setup.search_name, trial_id))
    except ConfigError as err:  # only adaptive samplers get here: grid/random points are checked up front
        tune.report(invalid_result(search_cfg.tune.metric, search_cfg.tune.mode, str(err)))
        return
    run_id = start_mlflow_run(cfg, tags={PARENT_TAG: setup.parent_run_id, TRIAL_ID_TAG: trial_id,
                                         SEARCH_TAG: setup.search_name})
    save_resolved_config(cfg)
    global _MAILBOX
    _MAILBOX = Queue(maxsize=1, actor_options={"num_cpus": 0})
    trainer = build_trainer(cfg, run_id, callbacks=[SearchReportCallback(search_cfg.tune.metric, cfg.optim.epochs),
                                                    ControllerMailbox(_MAILBOX)])
    try:
        result = fit_trainer(trainer)
    except Exception:
        if _STOPPING:  # Tune stopped the trial and its run was aborted: nothing more to do
            return
        raise
    if _STOPPING:
        return
    outcome = finish_run(cfg, run_id, result, register=False)  # plots now; the best trial is registered at the end
    # The final result reaches Tune only now: a scheduler stops a trial that reaches max_t at
    # once, which would cut the plots and the run's end short.
    final = {k: v for k, v in outcome.metrics.items() if isinstance(v, (int, float, str, bool))}
    tune.report({**final, "trial_epochs": cfg.optim.epochs, CHECKPOINT_PATH_KEY: outcome.checkpoint_path})
