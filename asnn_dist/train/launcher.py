"""Driver side of a training run: check services, prepare data, start Ray Train's TorchTrainer,
then register the consolidated model in MLflow. Runs on the head node (or a laptop)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from asnn_dist.config import ExperimentConfig, dump_config, flatten_config
from asnn_dist.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class TrainOutcome:
    run_name: str
    mlflow_run_id: str
    metrics: dict[str, Any]
    checkpoint_path: Optional[str]
    registered_version: Optional[str]
    alias_moved: bool


def default_run_name(cfg: ExperimentConfig) -> str:
    return f"{cfg.name}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def prepare_data(cfg: ExperimentConfig) -> None:
    """Build the bundled dataset's shards when asked for and check that the manifests exist and
    match data.num_classes / data.in_channels."""
    from asnn_dist.data import s3
    from asnn_dist.data.manifest import check_manifest_matches, load_manifest
    from asnn_dist.train.storage import s3_endpoint

    s3.configure(endpoint_url=s3_endpoint(cfg.s3.endpoint_url))
    if cfg.data.source == "digits":
        from asnn_dist.data.sources import build_digits_shards

        build_digits_shards(cfg.data.root, samples_per_shard=cfg.data.samples_per_shard, seed=cfg.seed)
    for split in (cfg.data.train_split, cfg.data.val_split):
        check_manifest_matches(cfg, load_manifest(f"{cfg.data.root}/{split}.manifest.json"))


RUN_NAME_TAG = "asnn.run_name"


def start_mlflow_run(cfg: ExperimentConfig, tags: Optional[dict[str, str]] = None) -> str:
    """Create the MLflow run, or reopen the one of a resumed job (same run.name). ``tags`` go on a
    new run (a Tune trial passes ``mlflow.parentRunId`` to nest under its search's run)."""
    from mlflow.tracking import MlflowClient

    from asnn_dist.tracking.client import RunLogger, check_tracking_server, experiment_id, set_mlflow_uri

    check_tracking_server(cfg.tracking.uri)
    set_mlflow_uri(cfg.tracking.uri)
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    exp_id = experiment_id(client, cfg.tracking.experiment, cfg.tracking.artifact_location)
    found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{cfg.run.name}'",
                               max_results=1)
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return run_id
    run = client.create_run(exp_id, run_name=cfg.run.name, tags={RUN_NAME_TAG: cfg.run.name, **(tags or {})})
    logger = RunLogger(cfg.tracking.uri, run.info.run_id)
    logger.log_params(flatten_config(cfg))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "config.yaml")
        path.write_text(dump_config(cfg))
        logger.log_artifact(str(path))
    return run.info.run_id


def save_resolved_config(cfg: ExperimentConfig) -> Optional[str]:
    """Write config.yaml beside the run's Ray results (local storage; s3 gets it via MLflow)."""
    if "://" in (cfg.run.storage_path or ""):
        return None
    folder = Path(cfg.run.storage_path, cfg.run.name)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(dump_config(cfg))
    return str(path)


def build_trainer(cfg: ExperimentConfig, run_id: str, board: Any = None, callbacks: Optional[list] = None):
    """The TorchTrainer of one training run (``train`` and every Tune trial build it here): N
    workers running the worker loop, storage and checkpoints under ``run.storage_path``/``run.name``."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from asnn_dist.train.storage import ray_storage, s3_endpoint
    from asnn_dist.train.worker import train_loop_per_worker

    storage_path, storage_fs = ray_storage(cfg.run.storage_path, s3_endpoint(cfg.s3.endpoint_url), cfg.s3.region)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "mlflow_run_id": run_id, "progress_board": board},
        scaling_config=ScalingConfig(
            num_workers=cfg.run.num_workers, use_gpu=cfg.run.use_gpu,
            resources_per_worker={"CPU": cfg.run.cpus_per_worker},
            placement_strategy=cfg.run.placement_strategy,
        ),
        run_config=RunConfig(
            name=cfg.run.name, storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last),
            logging_config=LoggingConfig(log_level=cfg.run.log_level),
            callbacks=list(callbacks or []),
        ),
    )


def fit_trainer(trainer) -> Any:
    """``trainer.fit()`` with a worker's user error (bad data, bad config) surfaced as one line."""
    try:
        return trainer.fit()
    except Exception as exc:  # noqa: BLE001 - surface the worker's user error as one line
        raise _unwrap_user_error(exc) from exc


def run_training(cfg: ExperimentConfig) -> TrainOutcome:
    if not cfg.run.name:
        cfg = cfg.model_copy(deep=True)
        cfg.run.name = default_run_name(cfg)
    from asnn_dist.train.progress import DriverProgress, start_board
    from asnn_dist.train.ray_setup import init_ray
    from asnn_dist.train.storage import ray_storage, s3_endpoint

    prepare_data(cfg)
    ray_storage(cfg.run.storage_path, s3_endpoint(cfg.s3.endpoint_url), cfg.s3.region)  # fail before MLflow
    run_id = start_mlflow_run(cfg)
    save_resolved_config(cfg)
    init_ray(cfg)
    board = start_board() if cfg.run.progress else None
    trainer = build_trainer(cfg, run_id, board)
    with DriverProgress(board) if board is not None else contextlib.nullcontext():
        result = fit_trainer(trainer)
    return finish_run(cfg, run_id, result)


def _unwrap_user_error(exc: BaseException) -> BaseException:
    seen = exc
    while seen is not None:
        if isinstance(seen, UserError):
            return seen
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    for line in text.splitlines():
        if "DataError" in line or "ConfigError" in line:
            return UserError(line.split(":", 1)[-1].strip())
    return exc


REGISTERED_TAG = "asnn.registered_version"


def finish_run(cfg: ExperimentConfig, run_id: str, result: Any, register: bool = True) -> TrainOutcome:
    """Consolidated model -> plots (and, with ``register``, the registry); the MLflow run ends.
    Tune trials pass ``register=False``: only the search's best trial is registered."""
    from mlflow.tracking import MlflowClient

    from asnn_dist.train.checkpointing import load_final_model

    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    metrics = dict(result.metrics or {})
    registered, moved, ckpt_path = None, False, None
    if result.checkpoint is not None:
        ckpt_path = result.checkpoint.path
        done_before = client.get_run(run_id).data.tags.get(REGISTERED_TAG)
        if done_before:  # a finished run started again: nothing new to register
            registered = done_before
        else:
            with result.checkpoint.as_directory() as folder:
                state_dict, meta = load_final_model(folder)
            metrics = {**meta.get("metrics", {}), **metrics}
            reg = register_model(cfg, run_id, state_dict, meta, metrics, register=register)
            if reg is not None:
                registered, moved = reg.version, reg.alias_moved
                client.set_tag(run_id, REGISTERED_TAG, reg.version)
    client.set_terminated(run_id, "FINISHED")
    return TrainOutcome(cfg.run.name, run_id, metrics, ckpt_path, registered, moved)


_finish = finish_run  # the name older callers use


def register_model(cfg: ExperimentConfig, run_id: str, state_dict: dict, meta: dict, metrics: dict,
                   register: bool = True, plots: bool = True):
    """Log the model's plots and (with ``register``) the model itself, registered; the alias
    moves only if it beats the holder (``model_registry``)."""
    import torch

    from asnn_dist.data.manifest import load_manifest
    from asnn_dist.models.build import attach_metadata, model_from_checkpoint
    from asnn_dist.tracking.model_registry import log_and_register
    from asnn_dist.tracking.plots import log_model_plots

    model = model_from_checkpoint(state_dict, meta)
    classes = load_manifest(f"{cfg.data.root}/{cfg.data.train_split}.manifest.json").classes
    attach_metadata(model.eval(), cfg.data.in_channels, cfg.data.image_size, classes)
    if plots:
        log_model_plots(model, cfg.tracking.uri, run_id, metrics)
    if not register:
        return None
    example = torch.rand(2, cfg.data.in_channels, cfg.data.image_size, cfg.data.image_size,
                         generator=torch.Generator().manual_seed(0))
    return log_and_register(
        model, example, tracking_uri=cfg.tracking.uri, run_id=run_id,
        registered_name=cfg.tracking.registered_model, alias=cfg.tracking.alias,
        metric_name="val_top1", metric_value=float(metrics.get("val_top1", 0.0)),
    )
