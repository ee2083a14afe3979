"""The local Ray that ``asnn-dist train`` starts (``init_ray``, metrics collection and worker
prestart off) still serves what the run and its users need: actors, the dashboard's state API
(which Ray Train's placement-group cleaner and ``ray list actors`` use) with token auth, and
no idle worker processes started ahead. In a subprocess: its own Ray, not the session's."""

from __future__ import annotations

import os
import re
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


CONSOLE_SCRIPT = textwrap.dedent("""
    import time
    import ray
    from asnn_dist.config import load_config
    from asnn_dist.train.progress import DriverProgress, WorkerProgress, start_board
    from asnn_dist.train.ray_setup import init_ray

    init_ray(load_config(None, ["run.num_workers=1"]))

    @ray.remote(num_cpus=0)
    def rank0(board):
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("")
        print("REAL WARNING from a worker", flush=True)
        progress = WorkerProgress(board, total=20)
        for _ in range(20):
            time.sleep(0.1)
            progress.update(1, epoch=1)
        progress.evaluated({"global_step": 20, "epoch": 1, "val_top1": 0.5, "val_top5": 0.9, "val_loss": 1.0})
        progress.close()

    board = start_board()
    with DriverProgress(board, poll_s=0.1, plain_every_s=30):
        ray.get(rank0.remote(board))
        time.sleep(4)  # the worker's lines reach the driver through Ray's log stream
    print("RESULT LINE")
    ray.shutdown()
""")


def _run_console_script(tty: bool) -> str:
    """The script's whole output, its stdout a terminal (a pty) or a pipe (``ray job logs``)."""
    import pty
    import select

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if not tty:
        r = subprocess.run([sys.executable, "-c", CONSOLE_SCRIPT], capture_output=True, text=True, timeout=180, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout + r.stderr
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", CONSOLE_SCRIPT], stdout=slave, stderr=slave, env=env)
    os.close(slave)
    chunks: list[bytes] = []
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 180)
            if not ready:
                raise TimeoutError("console script hung")
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        proc.wait(timeout=60)
        os.close(master)
    assert proc.returncode == 0, b"".join(chunks)[-3000:]
    return b"".join(chunks).decode(errors="replace")


def test_console_in_a_terminal_draws_one_line_in_place_and_drops_known_noise() -> None:
    out = _run_console_script(tty=True)
    assert "REAL WARNING from a worker" in out  # real worker output still reaches the user
    assert "built successfully" not in out
    assert not re.search(r"\(rank0 pid=\d+\)\s*(\x1b\[0m)?\s*\r?$", out, re.M)  # no blank worker lines
    assert out.count("\r\x1b[K") >= 3  # the progress line was redrawn in place
    assert "eval step 20 (epoch 1), top-1 0.5000, top-5 0.9000, loss 1.0000" in out
    final = re.findall(r"train \[#+\] 20/20 steps \(100%\) epoch 1", out)
    assert final, out[-2000:]
    assert out.index("eval step 20") < out.index("RESULT LINE")


def test_console_in_a_file_prints_plain_lines() -> None:
    out = _run_console_script(tty=False)
    assert "\x1b[K" not in out and "\r" not in out.replace("\r\n", "\n")
    assert "REAL WARNING from a worker" in out and "built successfully" not in out
    lines = [ln for ln in out.splitlines() if ln.startswith("train [")]
    assert 1 <= len(lines) <= 2 and lines[-1].startswith("train [##############################] 20/20 steps (100%)")
