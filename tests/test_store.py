"""The cell store's read API on a real converted store (several shards)."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scdrugmap_ray.engine.data.convert import ConvertOptions, convert_h5ad
from scdrugmap_ray.engine.data.schema import METADATA_COLUMNS, SCHEMA_VERSION, SHARD_SCHEMA
from scdrugmap_ray.engine.data.simulate import simulate_h5ad
from scdrugmap_ray.engine.data.store import CellStore
from scdrugmap_ray.engine.errors import UserError


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[CellStore, ad.AnnData]:
    tmp = tmp_path_factory.mktemp("store")
    src = tmp / "sim.h5ad"
    simulate_h5ad(src, n_cells=1000, n_datasets=2, n_genes=600, seed=5, progress=False)
    opts = ConvertOptions(label_key="response", dataset_key="dataset", sample_key="sample",
                          chunk_size=128, shard_cells=300, row_group_cells=100)
    convert_h5ad(src, tmp / "store", opts, progress=False)
    return CellStore.open(tmp / "store"), ad.read_h5ad(src)


def test_layout_and_meta(built: tuple[CellStore, ad.AnnData]) -> None:
    store, a = built
    assert [p.name for p in store.shard_paths] == [f"part-{i:05d}.parquet" for i in range(4)]
    schema = pq.read_schema(store.shard_paths[0])
    for field in SHARD_SCHEMA:
        assert schema.field(field.name).type == field.type
    assert pq.ParquetFile(store.shard_paths[0]).metadata.num_row_groups == 3  # 300 cells in groups of <= 100
    assert store.n_cells == 1000 and store.n_genes == 600 and store.is_counts
    assert store.meta["schema_version"] == SCHEMA_VERSION and len(store.content_hash) == 64
    assert store.meta["datasets"] == {"sim01": 500, "sim02": 500}
    assert store.obsm_keys == []
    g = store.genes
    assert list(g.columns) == ["position", "symbol", "ensembl_id"]
    assert g["position"].tolist() == list(range(600)) and g["symbol"].tolist() == a.var_names.tolist()
    assert g["ensembl_id"].notna().all()


def test_obs(built: tuple[CellStore, ad.AnnData]) -> None:
    store, a = built
    obs = store.obs()
    assert list(obs.columns) == ["cell_id", "label", "n_counts", "n_genes", *METADATA_COLUMNS]
    assert obs.index.equals(pd.RangeIndex(1000))
    assert obs["label"].dtype == np.float64 and set(obs["label"].unique()) == {0.0, 1.0}
    assert obs["n_genes"].tolist() == np.diff(a.X.indptr).tolist()
    assert obs["therapy"].tolist() == a.obs["therapy"].astype(str).tolist()
    sub = store.obs(["cell_id", "sample"])
    assert list(sub.columns) == ["cell_id", "sample"] and sub["sample"].nunique() == 8


def test_unlabelled_store_has_nan_labels(tmp_path: Path) -> None:
    src = tmp_path / "s.h5ad"
    simulate_h5ad(src, n_cells=50, n_datasets=1, n_genes=100, progress=False)
    convert_h5ad(src, tmp_path / "store", ConvertOptions(), progress=False)
    store = CellStore.open(tmp_path / "store")
    assert store.obs()["label"].isna().all() and store.meta["label_key"] is None
    assert store.obs()["sample"].isna().all()  # no --sample-key: no samples


def test_read_csr_rows_any_order(built: tuple[CellStore, ad.AnnData]) -> None:
    store, a = built
    full = a.X.toarray()
    rows = np.array([999, 0, 301, 300, 299, 5, 5, 650])  # across shards, out of order, repeated
    got = store.read_csr(rows)
    assert got.shape == (8, 600) and got.dtype == np.float32
    assert np.array_equal(got.toarray(), full[rows])
    assert store.read_csr(np.array([], dtype=np.int64)).shape == (0, 600)
    assert np.array_equal(store.read_csr().toarray(), full)


def test_iter_batches(built: tuple[CellStore, ad.AnnData]) -> None:
    store, a = built
    batches = list(store.iter_batches(batch_size=64, columns=["cell_id", "gene_index", "value"]))
    assert all(b.num_rows <= 64 for b in batches) and sum(b.num_rows for b in batches) == 1000
    table = pa.Table.from_batches(batches)
    assert table.column("cell_id").to_pylist() == a.obs_names.tolist()
    first = table.slice(0, 1)
    idx = np.asarray(first.column("gene_index")[0].as_py())
    assert np.all(np.diff(idx) > 0)  # ascending gene positions
    assert np.array_equal(np.asarray(first.column("value")[0].as_py()), a.X[0].toarray().ravel()[idx])


def test_obsm_from_real_file(shared_dir: Path, tmp_path: Path) -> None:
    src = shared_dir / "data" / "scad_target_SCC47_Kinker2020_GSE157220.h5ad"
    a = ad.read_h5ad(src)
    keys = list(a.obsm.keys())
    convert_h5ad(src, tmp_path / "store", ConvertOptions(label_key=a.obs.columns[0], chunk_size=20,
                                                         shard_cells=30), progress=False)
    store = CellStore.open(tmp_path / "store")
    assert store.obsm_keys == sorted(keys) and len(store.shard_paths) == 3
    for key in keys:
        rows = np.array([65, 0, 31])
        assert np.array_equal(store.obsm(key, rows), np.asarray(a.obsm[key], dtype=np.float32)[rows])
    with pytest.raises(UserError, match="no obsm embedding 'X_pca'"):
        store.obsm("X_pca")


def test_open_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"not a cell store.*scdrugmap-ray convert"):
        CellStore.open(tmp_path)
    (tmp_path / "meta.json").write_text('{"schema_version": 99}')
    with pytest.raises(UserError, match="schema version 99"):
        CellStore.open(tmp_path)
