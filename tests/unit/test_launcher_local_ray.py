"""The ``ray.init`` keywords the driver uses: a local instance with its background work cut
(metrics collection, prestarted idle workers), overridable from the environment; a cluster
(RAY_ADDRESS / run.ray_address) joined as it is; inside ``ray job submit`` the job's own
runtime env wins and the driver adds only what it left unset (Ray rejects any overlap)."""

from __future__ import annotations

import json

import pytest
from ray.runtime_env.runtime_env import _merge_runtime_env

from asnn_dist.config import load_config
from asnn_dist.train.ray_setup import LOCAL_RAY_SYSTEM_CONFIG, WORKER_ENV, ray_init_kwargs

CLEAN: dict[str, str] = {}


def test_local_instance_starts_without_metrics_collection_or_prestarted_workers(monkeypatch) -> None:
    for key in LOCAL_RAY_SYSTEM_CONFIG:
        monkeypatch.delenv(f"RAY_{key}", raising=False)
    kw = ray_init_kwargs(load_config(None, ["run.num_workers=1"]), CLEAN)
    assert kw["_system_config"] == {"enable_metrics_collection": False, "prestart_worker_first_driver": False}
    assert kw["log_to_driver"] is True and "address" not in kw
    assert kw["runtime_env"]["env_vars"]["MALLOC_MMAP_THRESHOLD_"] == WORKER_ENV["MALLOC_MMAP_THRESHOLD_"]
    assert kw["runtime_env"]["env_vars"]["DS_ACCELERATOR"] == "cpu"
    assert "include_dashboard" not in kw  # the dashboard (state API, token auth) stays on


def test_environment_keeps_rays_default(monkeypatch) -> None:
    monkeypatch.setenv("RAY_enable_metrics_collection", "1")
    monkeypatch.delenv("RAY_prestart_worker_first_driver", raising=False)
    assert ray_init_kwargs(load_config(None, []), CLEAN)["_system_config"] == {"prestart_worker_first_driver": False}


@pytest.mark.parametrize("how", ["env", "config"])
def test_cluster_is_joined_without_local_settings(how) -> None:
    environ = {"RAY_ADDRESS": "ray://head:10001"} if how == "env" else {}
    overrides = [] if how == "env" else ["run.ray_address=ray://head:10001"]
    kw = ray_init_kwargs(load_config(None, overrides), environ)
    assert "_system_config" not in kw and "num_cpus" not in kw
    assert kw["address"] == "ray://head:10001"
    assert set(kw["runtime_env"]["env_vars"]) == {*WORKER_ENV, "DS_ACCELERATOR"}


def test_gpu_runs_do_not_force_the_cpu_accelerator() -> None:
    kw = ray_init_kwargs(load_config(None, ["run.use_gpu=true"]), {"RAY_ADDRESS": "head:6390"})
    assert "DS_ACCELERATOR" not in kw["runtime_env"]["env_vars"]


def _job_environ(runtime_env: dict) -> dict[str, str]:
    """The environment Ray's job supervisor gives a ``ray job submit`` entrypoint."""
    return {"RAY_ADDRESS": "127.0.0.1:6390",
            "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": runtime_env, "metadata": {}})}


@pytest.mark.parametrize("job_env", [
    {"working_dir": "gcs://_ray_pkg_abc.zip", "env_vars": {"PYTHONWARNINGS": "ignore::UserWarning", "X": "1"}},
    {"env_vars": {k: "user" for k in (*WORKER_ENV, "DS_ACCELERATOR")}},
    {},
], ids=["working-dir-and-some-vars", "all-vars-set-by-user", "empty"])
def test_job_runtime_env_merges_without_conflict_and_user_wins(job_env) -> None:
    kw = ray_init_kwargs(load_config(None, []), _job_environ(job_env))
    ours = kw.get("runtime_env")
    # Ray's own merge (the one that raised "Failed to merge the Job's runtime env") accepts it.
    merged = _merge_runtime_env(job_env, ours)
    assert merged is not None
    for key, value in (job_env.get("env_vars") or {}).items():
        assert merged["env_vars"][key] == value  # the user's job env wins
    for key in (*WORKER_ENV, "DS_ACCELERATOR"):
        assert key in merged["env_vars"]  # and the driver filled in what the job left unset
    if job_env.get("working_dir"):
        assert merged["working_dir"] == job_env["working_dir"]


def test_the_old_runtime_env_conflicted_with_a_job_setting_pythonwarnings() -> None:
    """What ``ray job submit --runtime-env cluster/runtime_env.yaml`` used to hit."""
    job_env = {"env_vars": {"PYTHONWARNINGS": "ignore::DeprecationWarning"}}
    assert _merge_runtime_env(job_env, {"env_vars": dict(WORKER_ENV)}) is None
    assert _merge_runtime_env(job_env, ray_init_kwargs(load_config(None, []), _job_environ(job_env))["runtime_env"])


def test_bench_train_starts_the_launchers_local_instance(monkeypatch) -> None:
    """``bench train``'s Ray side against what ``asnn-dist train`` passes to ``ray.init``:
    only the log forwarding, the CPU floor and the added worker env may differ."""
    from asnn_dist.bench.train import bench_ray_init_kwargs

    for key in LOCAL_RAY_SYSTEM_CONFIG:
        monkeypatch.delenv(f"RAY_{key}", raising=False)
    cfg = load_config(None, ["run.num_workers=1"])
    launcher = ray_init_kwargs(cfg, CLEAN)
    bench = bench_ray_init_kwargs(cfg, {"BENCH_ONLY": "1"})
    assert launcher["log_to_driver"] is True and bench["log_to_driver"] is False
    assert bench["num_cpus"] == max(launcher["num_cpus"], 2)
    assert bench["runtime_env"] == {"env_vars": {**launcher["runtime_env"]["env_vars"], "BENCH_ONLY": "1"}}
    assert launcher["runtime_env"]["env_vars"]["DS_ACCELERATOR"] == "cpu"
    rest = ("log_to_driver", "num_cpus", "runtime_env")
    assert {k: v for k, v in bench.items() if k not in rest} == {k: v for k, v in launcher.items() if k not in rest}
    assert bench["_system_config"] == LOCAL_RAY_SYSTEM_CONFIG
