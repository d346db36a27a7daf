"""Atlas scale, stage by stage: simulate -> convert -> embed (tiny random Geneformer) -> predict (the same
Geneformer with a classifier head, from a registry), each stage as its own `scdrugmap-ray` process on an
embedded local Ray. Prints, per stage: cells, seconds, cells/s, the DRIVER's peak RSS (the CLI process
alone) and the largest single Ray worker's peak RSS (sampled every 0.2 s).

    .venv/bin/python benchmarks/atlas_scale.py --cells 100000 [--genes 1000] [--workdir DIR]

Goal (issue 14): driver RSS flat in the number of cells (2M within 1.3x of 100k), no worker above 4 GB.
The head's weights are random: the figures measure the engine, not the biology.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

CLI = str(Path(sys.executable).parent / "scdrugmap-ray")
log = logging.getLogger("atlas_scale")


def run_stage(name: str, cells: int, args: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run one CLI command; sample the driver's RSS and each descendant's RSS until it exits."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([CLI, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"driver": 0, "worker": 0}
    stop = threading.Event()

    def sample() -> None:
        me = psutil.Process(proc.pid)
        while not stop.is_set():
            with contextlib.suppress(psutil.Error):
                peak["driver"] = max(peak["driver"], me.memory_info().rss)
                for child in me.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        if "ray::" in " ".join(child.cmdline()[:1]) or "default_worker" in " ".join(child.cmdline()):
                            peak["worker"] = max(peak["worker"], child.memory_info().rss)
            stop.wait(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, err = proc.communicate()
    stop.set()
    thread.join()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{err[-3000:]}")
    row = {"cells": cells, "seconds": seconds, "cells_per_s": cells / seconds,
           "driver_peak_mb": peak["driver"] / 2**20, "worker_peak_mb": peak["worker"] / 2**20}
    print(f"{name:9s} cells={cells:>9,d} seconds={seconds:8.1f} cells_per_s={row['cells_per_s']:9.1f} "
          f"driver_peak_mb={row['driver_peak_mb']:7.0f} worker_peak_mb={row['worker_peak_mb']:7.0f}", flush=True)
    log.debug("%s output: %s", name, out[-500:])
    return row


def register_model(work: Path, store: Path, cache: Path) -> Path:
    """A registry model: tiny random Geneformer + a logistic-regression head fitted on random features."""
    os.environ["SCDRUGMAP_RAY_CACHE"] = str(cache)
    from scdrugmap_ray.engine.data.store import CellStore
    from scdrugmap_ray.engine.models.base import get_model
    from scdrugmap_ray.engine.registry import Registry
    from scdrugmap_ray.engine.train.frozen import save_fold_model
    from scdrugmap_ray.engine.train.heads import make_head

    fm = get_model("geneformer", {"preset": "tiny"})
    dim = int(fm.embed(fm.load(), fm.collate({"input_ids": [np.array([5, 6, 7], dtype=np.int32)]})).shape[1])
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, dim)).astype(np.float32), np.tile([0, 1], 100)
    head = make_head("logreg")
    head.fit(x[:150], y[:150], x[150:], y[150:], 0)
    fold = save_fold_model(work / "fold.model", fm, head, CellStore.open(store).genes, {})
    registry = work / "registry"
    if not (registry / "gf").exists():
        Registry(registry).add("gf", fold, "frozen", {"model": "geneformer", "model_options": fm.options})
    return registry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=100_000)
    ap.add_argument("--genes", type=int, default=1000)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="scdrugmap-atlas-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache"
    env = {**os.environ, "SCDRUGMAP_RAY_CACHE": str(cache)}
    n = args.cells
    print(f"atlas_scale: {n:,} cells x {args.genes:,} genes in {work}; {os.cpu_count()} CPUs", flush=True)
    h5ad, store = work / "sim.h5ad", work / "store"
    if not h5ad.exists():
        run_stage("simulate", n, ["simulate", str(h5ad), "--cells", str(n), "--genes", str(args.genes)], env)
    if not store.exists():
        run_stage("convert", n, ["convert", str(h5ad), str(store), "--label-key", "response", "--dataset-key",
                                 "dataset", "--sample-key", "sample"], env)
    run_stage("embed", n, ["embed", str(store), "--model", "geneformer", "--preset", "tiny", "--quiet",
                           "--out", str(work / f"emb-{time.time_ns()}")], env)
    registry = register_model(work, store, cache)
    run_stage("predict", n, ["predict", str(store), "--model", "gf", "--registry", str(registry), "--out",
                             str(work / f"pred-{time.time_ns()}.parquet")], env)


if __name__ == "__main__":
    main()
