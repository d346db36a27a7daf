"""The CPU cost of the embedding token budget (``--batch-tokens``): the same cells embedded in this process
with each budget, in turns (budget A, B, C, ..., then again), timing the CPU seconds of the process. CPU
seconds with a fixed thread count change much less with the machine's load than wall time does; ``--threads
1`` (the default) keeps OpenMP's spin-waits out of the figure.

    .venv/bin/python benchmarks/batch_tokens_cpu.py [--model geneformer] [--preset v1-10m] [--cells 300]
        [--budgets 1024,2048,4096,8192,16384] [--runs 3] [--threads 1]

Cells: ``--cells`` spread evenly over the 8,594 GSE149383 PC9 cells (raw Drop-seq counts in
``../shared/data/``), as ``scdrugmap-ray bench embed`` picks them; the model has RANDOM weights (``--preset``),
which does not change the cost. Prints per budget: batches, padded tokens, attention cells (sum of n x L^2),
CPU seconds per run and their median. What it showed is why ``engine/defaults.py`` gives CPU a budget of
2,048 tokens and GPUs 16,384.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gse149383_PC9_erlotinib_day11_rawcounts.h5ad"
log = logging.getLogger("batch_tokens_cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="geneformer")
    ap.add_argument("--preset", default="v1-10m")
    ap.add_argument("--cells", type=int, default=300)
    ap.add_argument("--budgets", default="1024,2048,4096,8192,16384")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch
    from scdrugmap_ray.engine.data.convert import ConvertOptions, convert_h5ad
    from scdrugmap_ray.engine.data.store import CellStore
    from scdrugmap_ray.engine.models.base import get_model
    from scdrugmap_ray.engine.pipeline.bench import read_cells, spread_rows
    from scdrugmap_ray.engine.pipeline.embed import embed_in_process, token_budget_batches

    torch.set_num_threads(args.threads)
    budgets = [int(b) for b in args.budgets.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        convert_h5ad(DATA, Path(tmp) / "store", ConvertOptions(), progress=False)
        store = CellStore.open(Path(tmp) / "store")
        model = get_model(args.model, {"preset": args.preset})
        rows = spread_rows(store, args.cells)
        csr = store.read_csr(rows)
        ids = np.asarray(store.obs(["cell_id"])["cell_id"].to_numpy()[rows], dtype=object)
        module = model.load(device="cpu", dtype=None)  # type: ignore[attr-defined]
        cells = read_cells(store, rows)
        tokens = model.make_tokenizer(store.genes)(cells["cell_id"], cells["gene_index"], cells["value"])
        lengths = np.array([len(t) for t in tokens["input_ids"]])
        embed_in_process(model, ids[:16], csr[:16], store.genes, batch_tokens=budgets[0], module=module)  # warm-up
        cpu: dict[int, list[float]] = {b: [] for b in budgets}
        for _ in range(args.runs):
            for budget in budgets:
                t0 = time.process_time()
                embed_in_process(model, ids, csr, store.genes, batch_tokens=budget, module=module)
                cpu[budget].append(time.process_time() - t0)
    print(f"model={args.model} preset={args.preset} cells={len(rows)} tokens={int(lengths.sum())} "
          f"threads={args.threads} runs={args.runs} (RANDOM weights)")
    for budget in budgets:
        batches = list(token_budget_batches(lengths, budget))
        padded = sum(int(lengths[i].max()) * len(i) for i in batches)
        attention = sum(int(lengths[i].max()) ** 2 * len(i) for i in batches)
        runs = ", ".join(f"{t:.1f}" for t in cpu[budget])
        print(f"batch_tokens={budget} batches={len(batches)} padded_tokens={padded} attention_cells={attention:.3g} "
              f"cpu_s median {statistics.median(cpu[budget]):.1f} (runs: {runs})")


if __name__ == "__main__":
    main()
