"""Load test of the server on 127.0.0.1 at 1x, 2x and 4x its measured capacity: start Ray Serve (its own local
Ray) with a small registry model, measure the unloaded latency (1 client) and the capacity (closed loop,
``--capacity-clients``), then offer open-loop load (requests arrive at a fixed rate, whatever the answers) at
each multiple of that capacity for ``--duration`` seconds. Per phase it prints: offered and answered req/s,
p50/p99 of the accepted requests, the shed fraction (503/429, each with Retry-After) and how fast the shed
answers came, errors (any other outcome: target 0), cells not answered (target 0), the worst /healthz
latency seen by a probe during the phase, the server's RSS before and 5 s after, the CPU cores each kind of
server process used (``server_cores``), and the ratio of the accepted p99 to the unloaded p99. The open-loop
requests send ``Expect: 100-continue`` (``--no-expect-continue``: not), so a shed request's body is not
uploaded. On a machine of few cores, size the server to it (``--replicas 1 --ingress-replicas 1 --replica-cpus
1`` on 2 cores): every predictor replica keeps a core busy under load.

    .venv/bin/python benchmarks/loadtest_serve.py [--cells-per-request 100] [--duration 20] [--multipliers 1,2,4]

Against a server already running elsewhere (closed loop): ``scdrugmap-ray bench serve --url ... --model ...``.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import threading
import time
from pathlib import Path

log = logging.getLogger("loadtest_serve")


class HealthProbe:
    """GET /healthz every 0.2 s in a thread; keeps the worst latency (or a failure) while it runs."""

    def __init__(self, url: str) -> None:
        self.url, self.worst, self.failures = url, 0.0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import httpx

        with httpx.Client(timeout=30) as c:
            while not self._stop.wait(0.2):
                t0 = time.perf_counter()
                try:
                    ok = c.get(self.url + "/healthz").status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.worst = max(self.worst, time.perf_counter() - t0)
                self.failures += not ok

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells-per-request", type=int, default=100)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of open-loop load per multiple")
    ap.add_argument("--multipliers", default="1,2,4")
    ap.add_argument("--capacity-clients", type=int, default=0,
                    help="closed-loop clients measuring the capacity (0: as many as the server holds without "
                         "refusing: more would be shed, and the answered rate would understate the capacity)")
    ap.add_argument("--capacity-requests", type=int, default=80)
    ap.add_argument("--replicas", type=int, default=2, help="predictor replicas")
    ap.add_argument("--ingress-replicas", type=int, default=2)
    ap.add_argument("--replica-cpus", type=float, default=0.5)
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--max-queue-wait", type=float, default=0.5)
    ap.add_argument("--max-ongoing", type=int, default=0, help="requests a predictor replica works on at once "
                    "(0: the server's default, 1 on CPU)")
    ap.add_argument("--no-expect-continue", action="store_true",
                    help="send the open-loop bodies without 'Expect: 100-continue' (a shed request's body is then "
                         "uploaded anyway)")
    ap.add_argument("--model", default="pca-logreg")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--proxy", choices=("haproxy", "default"), default="haproxy",
                    help="HAProxy in front of the ingress replicas (serve/proxy.py), or Ray's Python proxy")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    import ray
    from scdrugmap_ray.engine.runtime import init_ray
    from scdrugmap_ray.serve.app import ServeConfig, run_app
    from scdrugmap_ray.serve.bench import (
        demo_registry,
        drive,
        open_loop,
        predicted_cells,
        request_bodies,
        server_cpu,
        server_rss,
    )

    work = args.workdir or Path(tempfile.mkdtemp(prefix="scdrugmap-loadtest-"))
    _, registry = demo_registry(work, 6000, 1000, args.model)
    # its own local Ray, never a cluster that happens to run on this machine
    if args.proxy == "haproxy":
        from scdrugmap_ray.serve.proxy import use_haproxy

        use_haproxy()  # before Ray starts: its processes read it
    init_ray("local", log_to_driver=False)
    from scdrugmap_ray.serve.proxy import free_port

    port = free_port()
    cfg = ServeConfig(registry=str(registry), min_replicas=args.replicas, max_replicas=args.replicas,
                      ingress_replicas=args.ingress_replicas, max_batch_size=args.max_batch_size,
                      replica_cpus=args.replica_cpus, max_queue_wait_s=args.max_queue_wait,
                      max_ongoing_requests=args.max_ongoing)
    run_app(cfg, host="127.0.0.1", port=port)
    url = f"http://127.0.0.1:{port}"
    bodies = request_bodies(work / "sim.h5ad", "bench", 300, args.cells_per_request)
    drive(url, "/v1/predict", bodies[:8], predicted_cells, clients=2, timeout_s=120)  # warm-up: model load
    time.sleep(3)
    rss0 = server_rss()
    # 200 requests: a p99 needs more than a hundred samples to be more than the slowest one
    unloaded = drive(url, "/v1/predict", bodies[:200], predicted_cells, clients=1, timeout_s=120, label="unloaded")
    log.info("%s", unloaded.line())
    cap = drive(url, "/v1/predict", bodies[:args.capacity_requests], predicted_cells,
                clients=args.capacity_clients or cfg.ingress_holds, timeout_s=300, label="capacity", shed_ok=True)
    capacity = cap.ok / cap.seconds
    log.info("%s -> capacity %.1f req/s", cap.line(), capacity)
    for mult in (float(m) for m in args.multipliers.split(",")):
        before, cpu0 = server_rss(), server_cpu()
        with HealthProbe(url) as probe:
            res = open_loop(url, "/v1/predict", bodies, predicted_cells, rate=mult * capacity,
                            duration_s=args.duration, timeout_s=60, label=f"{mult:g}x",
                            expect_continue=not args.no_expect_continue)
        cpu1 = server_cpu()
        cores = {k: round((v - cpu0.get(k, 0.0)) / res.seconds, 2) for k, v in sorted(cpu1.items())
                 if v - cpu0.get(k, 0.0) > 0.01 * res.seconds}
        time.sleep(5)
        after = server_rss()
        shed_fast = sum(t < 1.0 for t in res.shed_latencies) / max(res.shed, 1)
        log.info("%sx offered_rps=%.1f ok_rps=%.1f p50_ms=%.0f p99_ms=%.0f shed_fraction=%.3f shed_p99_ms=%.0f "
                 "shed_within_1s=%.2f retry_after_missing=%d errors=%d cells_missing=%d statuses=%s "
                 "healthz_worst_ms=%.0f healthz_failures=%d rss_mb_before=%.0f rss_mb_after=%.0f "
                 "client_lag_ms=%.0f server_cores=%s", f"{mult:g}",
                 res.requests / args.duration, res.ok / res.seconds, res.p(50), res.p(99),
                 res.shed / max(res.requests, 1), res.p(99, shed=True), shed_fast, res.retry_after_missing,
                 res.errors, res.missing, dict(sorted(res.statuses.items())), probe.worst * 1000, probe.failures,
                 before / 2**20, after / 2**20, res.client_lag_s * 1000, cores)
        log.info("%sx accepted p99 / unloaded p99: %.2f", f"{mult:g}", res.p(99) / max(unloaded.p(99), 1e-9))
    log.info("server RSS at start %.0f MB, at the end %.0f MB; unloaded p99 %.0f ms", rss0 / 2**20,
             server_rss() / 2**20, unloaded.p(99))
    ray.shutdown()


if __name__ == "__main__":
    main()
