"""`ray job submit` to a real multi-node Ray cluster, exactly as the README shows it.

The cluster (``ray_cluster`` in conftest) is a head plus two worker nodes started with
``ray start``, token auth on, on loopback. Shards and checkpoints live on S3 (moto's server),
MLflow is the PostgreSQL-backed tracking server with S3 artifacts: the shared storage a real
cluster needs. Each job is submitted with the ``ray`` CLI in a subprocess, as a user would.

Every run here trains the same deterministic config (CPU, gloo), so the interrupted ones (job
stopped and resubmitted, worker node killed) must end with the uninterrupted run's weights, bit
for bit.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import pytest
import torch

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
ASNN = str(Path(sys.executable).with_name("asnn-dist"))
README_SUBMIT = ("ray job submit --runtime-env cluster/runtime_env.yaml --entrypoint-num-cpus 1 -- "
                 "asnn-dist train configs/demo/digits-lenet-hybrid.yaml --set")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
EPOCHS, MICRO, EVERY = 2, 16, 20


def readme_submit_command() -> list[str]:
    """The README's ``ray job submit`` command (continuation lines joined), as tokens."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Running on a cluster"):]
    joined = re.sub(r"\\\n\s*", " ", section)
    line = next(ln.strip() for ln in joined.splitlines() if ln.strip().startswith("ray job submit"))
    tokens = shlex.split(line)
    assert " ".join(tokens).startswith(README_SUBMIT), f"README's submit command changed: {line}"
    return tokens


def run_overrides(name: str, **extra: str) -> list[str]:
    """What a test adds to the README's overrides: a tiny model and a short, checkpointed run."""
    base = {"name": name, "model.name": "lenet_asnn_tiny", "optim.epochs": str(EPOCHS),
            "optim.micro_batch_size": str(MICRO), "optim.lr": "0.01", "checkpoint.every_steps": str(EVERY),
            "run.name": name, "tracking.registered_model": "null"}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def ray_cli(cluster, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([RAY, *args], cwd=REPO, env=cluster.cli_env(), capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, f"ray {' '.join(args)} -> {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def submit(cluster, tokens: list[str], wait: bool, timeout: float = 600) -> tuple[str, subprocess.CompletedProcess]:
    """Run a ``ray job submit`` command line; returns the submission id and the CLI's result."""
    cmd = list(tokens)
    if not wait:
        cmd.insert(3, "--no-wait")
    r = subprocess.run([RAY, *cmd[1:]], cwd=REPO, env=cluster.cli_env(), capture_output=True, text=True,
                       timeout=timeout)
    found = re.search(r"Job '(raysubmit_\w+)' submitted successfully", r.stdout + r.stderr)
    assert found, f"no submission id in:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return found.group(1), r


def job(cluster, sid: str) -> dict[str, Any]:
    return cluster.api(f"/api/jobs/{sid}")


def wait_job(cluster, sid: str, timeout_s: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = job(cluster, sid)
        if info["status"] in TERMINAL:
            return info
        time.sleep(1)
    raise TimeoutError(f"job {sid} still {info['status']} after {timeout_s:.0f}s")


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint)


def registered_checkpoints(endpoint: str, name: str) -> int:
    """Checkpoints Ray Train's controller registered in S3 (its snapshot), not merely uploaded."""
    try:
        body = s3_client(endpoint).get_object(Bucket="asnn-ckpt", Key=f"runs/{name}/checkpoint_manager_snapshot.json")
    except Exception:  # noqa: BLE001 - not written yet
        return 0
    return len(json.loads(body["Body"].read()).get("checkpoint_results") or [])


def wait_for_checkpoint(cluster, endpoint: str, sid: str, name: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if registered_checkpoints(endpoint, name) >= 1:
            return
        status = job(cluster, sid)["status"]
        assert status not in TERMINAL, f"job ended ({status}) before its first checkpoint"
        time.sleep(0.2)
    raise TimeoutError(f"no checkpoint of {name} after {timeout_s:.0f}s")


def final_weights(endpoint: str, name: str) -> dict[str, torch.Tensor]:
    """The consolidated weights of the run's final checkpoint, read back from S3."""
    from asnn_dist.train.checkpointing import MODEL_FILE, MODEL_META_FILE, load_final_model

    s3 = s3_client(endpoint)
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="asnn-ckpt", Prefix=f"runs/{name}/")
            for o in page.get("Contents", [])]
    finals = sorted(k.rsplit("/", 1)[0] for k in keys if k.endswith(f"/{MODEL_FILE}"))
    assert finals, f"no final model under s3://asnn-ckpt/runs/{name}/"
    with tempfile.TemporaryDirectory() as folder:
        for fname in (MODEL_FILE, MODEL_META_FILE):
            s3.download_file("asnn-ckpt", f"{finals[-1]}/{fname}", f"{folder}/{fname}")
        return load_final_model(folder)[0]


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def mlflow_run(uri: str, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("asnn-demo")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`asnn.run_name` = '{name}'")
    assert len(runs) == 1, f"{len(runs)} MLflow runs named {name}: a resumed job must log into the same run"
    return client, runs[0]


def training_workers(cluster, job_id: str, alive: Optional[bool] = None) -> list[dict[str, Any]]:
    workers = [a for a in cluster.actors("RayTrainWorker") if a.get("job_id") == job_id]
    return [a for a in workers if alive is None or (a["state"] == "ALIVE") == alive]


@pytest.fixture(scope="module")
def reference(ray_cluster, s3_endpoint, mlflow_http):
    """The README's command, run to the end: the uninterrupted run the others must reproduce."""
    name = "cluster-ref"
    tokens = readme_submit_command() + run_overrides(name, **{"tracking.registered_model": "cluster-lenet"})
    t0 = time.monotonic()
    sid, cli = submit(ray_cluster, tokens, wait=True)
    info = job(ray_cluster, sid)
    return {"sid": sid, "cli": cli, "info": info, "name": name, "seconds": time.monotonic() - t0,
            "weights": final_weights(s3_endpoint, name) if info["status"] == "SUCCEEDED" else None}


def test_readme_submit_trains_on_two_nodes_and_registers(reference, ray_cluster, s3_endpoint, mlflow_http):
    sid, info = reference["sid"], reference["info"]
    cli = reference["cli"]
    assert info["status"] == "SUCCEEDED", f"{info.get('message')}\n{cli.stdout[-4000:]}\n{cli.stderr[-2000:]}"
    assert cli.returncode == 0
    print(f"\nREADME job on the 3-node cluster: {reference['seconds']:.1f}s submit to SUCCEEDED")

    # The documented status / logs commands answer as Ray users expect.
    assert re.search(rf"Job '{sid}' succeeded", ray_cli(ray_cluster, "job", "status", sid).stdout)
    logs = ray_cli(ray_cluster, "job", "logs", sid).stdout
    assert re.search(r"run cluster-ref: test top-1 \d\.\d{4}", logs)

    # Workers on two different nodes (STRICT_SPREAD), the driver on a third: with one CPU per
    # node, the driver's reserved CPU (--entrypoint-num-cpus 1) is not a training worker's.
    workers = training_workers(ray_cluster, info["job_id"])
    nodes = {w["node_id"] for w in workers}
    assert len(workers) == 2 and len(nodes) == 2, workers
    (supervisor,) = [a for a in ray_cluster.actors("JobSupervisor") if sid in (a.get("name") or "")]
    assert supervisor["required_resources"].get("CPU") == 1
    assert supervisor["node_id"] == info["driver_node_id"] and info["driver_node_id"] not in nodes

    # MLflow (PostgreSQL + S3 artifacts): metrics, plots, the registered champion.
    client, run = mlflow_run(mlflow_http, "cluster-ref")
    for key in ("val_top1", "train_loss", "val_anytime_top1_t4", "val_firing_rate/mean"):
        assert key in run.data.metrics, key
    assert run.data.params["run.placement_strategy"] == "STRICT_SPREAD"
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/training_curves.png", "plots/neuron_leak_gain.png", "plots/firing_rates.png"} <= plots
    champion = client.get_model_version_by_alias("cluster-lenet", "champion")
    assert champion.run_id == run.info.run_id

    # `asnn-dist evaluate models:/...@champion` reproduces the logged top-1 on the S3 shards.
    ev = subprocess.run([ASNN, "evaluate", "--model", "models:/cluster-lenet@champion", "--data",
                         "s3://asnn-data/digits", "--tracking-uri", mlflow_http], cwd=REPO, capture_output=True,
                        text=True, timeout=300, env=ray_cluster.cli_env())
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert f"top-1 {run.data.metrics['val_top1']:.4f}" in ev.stdout and "(360 samples)" in ev.stdout


def test_job_console_is_clean(reference, ray_cluster):
    """`ray job logs`: eval summaries and the result, no known noise, no blank worker lines."""
    logs = ray_cli(ray_cluster, "job", "logs", reference["sid"]).stdout
    assert "built successfully" not in logs and "PreemptionWatcher" not in logs
    assert "Saving pytorch model by Pickle" not in logs and "local version label" not in logs
    assert not re.search(r"\((RayTrainWorker|TrainController|pid=)[^)]*\)\s*(\x1b\[0m)?\s*$", logs, re.M)
    evals = re.findall(r"^eval step \d+ \(epoch \d+\), top-1 \d\.\d{4}", logs, re.M)
    assert len(evals) == EPOCHS, logs[-3000:]
    assert re.search(r"^train \[#+\] \d+/\d+ steps \(100%\)", logs, re.M)


def test_stopped_job_resubmitted_resumes_bitwise(reference, ray_cluster, s3_endpoint, mlflow_http):
    """`ray job stop` after the first S3 checkpoint, then the same submit command again."""
    assert reference["weights"] is not None
    tokens = readme_submit_command() + run_overrides("cluster-stop")
    sid, _ = submit(ray_cluster, tokens, wait=False)
    wait_for_checkpoint(ray_cluster, s3_endpoint, sid, "cluster-stop")
    ray_cli(ray_cluster, "job", "stop", sid)
    assert wait_job(ray_cluster, sid, 120)["status"] == "STOPPED"
    assert re.search(rf"Job '{sid}' was stopped", ray_cli(ray_cluster, "job", "status", sid).stdout)

    sid2, cli = submit(ray_cluster, tokens, wait=True)
    info = job(ray_cluster, sid2)
    assert info["status"] == "SUCCEEDED", f"{info.get('message')}\n{cli.stdout[-4000:]}"
    _, run = mlflow_run(mlflow_http, "cluster-stop")
    assert int(run.data.tags["asnn.resumed_from_step"]) >= EVERY
    assert_bitwise_equal(final_weights(s3_endpoint, "cluster-stop"), reference["weights"])


def test_killed_worker_node_run_recovers_on_replacement(reference, ray_cluster, s3_endpoint, mlflow_http):
    """SIGKILL a worker node (raylet and workers) mid-run, start a replacement node: the run goes
    on from the last S3 checkpoint and ends with the uninterrupted run's steps and weights.
    Submitted without a working dir: the nodes' installed package runs it, as in the image."""
    assert reference["weights"] is not None
    config = str(REPO / "configs/demo/digits-lenet-hybrid.yaml")
    readme = readme_submit_command()
    user_sets = readme[readme.index("--set") + 1:]
    tokens = ["ray", "job", "submit", "--runtime-env-json", json.dumps({"env_vars": {"ASNN_TEST": "1"}}),
              "--entrypoint-num-cpus", "1", "--", "asnn-dist", "train", config, "--set", *user_sets,
              *run_overrides("cluster-node", **{"run.max_failures": "3"})]
    sid, _ = submit(ray_cluster, tokens, wait=False)
    wait_for_checkpoint(ray_cluster, s3_endpoint, sid, "cluster-node")
    info = job(ray_cluster, sid)
    head = ray_cluster.node_id_with("asnn_head")
    victims = {w["node_id"] for w in training_workers(ray_cluster, info["job_id"], alive=True)}
    victims -= {head, info["driver_node_id"]}
    name = next(n for n, node in ray_cluster.nodes.items()
                if n != "head" and ray_cluster.node_id_with(next(iter(node.resources))) in victims)
    resources = ray_cluster.nodes[name].resources
    t_kill = time.monotonic()
    ray_cluster.kill_node(name)
    ray_cluster.add_node(f"{name}-replacement", num_cpus=1, resources=resources)
    final = wait_job(ray_cluster, sid, 600)
    print(f"\nnode {name} killed; job {final['status']} {time.monotonic() - t_kill:.1f}s later")
    assert final["status"] == "SUCCEEDED", final.get("message")
    logs = ray_cli(ray_cluster, "job", "logs", sid).stdout
    _, run = mlflow_run(mlflow_http, "cluster-node")
    assert int(run.data.tags["asnn.resumed_from_step"]) >= EVERY
    assert int(run.data.metrics["global_step"]) == int(mlflow_run(mlflow_http, "cluster-ref")[1].data.metrics["global_step"])
    assert_bitwise_equal(final_weights(s3_endpoint, "cluster-node"), reference["weights"])
    assert "run cluster-node: test top-1" in logs
