"""How the driver joins Ray: a local instance sized for the run, or the cluster it was sent to.

Inside ``ray job submit`` the job's runtime env (working_dir, env_vars from
``--runtime-env``) is already the driver's, and Ray refuses a ``ray.init(runtime_env=...)``
that sets any key the job set too. So the driver adds only the worker env vars the job left
unset: the user's job env always wins, and nothing is merged twice.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

from asnn_dist.config import ExperimentConfig

# Quiet, known-harmless library chatter in workers (deprecations inside torch/DeepSpeed).
WORKER_ENV = {
    "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning",
    # Keep freed activation memory in the process instead of returning it to the OS every
    # step and faulting it back in (measured: ~19% more images/s per CPU worker).
    "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "67108864"),
    "MALLOC_TRIM_THRESHOLD_": os.environ.get("MALLOC_TRIM_THRESHOLD_", "268435456"),
}

# Ray system settings of the local instance that ``asnn-dist train`` starts itself (never of a
# cluster it connects to: ``ray start`` / ``ray job submit`` set up their own). Both only cut
# background work that a one-machine run does not use, measured in ``asnn-dist bench train``:
# - enable_metrics_collection: every Ray process records and exports Prometheus metrics, and the
#   dashboard agent samples every process for them, every few seconds; a local instance has no
#   Prometheus scraping it. The dashboard itself (its state API, which Ray Train's
#   placement-group cleaner and ``ray list actors`` use, and its token auth) stays.
# - prestart_worker_first_driver: Ray starts one idle worker process per CPU for the driver's
#   first tasks; Ray Train starts its actors itself, and the idle ones each poll all run long.
# Set RAY_<name> in the environment (e.g. RAY_enable_metrics_collection=1) to keep Ray's default.
LOCAL_RAY_SYSTEM_CONFIG: dict[str, Any] = {"enable_metrics_collection": False, "prestart_worker_first_driver": False}

# Set by Ray's job supervisor in the entrypoint's environment: the submitted job config.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def job_runtime_env(environ: Mapping[str, str] = os.environ) -> Optional[dict[str, Any]]:
    """The runtime env of the Ray job this process is the driver of, or None outside a job."""
    raw = environ.get(JOB_CONFIG_ENV)
    if not raw:
        return None
    return dict(json.loads(raw).get("runtime_env") or {})


def worker_runtime_env(cfg: ExperimentConfig, job_env: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """The env vars the workers need, minus any the submitted job already sets."""
    env_vars = dict(WORKER_ENV)
    if not cfg.run.use_gpu:  # CPU runs: skip DeepSpeed's accelerator probing (and its warning)
        env_vars["DS_ACCELERATOR"] = os.environ.get("DS_ACCELERATOR", "cpu")
    job_vars = (job_env or {}).get("env_vars") or {}
    return {"env_vars": {k: v for k, v in env_vars.items() if k not in job_vars}}


def local_ray_init_kwargs(cfg: ExperimentConfig, log_to_driver: bool = True) -> dict[str, Any]:
    """``ray.init`` keywords of the local instance ``init_ray`` starts (also used by ``bench train``)."""
    need = int(cfg.run.num_workers * cfg.run.cpus_per_worker + 0.999)
    system = {k: v for k, v in LOCAL_RAY_SYSTEM_CONFIG.items() if f"RAY_{k}" not in os.environ}
    # The dashboard also serves the state API that Ray Train's placement-group cleaner polls.
    return dict(num_cpus=max(os.cpu_count() or 1, need), runtime_env=worker_runtime_env(cfg),
                log_to_driver=log_to_driver, configure_logging=False, _system_config=system)


def ray_init_kwargs(cfg: ExperimentConfig, environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """``ray.init`` keywords: join RAY_ADDRESS / run.ray_address as it is, else start locally."""
    address = cfg.run.ray_address or environ.get("RAY_ADDRESS")
    if not address:
        return local_ray_init_kwargs(cfg)
    runtime_env = worker_runtime_env(cfg, job_runtime_env(environ))
    kwargs: dict[str, Any] = dict(address=address, log_to_driver=True, configure_logging=False)
    if runtime_env["env_vars"]:
        kwargs["runtime_env"] = runtime_env
    return kwargs


def init_ray(cfg: ExperimentConfig) -> None:
    """Connect to RAY_ADDRESS / run.ray_address, or start a local instance sized for the run."""
    import ray

    from asnn_dist.train.console import install_log_filter

    if not ray.is_initialized():
        ray.init(**ray_init_kwargs(cfg))
    install_log_filter()
