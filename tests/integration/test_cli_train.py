"""``asnn-dist train`` as a user runs it (subprocess, its own local Ray, SQLite MLflow), and the
clear errors a user gets before any training starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from asnn_dist.testing.services import free_port

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "demo" / "digits-lenet-hybrid.yaml")


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "asnn_dist.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_train_cli_sqlite_registers_champion(tmp_path, digits_shards):
    r = cli("train", CONFIG, "--set", f"workdir={tmp_path}", f"data.root={digits_shards}", "data.source=shards",
            "model.name=lenet_asnn_tiny", "optim.epochs=1", "run.name=cli-run", "run.progress=false")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "run cli-run: test top-1" in r.stdout
    assert "registered models:/asnn-lenet/1 (alias @champion -> v1)" in r.stdout
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/mlflow.db" in r.stdout
    # Ray Train's per-report INFO line (the whole metrics dict) stays out of the user's console.
    assert "Reporting training result" not in r.stdout + r.stderr
    # The resolved config is saved with the run and reloads to the same config.
    saved = tmp_path / "ray_results" / "cli-run" / "config.yaml"
    assert saved.is_file()
    from asnn_dist.config import load_config

    cfg = load_config(saved)
    assert cfg.run.name == "cli-run" and cfg.model.name == "lenet_asnn_tiny"
    # Rank 0's background MLflow logger delivered every per-step log, in order, before the end.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    total = int(run.data.metrics["global_step"])
    history = sorted(client.get_metric_history(run.info.run_id, "train_loss"), key=lambda m: m.timestamp)
    assert total >= 20 and [m.step for m in history] == list(range(10, total + 1, 10))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "epoch")] == [total]


def test_unreachable_mlflow_fails_before_training(tmp_path, digits_shards):
    uri = f"http://127.0.0.1:{free_port()}"
    r = cli("train", CONFIG, "--set", f"workdir={tmp_path}", f"data.root={digits_shards}", "data.source=shards",
            f"tracking.uri={uri}", timeout=120)
    assert r.returncode == 3
    assert f"cannot reach MLflow tracking server at {uri}" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "ray_results").exists()  # nothing started


def test_missing_shards_named(tmp_path):
    r = cli("train", CONFIG, "--set", f"workdir={tmp_path}", f"data.root={tmp_path}/nowhere", "data.source=shards",
            timeout=120)
    assert r.returncode == 2
    assert f"{tmp_path}/nowhere/train.manifest.json" in r.stderr
    assert "Traceback" not in r.stderr
