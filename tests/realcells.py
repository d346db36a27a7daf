"""Real GSE149383 cells (raw Drop-seq counts) for tokenizer tests, with a genes table built the way a
cell store's is (position, symbol, Ensembl ID from org.Hs.eg.db, first row of each symbol)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

DATA = "data/gse149383_PC9_erlotinib_day11_rawcounts.h5ad"
ID_MAP = "assets/gene_id_maps/entrez_symbol_ensembl_orgHsegdb3.16.tsv"


def load_pc9(shared_dir: Path) -> dict[str, Any]:
    import anndata as ad

    adata = ad.read_h5ad(shared_dir / DATA)
    ens: dict[str, str] = {}
    with open(shared_dir / ID_MAP) as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            if row["ensembl_id"] and row["symbol"] not in ens:
                ens[row["symbol"]] = row["ensembl_id"]
    symbols = [str(s) for s in adata.var_names]
    genes = pd.DataFrame(
        {
            "position": np.arange(len(symbols), dtype=np.int32),
            "symbol": symbols,
            "ensembl_id": [ens.get(s) for s in symbols],
        }
    )
    return {"adata": adata, "genes": genes, "X": adata.X.tocsr(), "symbols": symbols}


def cells(real: dict[str, Any], rows: list[int]) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """(cell ids, non-zero gene positions, values) of the given rows: what a tokenizer is called with."""
    x = real["X"]
    ids = np.asarray(real["adata"].obs_names[rows])
    gi = [x.indices[x.indptr[r] : x.indptr[r + 1]].astype(np.int32) for r in rows]
    vals = [x.data[x.indptr[r] : x.indptr[r + 1]].astype(np.float32) for r in rows]
    return ids, gi, vals
