"""Writers of atlas-scale predictions: Parquet (cell_id, p_sensitive, label[, embedding]) or a copy of the
source .h5ad with prediction columns in ``obs`` (and ``obsm['X_scdrugmap']``)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import UserError
from ..fsutil import atomic_file
from .loaded import THRESHOLD, label_of


@dataclass
class PredictStats:
    n_cells: int
    seconds: float
    n_sensitive: int
    feature_dim: int = 0

    @property
    def cells_per_s(self) -> float:
        return self.n_cells / self.seconds if self.seconds else 0.0


def write_parquet(batches: Iterator[dict[str, np.ndarray]], out: Path, embeddings: bool) -> PredictStats:
    n = n_sens = dim = 0
    with atomic_file(out) as tmp:
        writer = None
        try:
            for b in batches:
                p = np.asarray(b["p_sensitive"], dtype=np.float32)
                cols: dict[str, Any] = {
                    "cell_id": pa.array(b["cell_id"].astype(str), type=pa.string()),
                    "p_sensitive": pa.array(p),
                    "label": pa.array(label_of(p).tolist(), type=pa.string()),
                }
                if embeddings:
                    f = np.ascontiguousarray(np.stack(b["features"]) if b["features"].dtype == object
                                             else b["features"], dtype=np.float32)
                    dim = f.shape[1]
                    cols["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(f.reshape(-1)), dim)
                table = pa.table(cols)
                if writer is None:
                    writer = pq.ParquetWriter(str(tmp), table.schema)
                writer.write_table(table)
                n += len(p)
                n_sens += int((p >= THRESHOLD).sum())
            if writer is None:
                raise UserError("the data holds no cells to predict")
        finally:
            if writer is not None:
                writer.close()
    return PredictStats(n, 0.0, n_sens, dim)


def write_h5ad(batches: Iterator[dict[str, np.ndarray]], src: Path, out: Path, embeddings: bool) -> PredictStats:
    # anndata/h5py load only for an .h5ad output
    import anndata as ad
    import h5py

    n = n_sens = dim = 0
    with atomic_file(out) as tmp:
        shutil.copyfile(src, tmp)
        with h5py.File(tmp, "r+") as f:
            obs = ad.io.read_elem(f["obs"])
            row_of = pd.Series(np.arange(len(obs)), index=obs.index.astype(str))
            p_all = np.full(len(obs), np.nan, dtype=np.float32)
            emb_ds = None
            for b in batches:
                rows = row_of.reindex(b["cell_id"].astype(str)).to_numpy()
                p = np.asarray(b["p_sensitive"], dtype=np.float32)
                p_all[rows] = p
                n += len(p)
                n_sens += int((p >= THRESHOLD).sum())
                if embeddings:
                    feats = np.stack(b["features"]) if b["features"].dtype == object else b["features"]
                    if emb_ds is None:
                        dim = feats.shape[1]
                        grp = f.require_group("obsm")
                        if "encoding-type" not in grp.attrs:
                            grp.attrs["encoding-type"], grp.attrs["encoding-version"] = "dict", "0.1.0"
                        if "X_scdrugmap" in grp:
                            del grp["X_scdrugmap"]
                        emb_ds = grp.create_dataset("X_scdrugmap", shape=(len(obs), dim), dtype="float32",
                                                    fillvalue=np.nan, chunks=(min(len(obs), 4096), dim))
                        emb_ds.attrs["encoding-type"], emb_ds.attrs["encoding-version"] = "array", "0.2.0"
                    order = np.argsort(rows)
                    emb_ds[rows[order]] = feats[order].astype(np.float32)  # h5py wants increasing indices
            obs["scdrugmap_p_sensitive"] = p_all
            labels = np.where(np.isnan(p_all), None, label_of(np.nan_to_num(p_all, nan=0.0)))
            obs["scdrugmap_label"] = pd.Categorical(labels, categories=["resistant", "sensitive"])
            del f["obs"]
            ad.io.write_elem(f, "obs", obs)
    return PredictStats(n, 0.0, n_sens, dim)
