"""`sdr.tl.embed` in memory vs the CLI's `embed` on the same real cells (the first 300 GSE149383 PC9 cells,
raw Drop-seq counts), with a tiny RANDOM-WEIGHT Geneformer. Prints the wall time of each path (N runs:
median, min-max, every run), the largest difference between their embeddings, and asserts that the
in-memory path did not start Ray.

    .venv/bin/python benchmarks/api_embed.py [--cells 300] [--runs 3] [--workdir DIR]

* API: ``sdr.tl.embed(adata, "geneformer", checkpoint=...)`` called in this (warm) Python process, as in a
  notebook: tokenize + load the checkpoint + embed, no Ray. ``ray.init`` is replaced by a function that
  fails, and ``ray.is_initialized()`` is checked after every call.
* CLI: ``scdrugmap-ray embed cells.h5ad --model geneformer --checkpoint ... --out DIR --quiet`` as a new
  process each run (Python start, embedded Ray start, the store conversion cached after the first run,
  Ray Data actors, Parquet parts), as a shell user runs it.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

CLI = str(Path(sys.executable).parent / "scdrugmap-ray")
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gse149383_PC9_erlotinib_day11_rawcounts.h5ad"
log = logging.getLogger("api_embed")


def figures(times: list[float]) -> str:
    return (f"median {statistics.median(times):.2f} s (min {min(times):.2f}, max {max(times):.2f}; runs: "
            + ", ".join(f"{t:.2f}" for t in times) + ")")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=300)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    for name in ("scdrugmap_ray", "scdrugmap_ray.tl"):
        logging.getLogger(name).setLevel(logging.ERROR)

    import anndata as ad
    import pyarrow.parquet as pq
    import ray
    import scdrugmap_ray as sdr

    work = args.workdir or Path(tempfile.mkdtemp(prefix="api-embed-"))
    work.mkdir(parents=True, exist_ok=True)
    adata = ad.read_h5ad(DATA)[: args.cells].copy()
    path = work / f"pc9_{args.cells}.h5ad"
    adata.write_h5ad(path)
    ckpt = work / "geneformer-tiny"
    if not ckpt.exists():
        sdr.models.init_random("geneformer", ckpt, preset="tiny")
    log.info("%d real cells (%s), tiny RANDOM-WEIGHT Geneformer, %d runs each, %d CPUs", adata.n_obs, DATA.name,
             args.runs, os.cpu_count() or 0)

    def no_ray(*a: Any, **k: Any) -> None:
        raise AssertionError("sdr.tl.embed in memory started Ray")

    ray.init = no_ray  # the in-memory path must never call it
    api_times: list[float] = []
    api_emb = np.empty(0)
    for _ in range(args.runs):
        cells = adata.copy()
        t0 = time.perf_counter()
        sdr.tl.embed(cells, "geneformer", checkpoint=ckpt)
        api_times.append(time.perf_counter() - t0)
        assert not ray.is_initialized(), "sdr.tl.embed in memory started Ray"
        assert cells.uns["X_geneformer"]["backend"] == "local"
        api_emb = cells.obsm["X_geneformer"]
    log.info("sdr.tl.embed (in memory, no Ray): %s", figures(api_times))

    env = {**os.environ, "SCDRUGMAP_RAY_CACHE": str(work / "cache")}
    cli_times: list[float] = []
    out = work / "cli"
    for i in range(args.runs):
        out = work / f"cli-{i}"
        cmd = [CLI, "embed", str(path), "--model", "geneformer", "--checkpoint", str(ckpt), "--out", str(out),
               "--quiet"]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        cli_times.append(time.perf_counter() - t0)
        if res.returncode != 0:
            raise SystemExit(f"CLI failed: {res.stderr.strip().splitlines()[-1:]}")
    log.info("scdrugmap-ray embed (new process, Ray Data): %s", figures(cli_times))

    table = pq.read_table(sorted(out.glob("part-*.parquet")))
    ids = table.column("cell_id").to_pylist()
    cli_emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    rows = adata.obs_names.get_indexer(ids)
    diff = float(np.abs(api_emb[rows] - cli_emb).max())
    log.info("same cells: %d embedded by both (of %d; cells without counts are NaN); max |API - CLI| = %.2e",
             len(ids), adata.n_obs, diff)
    log.info("ratio of medians (CLI / API): %.1fx; Ray started by the in-memory path: no (asserted)",
             statistics.median(cli_times) / statistics.median(api_times))


if __name__ == "__main__":
    main()
