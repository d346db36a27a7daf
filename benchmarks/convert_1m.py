"""Simulate and convert a large .h5ad; print cells/s and peak RSS of each step.

    .venv/bin/python benchmarks/convert_1m.py --cells 1000000 [--genes 5000] [--workdir DIR]

Each step runs in its own process so its peak RSS (ru_maxrss) is its own. Target: convert under 2 GB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def _step(code: str) -> dict[str, float]:
    wrapped = (
        "import json, resource, time\n"
        "t0 = time.perf_counter()\n"
        f"{code}\n"
        "print(json.dumps({'seconds': time.perf_counter() - t0, "
        "'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))\n"
    )
    out = subprocess.run([sys.executable, "-c", wrapped], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cells", type=int, default=1_000_000)
    ap.add_argument("--genes", type=int, default=5000)
    ap.add_argument("--datasets", type=int, default=8)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="scdrugmap-bench-"))
    h5ad, store = work / "sim.h5ad", work / "store"
    sim = _step(
        "from scdrugmap_ray.engine.data.simulate import simulate_h5ad\n"
        f"simulate_h5ad({str(h5ad)!r}, n_cells={args.cells}, n_datasets={args.datasets}, "
        f"n_genes={args.genes}, progress=False)"
    )
    conv = _step(
        "from scdrugmap_ray.engine.data.convert import ConvertOptions, convert_h5ad\n"
        f"convert_h5ad({str(h5ad)!r}, {str(store)!r}, ConvertOptions(label_key='response', "
        "dataset_key='dataset', sample_key='sample'), progress=False)"
    )
    size_gb = h5ad.stat().st_size / 1e9
    for name, r in (("simulate", sim), ("convert", conv)):
        print(
            f"{name}: cells={args.cells} genes={args.genes} seconds={r['seconds']:.1f} "
            f"cells_per_s={args.cells / r['seconds']:.0f} peak_rss_mb={r['peak_rss_mb']:.0f}"
        )
    print(f"h5ad_size_gb={size_gb:.2f} workdir={work}")



if __name__ == "__main__":
    main()
