"""Start and stop real local services on loopback with bounded waits.

Used by the tests (and usable by benchmarks): an MLflow tracking server process, a PostgreSQL
database on the machine's server, an S3-compatible server (moto's server mode).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from typing import Iterator, Optional


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (servers, MASTER_PORT); the
    one helper for it (tests, benchmarks and the test cluster all take a port from here)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout_s: float, proc: Optional[subprocess.Popen] = None) -> None:
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process serving {url} exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 (loopback)
                if resp.status < 500:
                    return
        except Exception as exc:  # noqa: BLE001
            last = exc
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f}s ({last})")


def _stop(proc: subprocess.Popen, timeout_s: float = 15.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout_s)


@contextlib.contextmanager
def postgres_database(host: str = "127.0.0.1", port: int = 5432, user: str = "postgres") -> Iterator[str]:
    """A fresh database on the machine's PostgreSQL (trust auth); dropped afterwards."""
    import psycopg2

    name = f"asnn_test_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(host=host, port=port, user=user, dbname="postgres", connect_timeout=10)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg2://{user}@{host}:{port}/{name}"
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def _start_on_free_port(make_cmd, health_path: str, timeout_s: float, attempts: int = 3,
                        log_path: Optional[str] = None, env: Optional[dict[str, str]] = None):
    """Start a server on a free loopback port; retry on a new port if another process took
    the chosen one between probing and binding (a race no port probe can close)."""
    last: Exception | None = None
    for _ in range(attempts):
        port = free_port()
        log = open(log_path or os.devnull, "ab")
        proc = subprocess.Popen(make_cmd(port), stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
        url = f"http://127.0.0.1:{port}"
        try:
            wait_http(f"{url}{health_path}", timeout_s, proc)
            return proc, log, url
        except (RuntimeError, TimeoutError) as exc:
            last = exc
            _stop(proc)
            log.close()
    raise RuntimeError(f"server did not start after {attempts} attempts: {last}")


@contextlib.contextmanager
def mlflow_server(backend_uri: str, artifacts_dir: str, log_path: Optional[str] = None,
                  timeout_s: float = 120.0, env: Optional[dict[str, str]] = None) -> Iterator[str]:
    """An ``mlflow server`` process on a free loopback port; yields its http:// URI."""
    def cmd(port: int) -> list[str]:
        return [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                "--backend-store-uri", backend_uri, "--artifacts-destination", artifacts_dir, "--workers", "1"]

    proc, log, uri = _start_on_free_port(cmd, "/health", timeout_s, log_path=log_path, env=env)
    try:
        yield uri
    finally:
        _stop(proc)
        log.close()


@contextlib.contextmanager
def moto_s3_server(timeout_s: float = 60.0) -> Iterator[str]:
    """moto's S3-compatible HTTP server on loopback; yields its endpoint URL."""
    def cmd(port: int) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]

    proc, log, url = _start_on_free_port(cmd, "/moto-api/", timeout_s)
    try:
        yield url
    finally:
        _stop(proc)
        log.close()
