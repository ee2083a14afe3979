"""`asnn-dist tune` on a real local Ray: every trial a Ray Train V2 run of DeepSpeed workers.

The search is small (4 trials of the digits LeNet, 1 worker each, 2 at a time) but complete: ASHA
sees the workers' epoch reports and stops trials, stopped trials give back their workers and
placement groups, a trial whose worker is killed recovers from its checkpoint, nothing is left
running afterwards, the parent MLflow run holds the results table and plots, each trial is a
nested child run, and the best trial's model is registered."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from asnn_dist.config import load_config

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
DEMO_SEARCH = str(REPO / "configs" / "tune" / "digits-encoding-mix.yaml")


def small_search(tmp_path, shards: str, name: str, *extra: str) -> list[str]:
    """The demo search config scaled down: a few steps per epoch, 1 worker per trial."""
    return [f"workdir={tmp_path}", f"data.root={shards}", "data.source=shards", "data.mode=resampled",
            "data.epoch_length=320", "optim.epochs=3", "run.num_workers=1", f"tune.name={name}",
            "encoding.num_steps=2", "encoding.direct_steps=1", "tune.space={}", *extra]


def here() -> str:
    """This test's Ray (other local Ray instances may run beside it on a shared machine)."""
    import ray

    return ray.get_runtime_context().gcs_address


def alive_actors() -> dict[str, str]:
    from ray.util.state import list_actors

    return {a.actor_id: a.class_name
            for a in list_actors(address=here(), filters=[("state", "=", "ALIVE")], limit=10000)}


def kill_a_worker_after(lines: list[str], needed: tuple[str, ...], search: threading.Thread) -> bool:
    """SIGKILL one training worker of the trials that print ``needed``, once every line is printed.

    Candidates are the workers alive when the first of those lines was printed: no trial had
    ended by then, so a later trial's worker (one with no checkpoint yet) is never the one hit.
    """
    import os
    import signal

    from ray.util.state import list_actors

    def alive_workers() -> list[Any]:
        return list_actors(address=here(), filters=[("class_name", "=", "RayTrainWorker"),
                                                   ("state", "=", "ALIVE")], detail=True)

    candidates: set[str] | None = None
    deadline = time.monotonic() + 600
    while search.is_alive() and time.monotonic() < deadline:
        printed = [any(ln.startswith(n) for ln in lines) for n in needed]
        if candidates is None and any(printed):
            candidates = {w.actor_id for w in alive_workers()}
        if all(printed):
            for worker in alive_workers():
                if worker.actor_id in (candidates or ()):
                    os.kill(worker.pid, signal.SIGKILL)
                    return True
            return False
        time.sleep(0.2)
    return False


def test_asha_search_stops_trials_frees_workers_and_logs_nested_runs(tmp_path, digits_shards, ray_local):
    from mlflow.tracking import MlflowClient
    from ray.util.state import list_placement_groups

    from asnn_dist.tune.search import run_search

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config(DEMO_SEARCH, small_search(
        tmp_path, digits_shards, "asha-test", f"tracking.uri={uri}", "tracking.registered_model=tune-asha",
        # good learning rates first, so the hopeless ones meet them at ASHA's first rung; 20 steps
        # an epoch, so the good ones are above chance there; reduction factor 2 (the demo ships 3).
        # The first rung is at epoch 2, so no trial can end before the worker kill after epoch 1:
        # the killed worker's trial always goes on to recover (at a rung at epoch 1, ASHA could stop
        # the very trial whose worker was just killed, and no recovery would be seen).
        "tune.space.optim.lr={grid: [0.02, 1.0e-6]}", "tune.space.seed={grid: [0, 1]}",
        "tune.max_concurrent_trials=2", "tune.scheduler.name=asha", "tune.scheduler.grace_period=2",
        "tune.scheduler.reduction_factor=2", "data.epoch_length=640",
        "tune.search.name=grid", "run.max_failures=1"))
    before = alive_actors()
    pgs_before = {p.placement_group_id for p in list_placement_groups(address=here(), limit=10000)}
    lines: list[str] = []
    t0 = time.monotonic()
    found: dict[str, Any] = {}
    search = threading.Thread(target=lambda: found.update(out=run_search(cfg, echo=lines.append)), daemon=True)
    search.start()
    # Once both first trials have checkpointed epoch 1, SIGKILL one training worker: its trial
    # must recover like a training run (run.max_failures) and go on from that checkpoint.
    killed = kill_a_worker_after(lines, ("tune: trial 00000 epoch 1/3", "tune: trial 00001 epoch 1/3"), search)
    search.join(timeout=900)
    out = found["out"]
    seconds = time.monotonic() - t0
    print(f"\n4-trial ASHA search: {seconds:.1f}s\n" + "\n".join(lines))

    assert not out.interrupted and len(out.records) == 4
    stopped = [r for r in out.records if r.status == "stopped"]
    finished = [r for r in out.records if r.status == "finished"]
    # ASHA stopped at least one trial at its one rung (epoch 2), counting the workers' epochs
    assert stopped and all(r.value("epoch") == 2 for r in stopped), [(r.point, r.status) for r in out.records]
    assert finished and all(r.value("epoch") == 3 for r in finished)
    assert any(re.search(r"stopped by the scheduler at epoch 2/3", ln) for ln in lines), lines

    # Stopped (and finished) trials gave back every worker, controller and placement group.
    # (A stopped trial's Train controller dies with its trial actor; Ray Train's detached
    # PlacementGroupCleaner notices within seconds, removes the placement group and exits.)
    deadline = time.monotonic() + 60
    while True:
        left = {k: v for k, v in alive_actors().items() if k not in before}
        if all(v == "_AutoscalingCoordinatorActor" for v in left.values()) or time.monotonic() > deadline:
            break
        time.sleep(1)
    print(f"actors gone {time.monotonic() - t0 - seconds:.1f}s after the search returned")
    # Ray Train V2's first run on a cluster creates one detached, named coordinator actor
    # ("AutoscalingCoordinator", get_if_exists): the cluster's, not this search's.
    singletons = [k for k, v in left.items() if v == "_AutoscalingCoordinatorActor"]
    assert len(singletons) <= 1
    left = {k: v for k, v in left.items() if k not in singletons}
    assert left == {}, f"actors left after the search: {left}"
    new_pgs = [p for p in list_placement_groups(address=here(), limit=10000) if p.placement_group_id not in pgs_before]
    assert new_pgs and all(p.state == "REMOVED" for p in new_pgs), [(p.placement_group_id, p.state) for p in new_pgs]

    # MLflow: one parent run with space, scheduler and results; one nested child run per trial.
    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(out.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["asnn.kind"] == "search"
    assert parent.data.params["space.optim.lr"] == '{"grid": [0.02, 1e-06]}'
    assert parent.data.params["scheduler"] == "asha" and parent.data.params["scheduler.grace_period"] == "2"
    assert parent.data.metrics["trials_stopped"] == len(stopped)
    artifacts = {a.path for a in client.list_artifacts(out.parent_run_id, "results")}
    assert {"results/results.csv", "results/learning_curves.png", "results/top1_vs_energy_pareto.png",
            "results/best_top1_by_T_k.png", "results/anytime_best_trials.png"} <= artifacts
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{out.parent_run_id}'")
    assert len(children) == 4
    by_trial = {c.data.tags["asnn.trial_id"]: c for c in children}
    for r in out.records:
        child = by_trial[r.trial_id]
        assert child.info.run_name == f"asha-test-{r.trial_id}"
        assert child.data.tags["asnn.trial_status"] == r.status
        assert child.info.status == ("FINISHED" if r.status == "finished" else "KILLED")
        assert "val_top1" in child.data.metrics and child.data.params["optim.lr"] == str(r.point["optim.lr"])
        if r.status == "finished":  # what a training run logs, plots included
            plots = {a.path for a in client.list_artifacts(child.info.run_id, "plots")}
            assert "plots/training_curves.png" in plots
    pareto = parent.data.tags["asnn.pareto_trials"].split(",")
    assert pareto and all(by_trial[t].data.tags.get("asnn.pareto") == "true" for t in pareto)

    # The trial whose worker was killed resumed from its epoch-1 checkpoint and went on.
    assert killed
    resumed = [c for c in children if "asnn.resumed_from_step" in c.data.tags]
    assert len(resumed) == 1 and int(resumed[0].data.tags["asnn.resumed_from_step"]) >= 10
    assert by_trial[resumed[0].data.tags["asnn.trial_id"]].data.metrics["epoch"] >= 2

    # The best finished trial's consolidated model is registered and holds @champion.
    assert out.best is not None and out.best.point["optim.lr"] == 0.02
    assert out.registered_version == "1" and out.alias_moved
    champion = client.get_model_version_by_alias("tune-asha", "champion")
    assert champion.run_id == out.best.mlflow_run_id
    assert out.best.value("val_top1") > 0.3  # well above chance (0.1) after 3 short epochs


def test_stopped_search_resumes_keeping_finished_trials(tmp_path, digits_shards):
    """Stop `asnn-dist tune` (SIGTERM, as `ray job stop` sends it) while its second trial runs,
    then run the same command: the finished trial is kept, the stopped one resumes from its
    checkpoint (in the same nested MLflow run), and the search completes."""
    import os
    import signal
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = [str(Path(sys.executable).with_name("asnn-dist")), "tune", DEMO_SEARCH, "--set", *small_search(
        tmp_path, digits_shards, "resume-test", f"tracking.uri={uri}", "tracking.registered_model=tune-resume",
        "optim.lr=0.02", "optim.epochs=2", "tune.space.seed={grid: [0, 1]}", "tune.max_concurrent_trials=1",
        "tune.scheduler.name=fifo")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: list[str] = []
    try:
        for line in first.stdout:
            seen.append(line)
            if line.startswith("tune: trial 00001 epoch 1/2"):
                break  # trial 1 has reported (and checkpointed) its first epoch
        first.send_signal(signal.SIGTERM)
        rest, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    out1 = "".join(seen) + rest
    assert first.returncode == 130, out1[-3000:]
    assert "interrupted" in out1 and "run the same command again" in out1, out1[-3000:]
    ids = [ln.split()[2] for ln in out1.splitlines() if ln.startswith("tune: trial ") and " started:" in ln]
    assert ids[:2] == ["00000", "00001"], ids

    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    out2 = second.stdout + second.stderr
    print(f"\nstopped + resumed 2-trial search: {time.monotonic() - t0:.1f}s")
    assert second.returncode == 0, out2[-4000:]
    assert "resuming search resume-test" in out2
    assert "trial 00000 started" not in out2 and "trial 00001 started" in out2
    assert "2 trials, 2 finished" in out2

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("asnn-demo")
    parents = client.search_runs([exp.experiment_id], "tags.`asnn.kind` = 'search'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    tags = {c.data.tags["asnn.trial_id"].rsplit("_", 1)[-1]: c.data.tags for c in children}
    assert sorted(tags) == ["00000", "00001"]
    assert "asnn.resumed_from_step" not in tags["00000"]
    assert int(tags["00001"]["asnn.resumed_from_step"]) >= 10  # one epoch of 10 steps was kept
    assert all(t["asnn.trial_status"] == "finished" for t in tags.values())
