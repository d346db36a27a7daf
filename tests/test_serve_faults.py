"""The Serve app under faults and overload, for real on 127.0.0.1: a predictor replica and an ingress replica
killed under load, 4x the measured capacity for 30 s, and SIGTERM to `scdrugmap-ray serve` during load.
Bounded in count and time; the shared app of tests/serving.py (two predictor, two ingress replicas)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from serving import API_KEY, HAPROXY, free_port, served

pytestmark = pytest.mark.slow
H = {"X-API-Key": API_KEY}
REPO = Path(__file__).resolve().parents[1]
N_KILL_LOAD = 480  # requests of the load a replica is killed under


@pytest.fixture(scope="module")
def app(ray_session: None) -> dict[str, Any]:
    return served()


def _replicas(deployment: str) -> list[str]:
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == "serve" and f"#{deployment}#" in a["name"])


def _running(deployment: str) -> int:
    from ray import serve

    d = serve.status().applications["scdrugmap"].deployments[deployment]
    return int(d.replica_states.get("RUNNING", 0))


def _kill_under_load(app: dict[str, Any], deployment: str, shed_ok: bool = False) -> tuple[Any, float]:
    """Load at the server's capacity (as many clients as the predictors have slots, 480 requests of 20 cells);
    one ``deployment`` replica killed 2 s in. Returns
    the load result and the seconds until the app was back at full strength (a new replica RUNNING, /readyz
    200). The service itself stays up meanwhile: the load's answers show it."""
    import ray
    from scdrugmap_ray.serve.bench import drive, request_bodies
    from scdrugmap_ray.serve.bench import predicted_cells as _predicted_cells

    bodies = request_bodies(app["h5ad"], "pca-sim", N_KILL_LOAD, 20)
    out: dict[str, Any] = {}
    load = threading.Thread(target=lambda: out.update(res=drive(
        app["url"], "/v1/predict", bodies, _predicted_cells, clients=app["slots"], timeout_s=120, headers=H,
        shed_ok=shed_ok)))
    before = _replicas(deployment)
    assert len(before) == 2, before
    load.start()
    time.sleep(2.0)
    ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
    killed = time.monotonic()
    load.join(timeout=180)
    # the premise: the load went on well past the kill
    assert out["res"].seconds > 4.0, f"the load ended {out['res'].seconds:.1f} s in: too short to meet the kill"
    deadline = killed + 90
    # back: the killed replica is gone from the list, its replacement is RUNNING (right after the kill the
    # controller may not have noticed yet and still counts two RUNNING), and the app is ready
    while not (before[0] not in _replicas(deployment) and len(_replicas(deployment)) == 2
               and _running(deployment) == 2
               and httpx.get(app["url"] + "/readyz", timeout=10).status_code == 200):
        assert time.monotonic() < deadline, f"{deployment} not back within 90 s"
        time.sleep(0.25)
    return out["res"], time.monotonic() - killed


def test_predictor_replica_killed_under_load_costs_no_client_an_error(app: dict[str, Any]) -> None:
    res, back_s = _kill_under_load(app, "Predictor")
    # a prediction is a pure function of its input: the ingress retries it on the other replica
    assert res.errors == 0 and res.missing == 0 and res.ok == N_KILL_LOAD, (res.line(), res.statuses)
    # the service never went away (every request above answered); the replacement replica starts a process
    # and imports torch: 10-16 s measured on the shared 2-core machine
    print(f"predictor replica replaced after {back_s:.1f} s")
    assert back_s < 60, f"predictor back after {back_s:.1f} s"


def test_ingress_replica_killed_under_load_costs_no_client_an_error(app: dict[str, Any]) -> None:
    res, back_s = _kill_under_load(app, "Ingress", shed_ok=True)
    print(f"ingress replica killed: {res.line()} {res.statuses}; replaced after {back_s:.1f} s")
    if HAPROXY:
        # HAProxy replays the requests the dead replica took on the other one (serve/proxy.py), and nothing
        # sheds what a stall held up (a predictor's core worker blocks ~2 s reporting a result to the dead
        # caller; the ingress's line waits a stall out, Admission): every request answered 200, the issue's
        # "zero 5xx". A kept-alive connection HAProxy closes as a request leaves (its reload when the replica
        # set changes) answers nothing; the client sends it again on a new connection (serve/bench.drive
        # counts it in `reconnects`; seen once in a whole-suite run)
        assert res.reconnects <= 4, (res.line(), res.statuses)
        assert res.statuses == {200: N_KILL_LOAD} and res.errors == 0 and res.missing == 0, (res.line(), res.statuses)
    else:
        # Ray's default proxy does not retry a request whose ingress replica died after taking it: at most the
        # requests in flight on it at that moment fail (500, or 408 when the proxy gave up waiting)
        lost = sum(n for code, n in res.statuses.items() if code != 200)
        assert set(res.statuses) <= {200, 500, 408, 503} and lost <= app["slots"], (res.line(), res.statuses)
        assert res.ok == N_KILL_LOAD - lost and res.missing == 0, (res.line(), res.statuses)
    assert back_s < 60, f"ingress back after {back_s:.1f} s"
    from scdrugmap_ray.serve.bench import load_test

    after = load_test(app["url"], "pca-sim", app["h5ad"], clients=app["holds"], n_requests=40, cells_per_request=20,
                      timeout_s=60, api_key=API_KEY)
    assert after.errors == 0 and after.ok == 40, after.line()


def test_overload_is_shed_fast_and_memory_returns(app: dict[str, Any]) -> None:
    from scdrugmap_ray.serve.bench import drive, open_loop, request_bodies, server_rss
    from scdrugmap_ray.serve.bench import predicted_cells as _predicted_cells

    bodies = request_bodies(app["h5ad"], "pca-sim", 200, 200)
    # a warm-up first: it loads the model into the replicas that replaced the killed ones, so the unloaded
    # latency and the RSS compared are those of a warm server
    drive(app["url"], "/v1/predict", bodies[:10], _predicted_cells, clients=1, timeout_s=60, headers=H)
    unloaded = drive(app["url"], "/v1/predict", bodies, _predicted_cells, clients=1, timeout_s=60, headers=H)
    rss0 = server_rss()
    # capacity: closed loop with as many clients as the server holds without refusing (more would be shed and
    # the answered rate would understate what the predictors do)
    cap = drive(app["url"], "/v1/predict", bodies[:80], _predicted_cells, clients=app["holds"], timeout_s=60,
                headers=H, shed_ok=True)
    capacity = cap.ok / cap.seconds
    res = open_loop(app["url"], "/v1/predict", bodies, _predicted_cells, rate=4 * capacity, duration_s=30,
                    timeout_s=30, headers=H, label="4x")
    info = f"unloaded {unloaded.line()} | capacity {cap.line()} | {res.line()} {res.statuses}"
    print(info)
    print(f"accepted p99 at 4x / unloaded p99: {res.p(99) / unloaded.p(99):.2f}")
    assert set(res.statuses) <= {200, 503, 429} and res.errors == 0 and res.missing == 0, info
    assert res.shed > 0 and res.retry_after_missing == 0, info
    # the goal "every answer within 2 s": the ingress's line holds a request at most max_queue_wait_s
    # (0.5 s) while it moves, and a full line pushes its oldest out at once. Measured here (three runs): slowest
    # shed 0.10-0.26 s, accepted p99 0.10-0.13 s. Checked when the load generator kept its schedule: on 2 cores
    # it can itself be starved (seen once: 46 s to send 30 s of load, its own delays in every latency it measured)
    slowest = max(res.latencies + res.shed_latencies)
    if res.client_lag_s < 0.5:
        assert slowest < 2.0, info
    else:
        print(f"the load generator fell {res.client_lag_s:.1f} s behind its schedule: the 2 s bound is not "
              f"measurable in this run (slowest answer {slowest:.1f} s)")
        assert slowest < 60.0, info
    # the accepted p99 against the unloaded p99 is printed, not asserted here: the two predictor replicas of
    # this app keep both cores of this machine busy under load, and the ingress, HAProxy and the load generator
    # share them (measured 1.99-3.14); the server sized to the machine is held to it in
    # test_overload_on_a_server_sized_to_the_machine_keeps_accepted_requests_fast
    time.sleep(5)
    rss1 = server_rss()
    print(f"server RSS {rss0 / 2**20:.0f} MB before the burst, {rss1 / 2**20:.0f} MB 5 s after "
          f"({(rss1 / rss0 - 1) * 100:+.0f}%)")
    # the goal: back within 20% of the start
    assert rss1 < 1.2 * rss0, f"server RSS {rss0 / 2**20:.0f} MB -> {rss1 / 2**20:.0f} MB after the burst; {info}"


def _post(client: httpx.Client, body: dict[str, Any], log: list[tuple[str, float]]) -> None:
    t0 = time.monotonic()
    try:
        r = client.post("/v1/predict", json=body, headers=H)
        log.append((str(r.status_code), t0))
        if r.status_code in (429, 503):  # a well-behaved client waits as told
            time.sleep(min(float(r.headers.get("retry-after", 1)), 1.0))
    except httpx.ConnectError:
        log.append(("refused", t0))  # not accepted: the server is gone
    except httpx.HTTPError as err:  # accepted, then dropped: what the drain must never do
        log.append((f"dropped {type(err).__name__}", t0))


def _spread_requests(url: str, seconds: float) -> tuple[list[int], float]:
    """Keyed GETs of /v1/models from 4 threads for ``seconds``, each on a new connection (so the proxy spreads
    them over the ingress replicas): the status codes and the seconds they took."""
    from concurrent.futures import ThreadPoolExecutor

    end = time.monotonic() + seconds

    def worker(_: int) -> list[int]:
        codes = []
        while time.monotonic() < end:
            with httpx.Client(base_url=url, timeout=30) as c:
                r = c.get("/v1/models", headers=H)
            codes.append(r.status_code)
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1 and "rate limit" in r.json()["detail"], r.text
        return codes

    t0 = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        out = [code for codes in pool.map(worker, range(4)) for code in codes]
    return out, time.monotonic() - t0


def _ingress_log_counts(ray_tmp: str, needle: str) -> list[int]:
    """How many access-log lines with ``needle`` each ingress replica of the Ray under ``ray_tmp`` wrote."""
    logs = sorted(f for f in Path(ray_tmp).glob("**/session_*/logs/serve/replica_scdrugmap_Ingress_*.log")
                  if "session_latest" not in f.parts)
    return [sum(needle in line for line in f.read_text(errors="replace").splitlines()) for f in logs]


@contextmanager
def _cli_server(app: dict[str, Any], *options: str) -> Iterator[tuple[subprocess.Popen[str], str, str]]:
    """`scdrugmap-ray serve` on the test registry in its own local Ray (never the session's or anyone's
    cluster), ready (/readyz 200): yields the process, its URL and Ray's temp dir; killed if still running at
    the end, and the HAProxy it may leave behind stopped."""
    import tempfile

    port = free_port()
    # a short temp dir: Ray's socket paths
    ray_tmp = tempfile.mkdtemp(prefix="sdm-cli-", dir="/tmp")
    env = {**os.environ, "RAY_ADDRESS": "local", "SCDRUGMAP_TEST_KEY": API_KEY, "RAY_TMPDIR": ray_tmp}
    if HAPROXY:  # as an operator runs it: the HAProxy variables exported, with its own files and ports
        from scdrugmap_ray.serve.proxy import haproxy_env

        env.update(haproxy_env())
    cmd = [sys.executable, "-m", "scdrugmap_ray.cli.main", "serve", "--registry", str(app["registry"]),
           "--port", str(port), "--api-key-env", "SCDRUGMAP_TEST_KEY", "--proxy", "haproxy" if HAPROXY else "ray",
           *options]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 150
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=10).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"serve did not become ready: {proc.communicate()[0][-3000:]}")
            time.sleep(0.5)
        yield proc, url, ray_tmp
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if HAPROXY:
            from scdrugmap_ray.serve.proxy import stop_haproxy

            print(f"HAProxy processes left running after the server exited: {len(stop_haproxy(env))}")


def test_overload_on_a_server_sized_to_the_machine_keeps_accepted_requests_fast(app: dict[str, Any]) -> None:
    """The issue's "p99 of accepted requests under 2x the unloaded p99" at 4x the capacity, on the CLI's
    server sized to this 2-core machine: one predictor replica (one core busy under load) and one ingress
    replica, the other core left to the ingress, HAProxy and the load generator. (The shared app's two
    predictors keep both cores busy under load: with the rest on the same cores its accepted requests take
    longer, test_overload_is_shed_fast_and_memory_returns prints by how much.)"""
    from scdrugmap_ray.serve.app import ServeConfig
    from scdrugmap_ray.serve.bench import drive, open_loop, request_bodies
    from scdrugmap_ray.serve.bench import predicted_cells as _predicted_cells

    bodies = request_bodies(app["h5ad"], "pca-sim", 200, 200)
    # what the CLI's server below holds without refusing (one running, one in line)
    holds = ServeConfig(registry=str(app["registry"]), ingress_replicas=1, replica_cpus=1).ingress_holds
    with _cli_server(app, "--ingress-replicas", "1", "--replica-cpus", "1") as (_, url, _):
        drive(url, "/v1/predict", bodies[:10], _predicted_cells, clients=1, timeout_s=60, headers=H)
        # 200 requests: a p99 needs more than a hundred samples to be more than the slowest one
        unloaded = drive(url, "/v1/predict", bodies, _predicted_cells, clients=1, timeout_s=60, headers=H)
        cap = drive(url, "/v1/predict", bodies[:60], _predicted_cells, clients=holds, timeout_s=60, headers=H)
        res = open_loop(url, "/v1/predict", bodies, _predicted_cells, rate=4 * cap.ok / cap.seconds,
                        duration_s=30, timeout_s=30, headers=H, label="4x")
    info = f"unloaded {unloaded.line()} | capacity {cap.line()} | {res.line()} {res.statuses}"
    ratio = res.p(99) / unloaded.p(99)
    print(f"{info}\naccepted p99 at 4x / unloaded p99: {ratio:.2f}")
    assert cap.ok == 60 and cap.errors == 0, info
    assert set(res.statuses) <= {200, 503} and res.errors == 0 and res.missing == 0 and res.shed > 0, info
    # the goal is 2x: measured here 1.45-1.82 (four runs), by benchmarks/loadtest_serve.py with
    # `--replicas 1 --ingress-replicas 1 --replica-cpus 1` 1.18-1.97 (three runs). A timed target belongs to
    # the benchmark (figures vary with what else runs on the machine); this guards, with room for that noise,
    # against a line that queues again (the code before the line pushed out its oldest: 7-11x)
    if res.client_lag_s < 0.5:  # else the generator's own delays are in every latency it measured
        assert ratio < 3.0, info


def test_sigterm_drains_in_flight_requests_then_exits_0(app: dict[str, Any]) -> None:
    """The real CLI in its own local Ray, two ingress replicas: the rate limit holds across them (429 +
    Retry-After), then SIGTERM under load: every accepted request answered (200, 429, or 503 while draining),
    exit status 0."""
    from scdrugmap_ray.serve.bench import request_bodies

    with _cli_server(app, "--replica-cpus", "0.5", "--rate-limit", "5", "--rate-burst", "10",
                     "--drain-grace", "20") as (proc, url, ray_tmp):
        time.sleep(2.5)  # /readyz's own calls were not keyed; start from full buckets anyway
        codes, t_spread = _spread_requests(url, 3.0)
        # one bucket for both ingress replicas: at most burst + rate x elapsed pass (a bucket per replica let
        # through up to twice that); both replicas answered some of them (their access logs)
        ok = sum(c == 200 for c in codes)
        per_replica = _ingress_log_counts(ray_tmp, "GET /v1/models")
        print(f"rate limit 5/s burst 10: {len(codes)} requests on new connections in {t_spread:.2f} s: {ok} x 200, "
              f"{codes.count(429)} x 429; per ingress replica {per_replica}")
        assert set(codes) == {200, 429}, sorted(codes)
        assert ok <= 10 + 5 * t_spread + 1, (ok, t_spread)
        assert len(per_replica) == 2 and min(per_replica) > 0, per_replica
        time.sleep(3.0)  # refill the bucket

        bodies = request_bodies(app["h5ad"], "pca-sim", 400, 300)
        log: list[tuple[str, float]] = []
        stop = threading.Event()

        def client() -> None:
            with httpx.Client(base_url=url, timeout=60) as c:
                for b in bodies:
                    if stop.is_set():
                        return
                    _post(c, b, log)

        threads = [threading.Thread(target=client) for _ in range(6)]
        for t in threads:
            t.start()
        time.sleep(3.0)
        term = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        lines: list[tuple[float, str]] = []
        assert proc.stdout is not None
        for line in proc.stdout:  # timestamped: when did the server report the drain done
            lines.append((time.monotonic(), line))
        proc.wait(timeout=90)
        out = "".join(x for _, x in lines)
        drained = next(t for t, x in lines if "drained; stopping" in x)
        stop.set()
        for t in threads:
            t.join(timeout=90)
    assert proc.returncode == 0, out[-3000:]
    # every request the server took before its drain was done got an answer; after it, the proxy goes away
    # and a request racing that is refused or reset: not accepted
    accepted = [(o, t0) for o, t0 in log if t0 < drained]
    assert not [o for o, _ in accepted if o.startswith("dropped")], (sorted({o for o, _ in log}), out[-2000:])
    assert {o for o, _ in accepted} <= {"200", "429", "503"}, sorted({o for o, _ in log})
    assert sum(o == "200" and t0 < term for o, t0 in log) > 0
    window = sorted(o for o, t0 in log if term < t0 < drained)
    print(f"{drained - term:.2f} s from SIGTERM to drained; requests sent meanwhile: {window}")
    if drained - term > 1.0:  # a drain that took a while met new requests: the door was closed to them
        assert "503" in window, (f"{drained - term:.2f} s from SIGTERM to drained", window)
