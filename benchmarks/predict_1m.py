"""Atlas-scale predict: simulate N cells, convert, fit a small registry model on 5,000 of them, then
``scdrugmap-ray bench predict`` streams all N through Ray Data and prints cells/s and peak RSS (driver
and the whole process tree: driver + Ray's raylet and workers).

    .venv/bin/python benchmarks/predict_1m.py --cells 1000000 [--genes 1000] [--model pca-logreg] [--workdir DIR]

The predict step runs in its own process (a fresh local Ray), so its figures are its own.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=1_000_000)
    ap.add_argument("--genes", type=int, default=1000)
    ap.add_argument("--model", default="pca-logreg", help="pca-logreg or hvg-mlp")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="scdrugmap-predict-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    from scdrugmap_ray.serve.bench import demo_registry

    store, registry = demo_registry(work, args.cells, args.genes, args.model)
    cli = str(Path(sys.executable).parent / "scdrugmap-ray")
    subprocess.run([cli, "bench", "predict", "--model", "bench", "--data", str(store), "--registry", str(registry),
                    "--out", str(work / "predictions.parquet")], check=True)


if __name__ == "__main__":
    main()
