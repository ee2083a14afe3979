"""The configs shipped for real runs (CIFAR Spikformer-4-384, ImageNet Spikformer-8-768 and
SEW-ResNet-34) validate as written, and run for a few steps on CPU once scaled down to tiny
sizes by overrides: the same code path a GPU cluster runs, minus the sizes, in the configs'
own precision (bf16: DeepSpeed's bf16 engine, ``snn.precision``)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from asnn_dist.config import load_config

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
REAL = {
    "cifar/spikformer-4-384-hybrid.yaml": "spikformer_tiny",
    "cifar/spikformer-4-384-direct.yaml": "spikformer_tiny",
    "imagenet/spikformer-8-768-hybrid.yaml": "spikformer_tiny",
    "imagenet/sew-resnet34-hybrid.yaml": "sew_resnet_tiny",
}


@pytest.mark.parametrize("path", sorted(REAL))
def test_real_config_validates_as_written(path):
    cfg = load_config(REPO / "configs" / path)
    assert cfg.run.use_gpu and cfg.engine.precision == "bf16"
    assert cfg.data.root.startswith("s3://") and cfg.run.storage_path.startswith("s3://")


@pytest.mark.parametrize("path", sorted(REAL))
def test_real_config_runs_scaled_down(path, tmp_path, digits_shards, ray_local):
    from asnn_dist.train.launcher import run_training

    cfg = load_config(REPO / "configs" / path, [
        f"workdir={tmp_path}", f"data.root={digits_shards}", "data.val_split=test", "data.in_channels=1",
        "data.num_classes=10",
        "data.image_size=16", "data.num_workers=0", "data.mode=resampled", "data.epoch_length=128",
        f"model.name={REAL[path]}", "optim.micro_batch_size=16", "optim.epochs=1", "optim.warmup_steps=1",
        "run.num_workers=2", "run.use_gpu=false", "run.cpus_per_worker=1", "run.threads_per_worker=1",
        "run.storage_path=null", "run.eval_every_steps=0", "run.progress=false",
        "checkpoint.every_steps=0", "tracking.uri=null", "tracking.registered_model=null",
    ])
    assert cfg.engine.precision == "bf16"  # the config's own precision, not forced to fp32
    out = run_training(cfg)
    assert out.metrics["global_step"] == 128 // (2 * 16)
    assert out.metrics["val_count"] == 360 and math.isfinite(out.metrics["val_loss"])


SEARCHES = {  # the cluster search configs, each narrowed to one trial of its own search algorithm
    "tune/cifar10-encoding-mix.yaml": ["tune.space.encoding.num_steps={grid: [4]}",
                                       "tune.space.encoding.direct_steps={grid: [1]}",
                                       "tune.space.neuron.adaptive={grid: [true]}", "tune.num_samples=1"],
    "tune/imagenet-encoding-mix.yaml": ["tune.num_samples=1", "tune.scheduler.max_t=1"],
}


@pytest.mark.parametrize("path", sorted(SEARCHES))
def test_search_config_runs_scaled_down(path, tmp_path, digits_shards, ray_local):
    """The CIFAR (random search) and ImageNet (Optuna TPE) search configs run a trial end to end:
    drawn point inside the space, a DeepSpeed trial in the config's bf16, nested MLflow run."""
    from mlflow.tracking import MlflowClient

    from asnn_dist.tune.search import run_search

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config(REPO / "configs" / path, [
        f"workdir={tmp_path}", f"data.root={digits_shards}", "data.val_split=test", "data.in_channels=1",
        "data.num_classes=10", "data.image_size=16", "data.num_workers=0", "data.mode=resampled",
        "data.epoch_length=64", "model.name=spikformer_tiny", "optim.micro_batch_size=16", "optim.epochs=1",
        "optim.warmup_steps=1", "run.num_workers=1", "run.use_gpu=false", "run.cpus_per_worker=1",
        "run.threads_per_worker=1", "run.storage_path=null", "run.eval_every_steps=0", "run.progress=false",
        "checkpoint.every_steps=0", f"tracking.uri={uri}", "tracking.registered_model=null",
        "tune.max_concurrent_trials=1", "tune.scheduler.grace_period=1", *SEARCHES[path]])
    assert cfg.engine.precision == "bf16" and cfg.tune.search.name in ("random", "optuna")
    lines: list[str] = []
    out = run_search(cfg, echo=lines.append)
    assert not out.interrupted and len(out.records) == 1, "\n".join(lines)
    (trial,) = out.records
    assert trial.status == "finished" and math.isfinite(trial.value("val_top1")), "\n".join(lines)
    assert 0.0002 <= trial.point["optim.lr"] <= 0.001  # drawn from the config's loguniform range
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(out.parent_run_id).data.params["search"] == cfg.tune.search.name
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    (child,) = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{out.parent_run_id}'")
    assert child.data.params["engine.precision"] == "bf16" and "val_top1" in child.data.metrics
