"""Shared fixtures. Integration fixtures start real services on loopback (bounded waits) and
stop them afterwards; nothing here mocks Ray, DeepSpeed, MLflow or S3."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> str:
    """Digits shards (64 samples a shard: 23 train / 6 test shards) shared by the session."""
    from asnn_dist.data.sources import build_digits_shards

    root = tmp_path_factory.mktemp("digits-shards")
    build_digits_shards(str(root), samples_per_shard=64, seed=0)
    return str(root)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the session (4 logical CPUs: 2 workers + slack)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore::DeprecationWarning"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def postgres_uri():
    from asnn_dist.testing.services import postgres_database

    with postgres_database() as uri:
        yield uri


@pytest.fixture(scope="session")
def mlflow_http(tmp_path_factory, postgres_uri) -> str:
    """A real ``mlflow server`` process backed by PostgreSQL, artifacts on local disk."""
    from asnn_dist.testing.services import mlflow_server

    base = tmp_path_factory.mktemp("mlflow-server")
    with mlflow_server(postgres_uri, str(base / "artifacts"), log_path=str(base / "server.log")) as uri:
        yield uri
