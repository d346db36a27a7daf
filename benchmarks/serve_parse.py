"""CPU time of parsing one /v1/predict JSON body in a predictor replica: the fast path (pydantic parses and
validates in Rust, numpy builds the matrix) against the checked path (Python's json with a hook per object,
which every doubtful body takes to have its problem named). Bodies are cells of a simulated .h5ad, as the
load tests send them.

    .venv/bin/python benchmarks/serve_parse.py [--cells-per-request 200] [--genes 1000] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

log = logging.getLogger("serve_parse")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells-per-request", type=int, default=200)
    ap.add_argument("--genes", type=int, default=1000)
    ap.add_argument("--bodies", type=int, default=20)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from scdrugmap_ray.engine.data.simulate import simulate_h5ad
    from scdrugmap_ray.serve.app import _parse_checked, _parse_fast
    from scdrugmap_ray.serve.bench import request_bodies

    work = Path(tempfile.mkdtemp(prefix="scdrugmap-parse-"))
    simulate_h5ad(work / "cells.h5ad", n_cells=max(1000, args.cells_per_request * args.bodies), n_datasets=2,
                  n_genes=args.genes, seed=0, progress=False)
    raws = [json.dumps(b).encode() for b in request_bodies(work / "cells.h5ad", "m", args.bodies,
                                                           args.cells_per_request)]
    values = sum(sum(len(c["expression"]) for c in json.loads(r)["cells"]) for r in raws) / len(raws)
    log.info("%d bodies of %d cells: %.0f KB and %.0f gene values each (mean)", len(raws), args.cells_per_request,
             sum(map(len, raws)) / len(raws) / 1024, values)
    for name, parse in (("fast", lambda r: _parse_fast(r, 10**6)), ("checked", lambda r: _parse_checked(r, 10**6,
                                                                                                      (), None))):
        per_body = []
        for _ in range(args.runs):
            t0 = time.process_time()
            for raw in raws:
                assert parse(raw) is not None
            per_body.append((time.process_time() - t0) / len(raws) * 1000)
        log.info("%-7s CPU ms per body: median %.1f (runs %s)", name, statistics.median(per_body),
                 ", ".join(f"{x:.1f}" for x in per_body))


if __name__ == "__main__":
    main()
