"""The Ray settings ``init_ray`` uses: a local instance started with its background work cut
(metrics collection, prestarted idle workers), overridable from the environment; a cluster
(RAY_ADDRESS / run.ray_address) joined as it is. ``ray.init`` is stubbed: nothing starts."""

from __future__ import annotations

import pytest

from asnn_dist.config import load_config
from asnn_dist.train import launcher


@pytest.fixture
def calls(monkeypatch):
    import ray

    seen: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for key in launcher.LOCAL_RAY_SYSTEM_CONFIG:
        monkeypatch.delenv(f"RAY_{key}", raising=False)
    return seen


def test_local_instance_starts_without_metrics_collection_or_prestarted_workers(calls) -> None:
    launcher.init_ray(load_config(None, ["run.num_workers=1"]))
    (kw,) = calls
    assert kw["_system_config"] == {"enable_metrics_collection": False, "prestart_worker_first_driver": False}
    assert kw["log_to_driver"] is True and "address" not in kw
    assert kw["runtime_env"]["env_vars"]["MALLOC_MMAP_THRESHOLD_"] and kw["runtime_env"]["env_vars"]["DS_ACCELERATOR"]
    assert "include_dashboard" not in kw  # the dashboard (state API, token auth) stays on


def test_environment_keeps_rays_default(calls, monkeypatch) -> None:
    monkeypatch.setenv("RAY_enable_metrics_collection", "1")
    launcher.init_ray(load_config(None, []))
    assert calls[0]["_system_config"] == {"prestart_worker_first_driver": False}


@pytest.mark.parametrize("how", ["env", "config"])
def test_cluster_is_joined_without_local_settings(calls, monkeypatch, how) -> None:
    overrides = []
    if how == "env":
        monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    else:
        overrides = ["run.ray_address=ray://head:10001"]
    launcher.init_ray(load_config(None, overrides))
    (kw,) = calls
    assert "_system_config" not in kw and "num_cpus" not in kw
    assert kw.get("address") in (None, "ray://head:10001") and kw["runtime_env"]["env_vars"]


def test_bench_train_starts_the_same_local_instance() -> None:
    cfg = load_config(None, ["run.num_workers=1"])
    kw = launcher.local_ray_init_kwargs(cfg, log_to_driver=False)
    assert kw["log_to_driver"] is False
    assert {k: v for k, v in kw.items() if k != "log_to_driver"} == \
        {k: v for k, v in launcher.local_ray_init_kwargs(cfg).items() if k != "log_to_driver"}
