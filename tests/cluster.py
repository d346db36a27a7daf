"""A real multi-node Ray cluster on 127.0.0.1 for tests: `ray start` processes (a head and workers), each
node with its own ports; a worker node can be killed (SIGKILL of its raylet and everything it started)
and new ones added. Token auth is off for every node and driver (Ray 2.60 turns it on by itself when
~/.ray/auth_token exists)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from scdrugmap_ray.serve.proxy import free_port

VENV_BIN = Path(sys.executable).parent


_HANDED_OUT: set[int] = set()  # nodes start slowly: a port freed here is not bound by its node yet


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports, none handed out before in this process."""
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()  # below the ephemeral range: no outgoing connection takes it before the node binds it
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            ports.append(port)
    return ports


def ray_env(address: str | None = None) -> dict[str, str]:
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
        "RAY_AUTH_MODE": "disabled",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    }
    for var in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(var, None)
    if address:
        env["RAY_ADDRESS"] = address
    return env


@dataclass
class LocalCluster:
    temp: Path
    gcs_port: int
    nodes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def _start(self, args: list[str], name: str) -> subprocess.Popen:
        agent, agent_grpc, metrics, node_manager, object_manager, runtime_env = free_ports(6)
        log = (self.temp / f"{name}.log").open("w")
        proc = subprocess.Popen(
            [str(VENV_BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1",
             f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
             f"--metrics-export-port={metrics}", f"--node-manager-port={node_manager}",
             f"--object-manager-port={object_manager}", f"--runtime-env-agent-port={runtime_env}",
             "--object-store-memory=200000000", "--disable-usage-stats", *args],
            env=ray_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.nodes.append(proc)
        return proc

    def add_worker(self, num_cpus: int, resources: dict[str, float] | None = None) -> subprocess.Popen:
        args = [f"--address={self.address}", f"--num-cpus={num_cpus}"]
        if resources:
            args.append(f"--resources={json.dumps(resources)}")
        proc = self._start(args, f"worker{len(self.nodes)}")
        # one node at a time: nodes on one host pick their socket and log names from what the session
        # folder holds, and two starting together pick the same ones
        self.wait_for_nodes(sum(1 for p in self.nodes if p.poll() is None))
        return proc

    def kill(self, proc: subprocess.Popen) -> None:
        """SIGKILL a node: its `ray start`, raylet and every process they started (a crashed machine)."""
        with contextlib.suppress(psutil.NoSuchProcess):
            family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            for p in family:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
        proc.wait(timeout=30)

    def nodes_info(self, attempts: int = 3) -> list[dict]:
        """ray.nodes() as seen by a fresh driver (retried: on a loaded machine the GCS can be slow to answer)."""
        # marked: Ray itself may print to stdout (e.g. "raylet has lagging heartbeats") around our line
        marker = "NODES_JSON="
        code = f"import json, ray; ray.init(); print({marker!r} + json.dumps(ray.nodes()), flush=True)"
        err = ""
        for _ in range(attempts):
            out = subprocess.run([sys.executable, "-c", code], env=ray_env(self.address), capture_output=True,
                                 text=True, timeout=180)
            lines = [line for line in out.stdout.splitlines() if line.startswith(marker)]
            if out.returncode == 0 and lines:
                return json.loads(lines[-1][len(marker):])
            err = (out.stdout + out.stderr)[-2000:]
            time.sleep(2)
        raise AssertionError(f"no driver could connect to {self.address}: {err}")

    def wait_until_settled(self, timeout_s: float = 180) -> None:
        """Until the GCS counts as alive exactly the nodes still running (a killed node is declared dead only
        after missed heartbeats; until then Ray may still place work on it)."""
        deadline = time.monotonic() + timeout_s
        running = sum(1 for p in self.nodes if p.poll() is None)
        while time.monotonic() < deadline:
            if sum(1 for node in self.nodes_info() if node["Alive"]) == running:
                return
            time.sleep(2)
        raise TimeoutError(f"the cluster still counts killed nodes as alive after {timeout_s} s")

    def wait_for_nodes(self, n: int, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if sum(1 for node in self.nodes_info() if node["Alive"]) >= n:
                return
            time.sleep(1)
        raise TimeoutError(f"{n} Ray nodes did not come up in {timeout_s} s")


@contextlib.contextmanager
def local_cluster(head_cpus: int, workers: list[tuple[int, dict[str, float]]]) -> Iterator[LocalCluster]:
    temp = Path(tempfile.mkdtemp(prefix="raymn_", dir="/tmp"))  # short: socket paths must fit 107 bytes
    (gcs, client) = free_ports(2)
    cluster = LocalCluster(temp, gcs)
    try:
        cluster._start(["--head", f"--port={gcs}", f"--num-cpus={head_cpus}", "--include-dashboard=false",
                        f"--ray-client-server-port={client}", f"--temp-dir={temp}"], "head")
        cluster.wait_for_nodes(1)
        for cpus, resources in workers:
            cluster.add_worker(cpus, resources)
        yield cluster
    finally:
        for proc in reversed(cluster.nodes):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in cluster.nodes:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                cluster.kill(proc)
        for p in psutil.process_iter(["pid", "cmdline"]):
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                if str(temp) in " ".join(p.info["cmdline"] or []):
                    p.kill()
        shutil.rmtree(temp, ignore_errors=True)
