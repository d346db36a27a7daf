"""Human gene identifiers: symbols <-> Ensembl IDs, from a vendored org.Hs.eg.db 3.16 table."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from importlib.resources import files

import numpy as np
import pandas as pd


@cache
def gene_table() -> pd.DataFrame:
    """entrez, symbol, ensembl_id (one row per Entrez-Ensembl pair; ensembl_id may be missing)."""
    with files(__package__).joinpath("resources/human_genes.tsv.gz").open("rb") as fh:
        return pd.read_csv(fh, sep="\t", dtype=str, compression="gzip")


@cache
def _symbol_to_ensembl() -> dict[str, str]:
    t = gene_table().dropna(subset=["ensembl_id"]).drop_duplicates("symbol")
    return dict(zip(t["symbol"], t["ensembl_id"], strict=True))


@cache
def _ensembl_to_symbol() -> dict[str, str]:
    t = gene_table().dropna(subset=["ensembl_id"]).drop_duplicates("ensembl_id")
    return dict(zip(t["ensembl_id"], t["symbol"], strict=True))


def symbols_to_ensembl(symbols: Sequence[str]) -> list[str | None]:
    table = _symbol_to_ensembl()
    return [table.get(str(s)) for s in symbols]


def ensembl_to_symbols(ids: Sequence[str]) -> list[str | None]:
    table = _ensembl_to_symbol()
    return [table.get(str(i).split(".")[0]) for i in ids]


def looks_like_ensembl(ids: Sequence[str]) -> bool:
    """True when most names are Ensembl gene IDs (ENSG..., or another species' ENS*G...)."""
    arr = np.asarray([str(i) for i in ids[:2000]])
    if len(arr) == 0:
        return False
    return float(np.mean(np.char.startswith(arr, "ENS") & (np.char.find(arr, "G0") > 0))) > 0.5
