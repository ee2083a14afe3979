"""`asnn-dist tune` through `ray job submit` on the real multi-node test cluster (``ray_cluster``:
a head whose one CPU the job driver reserves, two 1-CPU worker nodes, token auth), with shards
and Tune's experiment state on S3 and MLflow on its PostgreSQL-backed server: two trials, one
DeepSpeed worker each, run at the same time on the two worker nodes."""

from __future__ import annotations

import re
import time

import pytest

# The submit/wait helpers of the `train` cluster tests (the same `ray` CLI calls a user makes).
from test_cluster_jobs import ray_cli, s3_client, submit, training_workers, wait_job

pytestmark = pytest.mark.integration
SEARCH = "cluster-search"


@pytest.mark.timeout(1200)
def test_search_submitted_to_the_cluster_runs_trials_on_both_worker_nodes(ray_cluster, s3_endpoint, mlflow_http):
    from mlflow.tracking import MlflowClient

    sets = ["data.root=s3://asnn-data/digits", "run.storage_path=s3://asnn-ckpt/tune", "data.mode=resampled",
            "data.epoch_length=320", "optim.epochs=2", "optim.lr=0.02", "run.num_workers=1",
            "encoding.num_steps=2", "encoding.direct_steps=1", "tune.space={}", "tune.space.seed={grid: [0, 1]}",
            "tune.scheduler.name=fifo", f"tune.name={SEARCH}", "tracking.registered_model=cluster-search-lenet"]
    tokens = ["ray", "job", "submit", "--runtime-env", "cluster/runtime_env.yaml", "--entrypoint-num-cpus", "1", "--",
              "asnn-dist", "tune", "configs/tune/digits-encoding-mix.yaml", "--set", *sets]
    t0 = time.monotonic()
    sid, cli = submit(ray_cluster, tokens, wait=False)
    try:
        info = wait_job(ray_cluster, sid, 900)
    finally:
        logs = ray_cli(ray_cluster, "job", "logs", sid, check=False).stdout
        print("\n".join(ln for ln in logs.splitlines() if ln.startswith(("tune:", "search ")))[-3000:])
    print(f"\n2-trial search on the 3-node cluster: {time.monotonic() - t0:.1f}s submit to {info['status']}")
    assert info["status"] == "SUCCEEDED", f"{info.get('message')}\n{logs[-5000:]}"
    # default concurrency: the 2 CPUs left after the driver's fit 2 one-worker trials
    assert f"tune: search {SEARCH}: 2 trials, 2 at a time, 1 workers each" in logs, logs[-3000:]
    assert re.search(rf"search {SEARCH}: 2 trials, 2 finished", logs), logs[-3000:]
    assert "registered models:/cluster-search-lenet/1" in logs

    # Each trial's worker ran on its own worker node; the driver kept the head.
    workers = training_workers(ray_cluster, info["job_id"])
    assert len(workers) == 2 and len({w["node_id"] for w in workers}) == 2, workers
    assert info["driver_node_id"] not in {w["node_id"] for w in workers}

    # Tune's experiment state and every trial's checkpoints are on S3 (what a resubmit resumes).
    keys = [o["Key"] for page in s3_client(s3_endpoint).get_paginator("list_objects_v2").paginate(
        Bucket="asnn-ckpt", Prefix="tune/") for o in page.get("Contents", [])]
    assert any(k.startswith(f"tune/{SEARCH}/experiment_state") for k in keys), keys[:20]
    assert sum(k.endswith("/model.pt") and k.startswith(f"tune/{SEARCH}-") for k in keys) == 2

    client = MlflowClient(tracking_uri=mlflow_http)
    exp = client.get_experiment_by_name("asnn-demo")
    (parent,) = client.search_runs([exp.experiment_id], f"tags.`asnn.run_name` = '{SEARCH}'")
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "results")} >= {"results/results.csv"}
    champion = client.get_model_version_by_alias("cluster-search-lenet", "champion")
    assert champion.run_id == parent.data.tags["asnn.best_run_id"]
