"""A real multi-node Ray cluster on one machine: ``ray start --head`` plus ``ray start --address``
worker nodes, each its own raylet with its own CPU count and custom resource, token auth on,
all on loopback. Used by the cluster tests; every wait is bounded and ``stop`` always cleans up.

Each node is a ``ray start --block`` process; its process tree (raylet, GCS, dashboard, agents,
workers) is what ``kill_node`` SIGKILLs, the way a machine dies. The cluster lives in its own
temp dirs, so a ``ray.init()`` elsewhere on the machine never finds it by accident.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import psutil

from asnn_dist.testing.services import free_port

RAY = str(Path(sys.executable).with_name("ray"))


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    log: Path
    resources: dict[str, float]
    tree: set[int] = field(default_factory=set)

    def refresh_tree(self) -> None:
        """Remember every process of the node (killing must reach children of dead parents)."""
        try:
            self.tree |= {p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            pass


class RayCluster:
    """Start with ``start_head``, grow with ``add_node``, always end with ``stop``."""

    def __init__(self, env: Optional[dict[str, str]] = None) -> None:
        # Short path: Ray's Unix sockets live under it (108-byte limit).
        self.root = Path(tempfile.mkdtemp(prefix="asnnrc-", dir="/tmp"))
        token_home = self.root / "home"
        token_home.mkdir()
        self.env = {**os.environ, **(env or {}), "RAY_AUTH_MODE": "token"}
        self.env.pop("RAY_ADDRESS", None)
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}"
        # The README's step: `ray get-auth-token --generate` on the head (here into its own HOME).
        subprocess.run([RAY, "get-auth-token", "--generate"], env={**self.env, "HOME": str(token_home)},
                       check=True, capture_output=True, timeout=60)
        self.token_path = token_home / ".ray" / "auth_token"
        self.token = self.token_path.read_text().strip()
        self.env["RAY_AUTH_TOKEN_PATH"] = str(self.token_path)
        self.nodes: dict[str, Node] = {}
        self.gcs_address = ""
        self.dashboard_url = ""
        # Worker port ranges below Linux's ephemeral range (32768+), where free_port() picks.
        self._ports = iter(range(10000 + (os.getpid() % 80) * 250, 32000, 250))

    # ---- nodes ---------------------------------------------------------------------------
    def _node_ports(self) -> list[str]:
        base = next(self._ports)
        return ["--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
                "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
                "--min-worker-port", str(base), "--max-worker-port", str(base + 120)]

    def _start(self, name: str, args: list[str], resources: dict[str, float], timeout_s: float) -> Node:
        for attempt in range(3):  # another process may take a probed port before Ray binds it
            try:
                return self._start_once(name, args, resources, timeout_s)
            except RuntimeError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _start_once(self, name: str, args: list[str], resources: dict[str, float], timeout_s: float) -> Node:
        log = self.root / f"{name}.log"
        # One temp dir per node, as separate machines have: a shared one would let one node's
        # runtime-env cleanup delete another node's job working dir.
        cmd = [RAY, "start", "--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1",
               "--temp-dir", str(self.root / name), "--resources", json.dumps(resources), *self._node_ports(), *args]
        with open(log, "ab") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        node = Node(name, proc, log, resources)
        self.nodes[name] = node
        self._wait(lambda: self._alive_with(resources), timeout_s, f"node {name} to join", node)
        node.refresh_tree()
        return node

    def start_head(self, num_cpus: int = 1, resources: Optional[dict[str, float]] = None,
                   timeout_s: float = 120.0) -> Node:
        port, dash = free_port(), free_port()
        self.gcs_address, self.dashboard_url = f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}"
        args = ["--head", "--port", str(port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                "--ray-client-server-port", str(free_port()), "--num-cpus", str(num_cpus)]
        return self._start("head", args, resources or {"asnn_head": 1}, timeout_s)

    def add_node(self, name: str, num_cpus: int, resources: dict[str, float], timeout_s: float = 120.0) -> Node:
        args = ["--address", self.gcs_address, "--num-cpus", str(num_cpus)]
        return self._start(name, args, resources, timeout_s)

    def kill_node(self, name: str) -> list[int]:
        """SIGKILL the node's raylet, its workers and everything else it started (a dead machine)."""
        node = self.nodes.pop(name)
        node.refresh_tree()
        pids = [node.proc.pid, *node.tree]
        _signal_all(pids, signal.SIGKILL)
        node.proc.wait(timeout=30)
        return pids

    # ---- state -------------------------------------------------------------------------
    def api(self, path: str, method: str = "GET", timeout_s: float = 10.0) -> Any:
        """The dashboard's REST API with the cluster token (what the ray CLI sends)."""
        req = urllib.request.Request(f"{self.dashboard_url}{path}", method=method,
                                     headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310 (loopback)
            return json.loads(resp.read() or b"null")

    def alive_nodes(self) -> list[dict[str, Any]]:
        data = self.api("/api/v0/nodes?limit=100&detail=1")
        return [n for n in data["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def node_id_with(self, resource: str) -> Optional[str]:
        for node in self.alive_nodes():
            if resource in (node.get("resources_total") or {}):
                return node["node_id"]
        return None

    def actors(self, class_name: str) -> list[dict[str, Any]]:
        data = self.api(f"/api/v0/actors?limit=1000&detail=1&filter_keys=class_name&filter_predicates=%3D"
                        f"&filter_values={class_name}")
        return data["data"]["result"]["result"]

    def _alive_with(self, resources: dict[str, float]) -> bool:
        try:
            return all(self.node_id_with(r) for r in resources)
        except Exception:  # noqa: BLE001 - not answering yet
            return False

    def _wait(self, ready, timeout_s: float, what: str, node: Optional[Node] = None) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if node is not None and node.proc.poll() is not None:
                raise RuntimeError(f"{what}: ray start exited {node.proc.returncode}:\n{node.log.read_text()[-3000:]}")
            if ready():
                return
            time.sleep(0.5)
        raise TimeoutError(f"waited {timeout_s:.0f}s for {what}")

    # ---- teardown ----------------------------------------------------------------------
    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM every node's processes (workers first, head last), SIGKILL what lingers."""
        order = [n for n in self.nodes if n != "head"] + (["head"] if "head" in self.nodes else [])
        pids: list[int] = []
        for name in order:
            node = self.nodes[name]
            node.refresh_tree()
            pids += [*node.tree, node.proc.pid]
        _signal_all(pids, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not all(_gone(pid) for pid in pids):
            time.sleep(0.2)
        _signal_all([pid for pid in pids if not _gone(pid)], signal.SIGKILL)
        for node in self.nodes.values():
            node.proc.wait(timeout=30)
        self.nodes.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    def cli_env(self) -> dict[str, str]:
        """What a user's shell has after the README's ``export RAY_ADDRESS=... RAY_AUTH_MODE=token``."""
        return {**self.env, "RAY_ADDRESS": self.dashboard_url}


def _gone(pid: int) -> bool:
    """Exited (a zombie counts: its parent, the node's ``ray start``, is gone and cannot reap it)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
