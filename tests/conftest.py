"""Shared fixtures. Integration fixtures start real services on loopback (bounded waits) and
stop them afterwards; nothing here mocks Ray, DeepSpeed, MLflow or S3."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
# Dummy credentials for the loopback moto S3 server only, set before Ray starts so that its
# workers inherit them (the package itself reads credentials from the standard AWS chain).
for _key, _value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                     ("AWS_DEFAULT_REGION", "us-east-1")):
    os.environ.setdefault(_key, _value)
BUCKETS = ("asnn-ckpt", "asnn-mlflow", "asnn-data")


@pytest.fixture(params=["native", "torch-ops"])
def kernel_path(request):
    """Run a test with the compiled C kernels (``snn.native``: LIF, per-step BatchNorm) and
    with the torch-op paths that GPUs and other dtypes use.

    The C path is skipped only where no C compiler exists; where one exists, a failing build
    fails the test instead of quietly testing the torch ops twice."""
    import shutil

    from asnn_dist.snn import native

    if request.param == "native":
        if not any(shutil.which(c) for c in ("cc", "gcc", "clang")):
            pytest.skip("no C compiler: the C LIF kernel cannot be built here")
        assert native.load() is not None, "a C compiler exists but the C kernels did not build"
    with native.forced(request.param == "native"):
        yield request.param


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> str:
    """Digits shards (64 samples a shard: 23 train / 6 test shards) shared by the session."""
    from asnn_dist.data.sources import build_digits_shards

    root = tmp_path_factory.mktemp("digits-shards")
    build_digits_shards(str(root), samples_per_shard=64, seed=0)
    return str(root)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the session (4 logical CPUs: 2 workers + slack); the dashboard
    process serves the state API the fault-tolerance test uses to find worker processes."""
    import ray

    ray.init(num_cpus=4, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore::DeprecationWarning"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def postgres_uri():
    from asnn_dist.testing.services import postgres_database

    with postgres_database() as uri:
        yield uri


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """moto's S3-compatible server on loopback with the test buckets created."""
    import boto3

    from asnn_dist.testing.services import moto_s3_server

    with moto_s3_server() as url:
        client = boto3.client("s3", endpoint_url=url)
        for bucket in BUCKETS:
            client.create_bucket(Bucket=bucket)
        yield url


@pytest.fixture(scope="session")
def mlflow_http(tmp_path_factory, postgres_uri, s3_endpoint) -> str:
    """A real ``mlflow server`` process: PostgreSQL backend store, S3 (moto) artifact store."""
    from asnn_dist.testing.services import mlflow_server

    base = tmp_path_factory.mktemp("mlflow-server")
    env = {"MLFLOW_S3_ENDPOINT_URL": s3_endpoint}
    with mlflow_server(postgres_uri, "s3://asnn-mlflow/artifacts", log_path=str(base / "server.log"), env=env) as uri:
        yield uri


@pytest.fixture(scope="module")
def ray_cluster(s3_endpoint, mlflow_http):
    """A real 3-node Ray cluster on loopback: a head (1 CPU, the job driver's slot) and two worker
    nodes (1 CPU each, custom resources asnn_node_a / asnn_node_b), token auth on. The nodes get
    what a real cluster's nodes get from their instance role and config maps: the S3 endpoint
    and credentials (moto's, dummy) and MLFLOW_TRACKING_URI. Always torn down."""
    from asnn_dist.testing.ray_cluster import RayCluster

    cluster = RayCluster(env={"AWS_ENDPOINT_URL": s3_endpoint, "MLFLOW_TRACKING_URI": mlflow_http,
                              "PYTHONWARNINGS": "ignore::DeprecationWarning"})
    try:
        cluster.start_head(num_cpus=1)
        cluster.add_node("a", num_cpus=1, resources={"asnn_node_a": 1})
        cluster.add_node("b", num_cpus=1, resources={"asnn_node_b": 1})
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def one_rank():
    """A one-rank gloo process group in this process (real DeepSpeed engines and collectives).

    A group an earlier test left behind (tests run one after another, so nothing uses it any
    more) is removed first: these tests always run, whatever ran before them."""
    import torch
    import torch.distributed as dist

    from asnn_dist.bench.common import close_local_group
    from asnn_dist.testing.services import free_port

    if dist.is_initialized():
        close_local_group()
    keys = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "DS_ACCELERATOR")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0", DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    close_local_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
