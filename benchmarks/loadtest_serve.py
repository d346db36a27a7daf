"""Load test of the server on 127.0.0.1: start Ray Serve with a small registry model, then N concurrent
clients send a fixed number of POST /v1/predict requests (JSON cells); print requests/s, p50/p99 latency,
errors, and cells not answered (target: 0 and 0). Bounded in count (--requests) and time (--timeout).

    .venv/bin/python benchmarks/loadtest_serve.py [--clients 16] [--requests 400] [--cells-per-request 16]

Against a server already running elsewhere: ``scdrugmap-ray bench serve --url ... --model ... --data ...``.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--cells-per-request", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--model", default="pca-logreg")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()

    import ray
    from scdrugmap_ray.serve.app import ServeConfig, run_app
    from scdrugmap_ray.serve.bench import demo_registry, load_test

    work = args.workdir or Path(tempfile.mkdtemp(prefix="scdrugmap-loadtest-"))
    _, registry = demo_registry(work, 6000, 1000, args.model)
    ray.init(include_dashboard=False, configure_logging=False, logging_level=logging.WARNING, log_to_driver=False)
    port = 8765
    cfg = ServeConfig(registry=str(registry), min_replicas=args.replicas, max_replicas=args.replicas,
                      max_batch_size=args.max_batch_size, replica_cpus=0.5)
    run_app(cfg, host="127.0.0.1", port=port)
    url = f"http://127.0.0.1:{port}"
    load_test(url, "bench", work / "sim.h5ad", clients=2, n_requests=4, cells_per_request=2)  # warm-up: model load
    res = load_test(url, "bench", work / "sim.h5ad", clients=args.clients, n_requests=args.requests,
                    cells_per_request=args.cells_per_request, timeout_s=args.timeout)
    print(res.line(), flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
