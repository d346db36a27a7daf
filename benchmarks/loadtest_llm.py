"""Load test of the LLM deployment: start the real `scdrugmap-ray serve --llm` on 127.0.0.1 (a tiny random
Llama written by ``init_random``, or ``--llm DIR``), then drive its OpenAI-compatible routes with concurrent
clients and print, per workload: requests/s, items/s (sentences, cells or generated tokens), p50/p99
latency and errors. Bounded in count (fixed requests per workload) and time (--timeout per workload).

    .venv/bin/python benchmarks/loadtest_llm.py [--llm DIR] [--llm-cpus 0.5] [--timeout 300]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

KEY_ENV = "SCDRUGMAP_LOADTEST_KEY"
GENES = ["EGFR", "KRT18", "ACTB", "MALAT1", "VIM", "CD44", "TP53", "MYC", "GAPDH", "FN1", "KRAS", "ALDH1A1"]


def drive(name: str, send: Callable[[Any], tuple[int, int]], bodies: list[Any], clients: int, timeout_s: float) -> None:
    """Send every body once from ``clients`` threads; ``send`` returns (HTTP status, items answered)."""
    lat: list[float] = []
    errors, items = 0, 0
    deadline = time.monotonic() + timeout_s

    def one(body: Any) -> tuple[float, int, int]:
        if time.monotonic() > deadline:
            return 0.0, 0, -1
        t0 = time.perf_counter()
        status, n = send(body)
        return time.perf_counter() - t0, status, n

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        for dt, status, n in pool.map(one, bodies):
            if status != 200:
                errors += 1
            else:
                lat.append(dt)
                items += n
    wall = time.perf_counter() - t0
    p50, p99 = (np.percentile(lat, [50, 99]) * 1000) if lat else (float("nan"), float("nan"))
    print(f"{name}: {len(bodies)} requests, {clients} clients: {len(lat) / wall:.1f} req/s, {items / wall:,.0f} "
          f"items/s, p50 {p50:.0f} ms, p99 {p99:.0f} ms, errors {errors}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llm", type=Path, default=None, help="HF causal LM dir (default: a tiny random Llama)")
    ap.add_argument("--llm-cpus", type=float, default=0.5)
    ap.add_argument("--port", type=int, default=8931)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per workload")
    args = ap.parse_args()

    import httpx
    from scdrugmap_ray.engine.models.llama import Llama
    from scdrugmap_ray.serve.bench import demo_registry

    work = Path(tempfile.mkdtemp(prefix="scdrugmap-llm-loadtest-"))
    llm = args.llm or Llama.init_random(work / "llama-tiny", "tiny")
    _, registry = demo_registry(work, 6000, 1000, "pca-logreg")
    env = {**os.environ, KEY_ENV: "loadtest", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    cli = Path(sys.executable).parent / "scdrugmap-ray"
    t_start = time.monotonic()
    server = subprocess.Popen(
        [str(cli), "serve", "--registry", str(registry), "--port", str(args.port), "--api-key-env", KEY_ENV,
         "--llm", str(llm), "--llm-name", "llm", "--llm-cpus", str(args.llm_cpus), "--replica-cpus", "0.25"],
        stdout=(work / "serve.log").open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    headers = {"Authorization": "Bearer loadtest"}
    url = f"http://127.0.0.1:{args.port}"
    rng = np.random.default_rng(0)

    def sentence() -> str:
        return " ".join(rng.choice(GENES, 50))

    try:
        with httpx.Client(base_url=url, headers=headers, timeout=args.timeout) as client:
            while True:
                try:
                    r = client.get("/v1/models")
                    if r.status_code == 200 and len(r.json().get("data", [])) == 2:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None or time.monotonic() - t_start > 600:
                    sys.exit(f"the server did not come up; see {work / 'serve.log'}")
                time.sleep(1)
            print(f"server ready after {time.monotonic() - t_start:.0f} s", flush=True)
            client.post("/v1/embeddings", json={"model": "llm", "input": [sentence()]})  # warm-up

            def embeddings(texts: list[str]) -> tuple[int, int]:
                r = client.post("/v1/embeddings", json={"model": "llm", "input": texts})
                return r.status_code, len(r.json()["data"]) if r.status_code == 200 else 0

            for batch, clients, n in ((1, 8, 64), (16, 4, 16), (64, 2, 8)):
                drive(f"/v1/embeddings x{batch} sentences", embeddings,
                      [[sentence() for _ in range(batch)] for _ in range(n)], clients, args.timeout)

            def chat(seed: int) -> tuple[int, int]:
                r = client.post("/v1/chat/completions", json={
                    "model": "llm", "messages": [{"role": "user", "content": sentence()}], "max_tokens": 32,
                    "temperature": 0.8, "seed": seed})
                return r.status_code, r.json()["usage"]["completion_tokens"] if r.status_code == 200 else 0

            drive("/v1/chat/completions (items = generated tokens)", chat, list(range(16)), 4, args.timeout)

            symbols = ["EGFR", "KRT18", "ACTB", "VIM", "CD44", "MYC", "GAPDH", "FN1"]

            def cells(i: int) -> tuple[int, int]:
                body = {"cells": [{"cell_id": f"c{i}_{j}", "expression": dict(zip(
                    symbols, rng.integers(1, 20, len(symbols)).tolist(), strict=True))} for j in range(16)]}
                r = client.post("/v1/llm/embed-cells", json=body)
                return r.status_code, len(r.json()["cells"]) if r.status_code == 200 else 0

            drive("/v1/llm/embed-cells x16 cells", cells, list(range(16)), 4, args.timeout)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
