"""The local Ray that ``asnn-dist train`` starts (``init_ray``, metrics collection and worker
prestart off) still serves what the run and its users need: actors, the dashboard's state API
(which Ray Train's placement-group cleaner and ``ray list actors`` use) with token auth, and
no idle worker processes started ahead. In a subprocess: its own Ray, not the session's."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.integration

SCRIPT = textwrap.dedent("""
    import os, time
    import psutil, ray
    from ray.util.state import list_actors
    from asnn_dist.config import load_config
    from asnn_dist.train.ray_setup import init_ray

    init_ray(load_config(None, ["run.num_workers=1"]))
    time.sleep(3)
    idle = [p for p in psutil.Process().children(recursive=True) if "ray::IDLE" in " ".join(p.cmdline())]
    print("IDLE", len(idle))

    @ray.remote(num_cpus=0)
    class Probe:
        def pid(self):
            return os.getpid()

    probe = Probe.remote()
    pid = ray.get(probe.pid.remote())
    # this instance's address: the test session may run another local Ray beside it
    alive = list_actors(address=ray.get_runtime_context().gcs_address,
                        filters=[("class_name", "=", "Probe"), ("state", "=", "ALIVE")])
    print("STATE_API", [a.pid for a in alive] == [pid])
    ray.shutdown()
""")


def test_local_ray_serves_actors_and_state_api_without_idle_workers() -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "IDLE 0" in r.stdout
    assert "STATE_API True" in r.stdout  # the dashboard answered (token auth is Ray's default)
