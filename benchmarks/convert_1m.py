"""Simulate and convert a large .h5ad; print cells/s and peak RSS of each step.

    .venv/bin/python benchmarks/convert_1m.py --cells 1000000 [--genes 5000] [--workdir DIR]

Each step runs in its own process so its peak RSS (ru_maxrss) is its own. Target: convert under 2 GB.
CPU seconds are printed beside wall seconds: on a shared machine they are the steadier figure.
``--h5ad FILE`` converts an existing file instead of simulating one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def _step(imports: str, code: str) -> dict[str, float]:
    """Run ``code`` in a fresh interpreter (after ``imports``, not timed); it must set ``n_cells``."""
    wrapped = (
        f"import json, resource, time\n{imports}\n"
        "t0 = time.perf_counter()\n"
        f"{code}\n"
        "u = resource.getrusage(resource.RUSAGE_SELF)\n"
        "print(json.dumps({'seconds': time.perf_counter() - t0, 'cpu_seconds': u.ru_utime + u.ru_stime, "
        "'n_cells': n_cells, "
        "'peak_rss_mb': u.ru_maxrss / 1024}))\n"
    )
    out = subprocess.run([sys.executable, "-c", wrapped], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=1_000_000)
    ap.add_argument("--genes", type=int, default=5000)
    ap.add_argument("--datasets", type=int, default=8)
    ap.add_argument("--h5ad", type=Path, default=None, help="convert this file instead of a simulated one")
    ap.add_argument("--label-key", default="response")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="scdrugmap-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    h5ad, store = args.h5ad or work / "sim.h5ad", work / "store"
    shutil.rmtree(store, ignore_errors=True)
    steps = []
    if args.h5ad is None:
        sim = _step(
            "from scdrugmap_ray.engine.data.simulate import simulate_h5ad",
            f"n_cells = simulate_h5ad({str(h5ad)!r}, n_cells={args.cells}, n_datasets={args.datasets}, "
            f"n_genes={args.genes}, progress=False).n_cells",
        )
        steps.append(("simulate", sim))
        keys = "dataset_key='dataset', sample_key='sample'"
    else:
        keys = ""
    conv = _step(
        "from scdrugmap_ray.engine.data.convert import ConvertOptions, convert_h5ad",
        f"r = convert_h5ad({str(h5ad)!r}, {str(store)!r}, ConvertOptions(label_key={args.label_key!r}, {keys}), "
        "progress=False)\n"
        "n_cells = r.n_cells_in"
    )
    steps.append(("convert", conv))
    for name, r in steps:
        print(
            f"{name}: cells={r['n_cells']} seconds={r['seconds']:.1f} cpu_seconds={r['cpu_seconds']:.1f} "
            f"cells_per_s={r['n_cells'] / r['seconds']:.0f} peak_rss_mb={r['peak_rss_mb']:.0f}"
        )
    print(f"h5ad_size_gb={h5ad.stat().st_size / 1e9:.2f} store={store}")


if __name__ == "__main__":
    main()
