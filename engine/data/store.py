"""The cell store: Parquet shards of cells (CSR, row-wise), genes.parquet and meta.json.

Global row order is the shards in name order, then rows within each shard. Everything reads columns
it needs only: metadata without expression, expression without metadata.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from ..errors import UserError
from .schema import METADATA_COLUMNS, SCHEMA_VERSION

OBS_COLUMNS = ("cell_id", "label", "n_counts", "n_genes", *METADATA_COLUMNS)


class CellStore:
    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        self.meta = meta

    @classmethod
    def open(cls, path: str | Path) -> CellStore:
        path = Path(path)
        meta_file = path / "meta.json"
        if not meta_file.is_file():
            raise UserError(
                f"{path} is not a cell store (no meta.json); make one with `scdrugmap-ray convert FILE.h5ad {path}`"
            )
        meta = json.loads(meta_file.read_text())
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise UserError(
                f"{path}: cell store schema version {meta.get('schema_version')} is not {SCHEMA_VERSION}; "
                "convert the source .h5ad again"
            )
        return cls(path, meta)

    # ------------------------------------------------------------------------------------ properties

    @property
    def n_cells(self) -> int:
        return int(self.meta["n_cells"])

    @property
    def n_genes(self) -> int:
        return int(self.meta["n_genes"])

    @property
    def is_counts(self) -> bool:
        return self.meta.get("value_type") == "counts"

    @property
    def content_hash(self) -> str:
        return str(self.meta["content_hash"])

    @property
    def obsm_keys(self) -> list[str]:
        return list(self.meta.get("obsm_keys", []))

    @cached_property
    def shard_paths(self) -> list[Path]:
        return sorted(self.path.glob("part-*.parquet"))

    @cached_property
    def genes(self) -> pd.DataFrame:
        return pd.read_parquet(self.path / "genes.parquet")

    @cached_property
    def shard_offsets(self) -> np.ndarray:
        """int64 [n_shards + 1]: the first global row of each shard (from the Parquet footers), then n_cells."""
        sizes = [pq.ParquetFile(p).metadata.num_rows for p in self.shard_paths]
        return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def shards_of(self, rows: np.ndarray | None) -> list[int]:
        """Indices of the shards holding any of ``rows`` (sorted int64; None: every shard)."""
        return [s for s, n in enumerate(self.cells_per_shard(rows)) if n]

    def cells_per_shard(self, rows: np.ndarray | None) -> np.ndarray:
        """int64 [n_shards]: how many of ``rows`` (None: all cells) each shard holds."""
        offsets = self.shard_offsets
        if rows is None:
            return np.diff(offsets)
        shard = np.searchsorted(offsets, np.asarray(rows, dtype=np.int64), side="right") - 1
        return np.bincount(shard, minlength=len(offsets) - 1).astype(np.int64)

    def rows_of(self, cell_ids: Sequence[str]) -> np.ndarray:
        """int64 store rows of the given cell ids, in that order (reads the cell_id column once). For
        callers that name cells; the engine itself passes rows."""
        ids = pd.Index(self.obs(["cell_id"])["cell_id"].astype(str))
        rows = ids.get_indexer(pd.Index([str(c) for c in cell_ids]))
        if (rows < 0).any():
            missing = [str(c) for c, r in zip(cell_ids, rows, strict=True) if r < 0][:3]
            raise UserError(f"{self.path}: cell(s) {', '.join(map(repr, missing))} not in the store")
        return rows.astype(np.int64)

    # ---------------------------------------------------------------------------------------- reads

    def _read(self, columns: Sequence[str]) -> pa.Table:
        return pq.read_table([str(p) for p in self.shard_paths], columns=list(columns)) if self.shard_paths else (
            pa.table({c: [] for c in columns})
        )

    def obs(self, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """Cell metadata in store order (label as float: 1.0, 0.0 or NaN); no expression is read."""
        cols = list(columns) if columns is not None else list(OBS_COLUMNS)
        frames = [pq.read_table(p, columns=cols).to_pandas() for p in self.shard_paths]
        df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cols)
        if "label" in df:
            df["label"] = df["label"].astype("float64")
        return df

    def iter_batches(self, batch_size: int = 8192, columns: Sequence[str] | None = None) -> Iterator[pa.RecordBatch]:
        for p in self.shard_paths:
            yield from pq.ParquetFile(p).iter_batches(batch_size=batch_size, columns=list(columns) if columns else None)

    def read_csr(self, rows: np.ndarray | None = None) -> sp.csr_matrix:
        """Expression of the given rows (all by default), in that order: float32 [len(rows), n_genes]."""
        parts = []
        offsets = self.shard_offsets
        if rows is None:
            for p in self.shard_paths:
                parts.append(_csr(pq.read_table(p, columns=["gene_index", "value"]), self.n_genes))
            return sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, self.n_genes), dtype=np.float32)
        rows = np.asarray(rows, dtype=np.int64)
        shard_of = np.searchsorted(offsets, rows, side="right") - 1
        order = np.argsort(shard_of, kind="stable")
        pieces = []
        for s in np.unique(shard_of):
            local = rows[shard_of == s] - offsets[s]
            table = pq.read_table(self.shard_paths[s], columns=["gene_index", "value"]).take(pa.array(local))
            pieces.append(_csr(table, self.n_genes))
        if not pieces:
            return sp.csr_matrix((0, self.n_genes), dtype=np.float32)
        stacked = sp.vstack(pieces, format="csr")
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return stacked[inverse]

    def read_cell_ids(self, rows: np.ndarray) -> list[str]:
        """The cell ids of the given store rows, in that order (reads only the shards holding them)."""
        rows = np.asarray(rows, dtype=np.int64)
        offsets = self.shard_offsets
        shard_of = np.searchsorted(offsets, rows, side="right") - 1
        out = np.empty(len(rows), dtype=object)
        for s in np.unique(shard_of):
            at = np.flatnonzero(shard_of == s)
            ids = pq.read_table(self.shard_paths[s], columns=["cell_id"]).column(0)
            out[at] = ids.take(pa.array(rows[at] - offsets[s])).to_numpy(zero_copy_only=False)
        return [str(x) for x in out]

    def obsm(self, key: str, rows: np.ndarray | None = None) -> np.ndarray:
        if key not in self.obsm_keys:
            raise UserError(
                f"{self.path} has no obsm embedding {key!r}; available: {', '.join(self.obsm_keys) or 'none'}"
            )
        col = self._read([f"obsm.{key}"]).column(0).combine_chunks()
        arr = col.values.to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size).astype(np.float32)
        return arr if rows is None else arr[np.asarray(rows)]


def _csr(table: pa.Table, n_genes: int) -> sp.csr_matrix:
    gi = table.column("gene_index").combine_chunks()
    val = table.column("value").combine_chunks()
    indptr = gi.offsets.to_numpy() - gi.offsets[0].as_py()
    indices = gi.values.to_numpy(zero_copy_only=False)[gi.offsets[0].as_py() : gi.offsets[-1].as_py()]
    data = val.values.to_numpy(zero_copy_only=False)[val.offsets[0].as_py() : val.offsets[-1].as_py()]
    return sp.csr_matrix((data.astype(np.float32), indices, indptr), shape=(len(gi), n_genes))
