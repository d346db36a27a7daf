"""Load test of the LLM deployment: start the real `scdrugmap-ray serve --llm` on 127.0.0.1 (a tiny random
Llama written by ``init_random``, or ``--llm DIR``), then drive its OpenAI-compatible routes with concurrent
clients (serve.bench.drive, as the /v1/predict load test) and print, per workload: requests/s, items/s
(sentences, generated tokens or cells), p50/p99 latency, errors and items missing from answers. Bounded in
count (fixed requests per workload) and time (--timeout per workload).

    .venv/bin/python benchmarks/loadtest_llm.py [--llm DIR] [--llm-cpus 0.5] [--timeout 300]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

KEY_ENV = "SCDRUGMAP_LOADTEST_KEY"
GENES = ["EGFR", "KRT18", "ACTB", "MALAT1", "VIM", "CD44", "TP53", "MYC", "GAPDH", "FN1", "KRAS", "ALDH1A1"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llm", type=Path, default=None, help="HF causal LM dir (default: a tiny random Llama)")
    ap.add_argument("--llm-cpus", type=float, default=0.5)
    ap.add_argument("--port", type=int, default=8931)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per workload")
    args = ap.parse_args()

    import httpx
    from scdrugmap_ray.engine.models.llama import Llama
    from scdrugmap_ray.serve.bench import demo_registry, drive

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

        def run(label: str, path: str, bodies: list[dict[str, Any]], answered: Any, clients: int, unit: str) -> None:
            res = drive(url, path, bodies, answered, clients=clients, timeout_s=args.timeout, headers=headers,
                        label=label, unit=unit)
            print(res.line(), flush=True)

        def embedded(body: dict[str, Any], response: Any) -> tuple[int, int]:
            return len(response["data"]), len(body["input"]) - len(response["data"])

        for batch, clients, n in ((1, 8, 64), (16, 4, 16), (64, 2, 8)):
            run(f"embeddings_x{batch}", "/v1/embeddings",
                [{"model": "llm", "input": [sentence() for _ in range(batch)]} for _ in range(n)],
                embedded, clients, "sentences")

        def generated(body: dict[str, Any], response: Any) -> tuple[int, int]:
            return response["usage"]["completion_tokens"], 0

        run("chat", "/v1/chat/completions",
            [{"model": "llm", "messages": [{"role": "user", "content": sentence()}], "max_tokens": 32,
              "temperature": 0.8, "seed": i} for i in range(16)], generated, 4, "tokens")

        symbols = ["EGFR", "KRT18", "ACTB", "VIM", "CD44", "MYC", "GAPDH", "FN1"]

        def cells_embedded(body: dict[str, Any], response: Any) -> tuple[int, int]:
            got = {c["cell_id"] for c in response["cells"]}
            missing = sum(1 for c in body["cells"] if c["cell_id"] not in got)
            return len(body["cells"]) - missing, missing

        run("embed_cells_x16", "/v1/llm/embed-cells",
            [{"cells": [{"cell_id": f"c{i}_{j}", "expression": dict(zip(
                symbols, rng.integers(1, 20, len(symbols)).tolist(), strict=True))} for j in range(16)]}
             for i in range(16)], cells_embedded, 4, "cells")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
