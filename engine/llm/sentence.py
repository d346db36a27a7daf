"""Cell sentences: a cell written as text for a general language model.

Default (``format="ranked"``): the cell's expressed genes, highest value first, the top ``top_k`` of
them, as gene symbols separated by spaces (``"MALAT1 TMSB4X ACTB ..."``). A gene with value 0 never
appears. ``value_format`` optionally writes each gene's value after it (``"MALAT1:12"`` with ``"{:g}"``).
Ties keep the store's gene order (stable sort), so a cell's sentence is a pure function of the cell.

``format="paper"`` is what scDrugMap's LLaMa script wrote, kept only to compare with it: EVERY gene of
the dataset in column order, zeros included, with its value (``"GENE:value"``), cut by the model's
4,096-token limit. Most of such a sentence is zero-count genes, and what survives the cut is decided by
the column order, not by the cell: it is not the default.

Cutting to a token limit always drops the LOWEST-ranked genes (the end of the sentence); callers report
how many genes were dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import UserError

FORMATS = ("ranked", "paper")
DEFAULT_TOP_K = 200


def gene_names(genes: pd.DataFrame) -> list[str]:
    """One printable name per store gene: its symbol, or its Ensembl ID, or ``gene<position>``."""
    sym = genes["symbol"] if "symbol" in genes.columns else pd.Series([None] * len(genes))
    ens = genes["ensembl_id"] if "ensembl_id" in genes.columns else pd.Series([None] * len(genes))
    out = []
    for i, (s, e) in enumerate(zip(sym.tolist(), ens.tolist(), strict=True)):
        name = s if isinstance(s, str) and s else (e if isinstance(e, str) and e else f"gene{i}")
        out.append(name.replace(" ", "_"))
    return out


@dataclass(frozen=True)
class SentenceSpec:
    """How cells become sentences (options of the llama model and of prompting)."""

    top_k: int = DEFAULT_TOP_K
    value_format: str | None = None  # e.g. "{:g}" or "{:.1f}"; None writes symbols only
    format: str = "ranked"

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise UserError(f"cell sentence format {self.format!r} is unknown; formats: {', '.join(FORMATS)}")
        if self.top_k < 1:
            raise UserError(f"cell sentence top_k must be at least 1 (got {self.top_k})")
        if self.value_format is not None:
            try:
                self.value_format.format(1.5)
            except (ValueError, IndexError, KeyError) as err:
                raise UserError(f"value_format {self.value_format!r} is not a Python format string ({err})") from None


class SentenceBuilder:
    """Builds the words of cell sentences for one store's genes table. Picklable, deterministic."""

    def __init__(self, genes: pd.DataFrame, spec: SentenceSpec) -> None:
        self.spec = spec
        self.names = np.asarray(gene_names(genes), dtype=object)

    def _value(self, v: float) -> str:
        if self.spec.value_format is not None:
            return self.spec.value_format.format(float(v))
        return f"{float(v):g}"

    def words(self, gene_index: np.ndarray, values: np.ndarray) -> list[str]:
        """The sentence as a list of words, most important first (cut from the end)."""
        gene_index = np.asarray(gene_index, dtype=np.int64)
        values = np.asarray(values, dtype=np.float64)
        if self.spec.format == "paper":
            dense = np.zeros(len(self.names), dtype=np.float64)
            dense[gene_index] = values
            return [f"{n}:{self._value(v)}" for n, v in zip(self.names, dense, strict=True)]
        keep = values > 0  # zero (or negative) genes never appear
        gi, vals = gene_index[keep], values[keep]
        order = np.argsort(-vals, kind="stable")[: self.spec.top_k]
        if self.spec.value_format is None:
            return [str(self.names[gi[i]]) for i in order]
        return [f"{self.names[gi[i]]}:{self._value(vals[i])}" for i in order]

    def sentence(self, gene_index: np.ndarray, values: np.ndarray) -> str:
        return join(self.words(gene_index, values))


def join(words: Sequence[str]) -> str:
    return " ".join(words)


def fit_words(words: Sequence[str], fits: Callable[[int], bool]) -> int:
    """The most leading words (0..len) for which ``fits(n)`` holds; ``fits`` must be monotone
    (fewer genes never make a text longer). Binary search: log2(n) tokenizations per cut cell."""
    if fits(len(words)):
        return len(words)
    lo, hi = 0, len(words)  # fits(lo) assumed, not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo
