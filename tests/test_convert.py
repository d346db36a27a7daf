"""Labels, .h5ad -> cell store conversion and its bad-input errors, on real files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scdrugmap_ray.engine.data.convert import ConvertOptions, convert_h5ad, ensure_store, inspect_h5ad
from scdrugmap_ray.engine.data.schema import parse_labels
from scdrugmap_ray.engine.data.simulate import simulate_h5ad
from scdrugmap_ray.engine.data.store import CellStore
from scdrugmap_ray.engine.errors import UserError

SIM_OPTS = ConvertOptions(label_key="response", dataset_key="dataset", sample_key="sample")


@pytest.fixture(scope="module")
def sim_h5ad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("conv") / "sim.h5ad"
    simulate_h5ad(path, n_cells=1500, n_datasets=3, n_genes=800, seed=3, progress=False)
    return path


def _write(path: Path, x: np.ndarray | sp.spmatrix, obs: pd.DataFrame, var_names: list[str]) -> Path:
    ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=var_names)).write_h5ad(path)
    return path


def _small_obs(n: int) -> pd.DataFrame:
    return pd.DataFrame({"response": ["sensitive", "resistant"] * (n // 2)}, index=[f"c{i}" for i in range(n)])


# ------------------------------------------------------------------------------------------- labels


@pytest.mark.parametrize(
    ("value", "code"),
    [
        *[(v, 1) for v in ("sensitive", "Sensitivity", " responder ", "RESPONSE", "responsive", "1", "1.0", "True",
                           "yes", 1, 1.0, True)],
        *[(v, 0) for v in ("resistant", "Resistance", "non-responder", "NonResponder", "non_responder",
                           "non-response", "no response", "0", "0.0", "false", "No", 0, 0.0, False)],
        *[(v, -1) for v in ("", None, np.nan, "unknown", "Unlabeled", "unlabelled", "NA", "n/a", "ambiguous",
                            "none")],
    ],
)
def test_label_spellings(value: object, code: int) -> None:
    codes, _ = parse_labels(pd.Series([value, "sensitive", "resistant"], dtype=object))
    assert codes.tolist() == [code, 1, 0]


def test_labels_mapping_report_and_dtype() -> None:
    codes, mapping = parse_labels(pd.Series(pd.Categorical(["responder", "non-responder", "unknown", "responder"])))
    assert codes.dtype == np.int8 and codes.tolist() == [1, 0, -1, 1]
    assert mapping == {"sensitive": ["responder"], "resistant": ["non-responder"], "unknown": ["unknown"]}


def test_single_letters_are_not_guessed_but_can_be_mapped() -> None:
    values = pd.Series(["R"] * 3 + ["S"] * 2 + ["x"])
    with pytest.raises(UserError) as err:
        parse_labels(values)
    msg = str(err.value)
    assert "'r' (3 cells)" in msg and "'s' (2 cells)" in msg and "'x' (1 cells)" in msg
    assert "--sensitive" in msg and "--resistant" in msg and "\n" not in msg
    codes, mapping = parse_labels(values, sensitive=["S"], resistant=["r", "X"])
    assert codes.tolist() == [0, 0, 0, 1, 1, 0] and mapping["resistant"] == ["r", "x"]


def test_user_values_override_builtin_spellings() -> None:
    codes, _ = parse_labels(pd.Series(["response", "ambiguous", "1"]), sensitive=["ambiguous"], resistant=["1"])
    assert codes.tolist() == [1, 1, 0]
    with pytest.raises(UserError, match="both"):
        parse_labels(pd.Series(["a"]), sensitive=["a"], resistant=["A"])


def test_many_unrecognised_values_are_summarised() -> None:
    with pytest.raises(UserError, match=r"and 3 more"):
        parse_labels(pd.Series([f"drug{i}" for i in range(8)]))


# ------------------------------------------------------------------------------------------ convert


def test_round_trip_exact_with_small_chunks_and_shards(sim_h5ad: Path, tmp_path: Path) -> None:
    opts = ConvertOptions(**{**SIM_OPTS.__dict__, "chunk_size": 170, "shard_cells": 400, "row_group_cells": 64})
    report = convert_h5ad(sim_h5ad, tmp_path / "store", opts, progress=False)
    store = CellStore.open(tmp_path / "store")
    a = ad.read_h5ad(sim_h5ad)
    assert len(store.shard_paths) == 4 and store.n_cells == 1500 == report.n_cells_written
    assert np.array_equal(store.read_csr().toarray(), a.X.toarray())
    obs = store.obs()
    assert obs["cell_id"].tolist() == a.obs_names.tolist()
    assert obs["dataset"].tolist() == a.obs["dataset"].astype(str).tolist()
    assert obs["sample"].tolist() == a.obs["sample"].astype(str).tolist()
    assert obs["regimen"].tolist() == a.obs["regimen"].astype(str).tolist()
    assert np.array_equal(obs["label"].to_numpy(), (a.obs["response"] == "sensitive").to_numpy().astype(float))
    assert np.allclose(obs["n_counts"], np.asarray(a.X.sum(axis=1)).ravel())
    meta = store.meta
    assert meta["value_type"] == "counts" and store.is_counts and meta["n_empty_dropped"] == 0
    assert meta["label_counts"]["sensitive"] + meta["label_counts"]["resistant"] == 1500
    assert meta["obs_columns"] == {"dataset": "dataset", "sample": "sample", "cancer_type": "cancer_type",
                                   "tissue": "tissue", "therapy": "therapy", "regimen": "regimen"}
    # genes: simulated symbols with their Ensembl IDs
    assert store.genes["symbol"].tolist() == a.var_names.tolist()
    assert store.genes["ensembl_id"].tolist() == a.var["ensembl_id"].tolist()
    # the chunking is not part of the store's identity
    other = convert_h5ad(sim_h5ad, tmp_path / "store2", SIM_OPTS, progress=False)
    assert CellStore.open(tmp_path / "store2").content_hash == store.content_hash
    assert other.lines() == report.lines()


def test_dense_x_empty_cells_dropped_and_counted(tmp_path: Path) -> None:
    x = np.arange(8 * 5, dtype=np.float32).reshape(8, 5) % 4
    x[[2, 5]] = 0
    src = _write(tmp_path / "dense.h5ad", x, _small_obs(8), ["TP53", "EGFR", "KRAS", "MYC", "NOTAGENE"])
    report = convert_h5ad(src, tmp_path / "store", ConvertOptions(label_key="response", chunk_size=3), progress=False)
    store = CellStore.open(tmp_path / "store")
    keep = [0, 1, 3, 4, 6, 7]
    assert report.n_cells_in == 8 and report.n_empty_dropped == 2 and store.n_cells == 6
    assert any("2 empty dropped" in line for line in report.lines())
    assert np.array_equal(store.read_csr().toarray(), x[keep])
    assert store.obs()["cell_id"].tolist() == [f"c{i}" for i in keep]
    assert store.obs()["dataset"].unique().tolist() == ["dense"]  # one dataset, named after the file
    genes = store.genes
    assert genes["ensembl_id"].iloc[0] == "ENSG00000141510" and pd.isna(genes["ensembl_id"].iloc[4])


def test_nan_in_late_chunk_leaves_nothing_behind(sim_h5ad: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.h5ad"
    shutil.copy(sim_h5ad, bad)
    with h5py.File(bad, "r+") as f:
        f["X/data"][-1] = np.nan
    out = tmp_path / "out" / "store"
    opts = ConvertOptions(label_key="response", chunk_size=100, shard_cells=200)
    with pytest.raises(UserError, match=r"NaN or infinite values \(first in cell 'cell0001499'\)"):
        convert_h5ad(bad, out, opts, progress=False)
    assert not out.exists() and list(out.parent.iterdir()) == []
    with pytest.raises(UserError, match="NaN"):
        inspect_h5ad(bad, opts)


def test_real_scad_file_non_counts_and_obsm(shared_dir: Path, tmp_path: Path) -> None:
    src = shared_dir / "data" / "scad_target_JHU006_Kinker2020_GSE157220.h5ad"
    opts = ConvertOptions(label_key="response_Afatinib", dataset="JHU006")
    report = convert_h5ad(src, tmp_path / "store", opts, progress=False)
    store = CellStore.open(tmp_path / "store")
    a = ad.read_h5ad(src)
    assert store.meta["value_type"] == "non_counts" and not store.is_counts
    assert any("negative values" in w for w in report.warnings)
    assert report.label_counts == {"sensitive": 60, "resistant": 60, "unknown": 0}
    assert store.meta["label_mapping"] == {"sensitive": ["1"], "resistant": ["0"], "unknown": []}
    assert store.obsm_keys == ["X_scFoundation_50M_tgthighres4"]
    emb = store.obsm("X_scFoundation_50M_tgthighres4")
    assert emb.shape == (120, 3072) and emb.dtype == np.float32
    assert np.array_equal(emb, a.obsm["X_scFoundation_50M_tgthighres4"].astype(np.float32))
    assert np.allclose(store.read_csr().toarray(), a.X)
    # var index is Entrez; symbols and Ensembl IDs come from the var columns (2 missing symbols keep the ID)
    assert store.genes["symbol"].iloc[0] == "AAAS" and store.genes["ensembl_id"].iloc[0] == "ENSG00000094914"
    assert report.gene_id_type == "other identifier"
    assert store.obs()["dataset"].unique().tolist() == ["JHU006"]


def test_real_drop_seq_file_with_ambiguous_labels(shared_dir: Path, tmp_path: Path) -> None:
    src = shared_dir / "data" / "gse149383_PC9_erlotinib_day11_rawcounts.h5ad"
    report = inspect_h5ad(src, ConvertOptions(label_key="scdeal_label"))
    assert report.value_type == "counts" and report.n_genes == 21207
    # 8,600 barcodes, 6 of them without any count: dropped and counted
    assert report.n_cells_in == 8600 and report.n_empty_dropped == 6 and report.n_cells_written == 8594
    assert report.label_counts == {"sensitive": 0, "resistant": 1535, "unknown": 7059}
    # "ambiguous_barcode_collision" is recognised as unknown by its prefix
    assert report.label_mapping["unknown"] == ["ambiguous_barcode_collision", "unlabeled"]
    assert report.gene_id_type == "symbol"


def test_ensure_store_converts_once(sim_h5ad: Path, tmp_path: Path) -> None:
    first = ensure_store(sim_h5ad, SIM_OPTS, tmp_path / "cache", progress=False)
    stamp = (first.path / "meta.json").stat().st_mtime_ns
    again = ensure_store(sim_h5ad, SIM_OPTS, tmp_path / "cache", progress=False)
    assert again.path == first.path and (again.path / "meta.json").stat().st_mtime_ns == stamp
    other = ensure_store(sim_h5ad, ConvertOptions(label_key="response"), tmp_path / "cache", progress=False)
    assert other.path != first.path and other.content_hash != first.content_hash
    assert ensure_store(first.path, ConvertOptions(), tmp_path / "unused").path == first.path


# ---------------------------------------------------------------------------------------- bad input


def test_missing_and_not_h5ad_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        inspect_h5ad(tmp_path / "nope.h5ad", ConvertOptions())
    txt = tmp_path / "cells.h5ad"
    txt.write_text("barcode,gene\n")
    with pytest.raises(UserError, match=r"not an \.h5ad file"):
        convert_h5ad(txt, tmp_path / "store", ConvertOptions(), progress=False)
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("fraction", [0.1, 0.6, 0.97])
def test_truncated_file(sim_h5ad: Path, tmp_path: Path, fraction: float) -> None:
    data = sim_h5ad.read_bytes()
    cut = tmp_path / "cut.h5ad"
    cut.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(UserError, match="truncated or corrupt") as err:
        convert_h5ad(cut, tmp_path / "store", SIM_OPTS, progress=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "store").exists()


def test_missing_columns_are_named(sim_h5ad: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"no column 'drug_response' \(--label-key\); obs columns: response, dataset"):
        inspect_h5ad(sim_h5ad, ConvertOptions(label_key="drug_response"))
    for opts, flag in [
        (ConvertOptions(dataset_key="batch"), "--dataset-key"),
        (ConvertOptions(sample_key="donor"), "--sample-key"),
        (ConvertOptions(obs_map={"tissue": "organ"}), "--obs-map tissue="),
        (ConvertOptions(gene_key="feature_name"), "--gene-key"),
    ]:
        with pytest.raises(UserError, match=flag):
            inspect_h5ad(sim_h5ad, opts)
    with pytest.raises(UserError, match="no layer 'counts'"):
        inspect_h5ad(sim_h5ad, ConvertOptions(layer="counts"))
    with pytest.raises(UserError, match="not both"):
        inspect_h5ad(sim_h5ad, ConvertOptions(dataset_key="dataset", dataset="d1"))


def test_unrecognised_labels_in_file(tmp_path: Path) -> None:
    obs = pd.DataFrame({"resp": ["S", "R"] * 3}, index=[f"c{i}" for i in range(6)])
    src = _write(tmp_path / "sr.h5ad", np.ones((6, 3), dtype=np.float32), obs, ["A", "B", "C"])
    with pytest.raises(UserError, match=r"'r' \(3 cells\).*--sensitive"):
        convert_h5ad(src, tmp_path / "store", ConvertOptions(label_key="resp"), progress=False)
    assert not (tmp_path / "store").exists()
    opts = ConvertOptions(label_key="resp", sensitive=("S",), resistant=("R",))
    assert inspect_h5ad(src, opts).label_counts == {"sensitive": 3, "resistant": 3, "unknown": 0}


@pytest.mark.filterwarnings("ignore:.* names are not unique")
def test_duplicated_cell_and_gene_names(tmp_path: Path) -> None:
    x = sp.random(4, 3, density=0.8, format="csr", dtype=np.float32, random_state=0)
    obs = pd.DataFrame(index=["a", "b", "a", "c"])
    src = _write(tmp_path / "dupcells.h5ad", x, obs, ["G1", "G2", "G3"])
    with pytest.raises(UserError, match=r"1 duplicated cell name\(s\), e.g. a"):
        convert_h5ad(src, tmp_path / "store", ConvertOptions(), progress=False)
    src = _write(tmp_path / "dupgenes.h5ad", x, pd.DataFrame(index=list("abcd")), ["G1", "G2", "G1"])
    with pytest.raises(UserError, match=r"duplicated gene name\(s\), e.g. G1"):
        convert_h5ad(src, tmp_path / "store", ConvertOptions(), progress=False)
    assert not (tmp_path / "store").exists()


def test_csc_matrix_refused_with_fix(tmp_path: Path) -> None:
    x = sp.random(6, 4, density=0.5, format="csc", dtype=np.float32, random_state=1)
    src = _write(tmp_path / "csc.h5ad", x, pd.DataFrame(index=list("abcdef")), list("ABCD"))
    with pytest.raises(UserError, match=r"column-wise \(CSC\).*tocsr"):
        convert_h5ad(src, tmp_path / "store", ConvertOptions(), progress=False)


def test_existing_output_is_not_overwritten(sim_h5ad: Path, tmp_path: Path) -> None:
    out = tmp_path / "store"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        convert_h5ad(sim_h5ad, out, SIM_OPTS, progress=False)
    assert (out / "keep.txt").read_text() == "mine"


def test_layer_and_gene_key(tmp_path: Path) -> None:
    counts = sp.csr_matrix(np.array([[1, 0, 2], [0, 3, 0], [4, 0, 0]], dtype=np.float32))
    a = ad.AnnData(X=np.log1p(counts.toarray()), obs=pd.DataFrame(index=list("abc")),
                   var=pd.DataFrame({"name": ["TP53", "EGFR", "MYC"]},
                                    index=["ENSG00000141510", "ENSG00000146648", "ENSG00000136997"]))
    a.layers["counts"] = counts
    a.obsm["X_pca"] = np.arange(6, dtype=np.float64).reshape(3, 2)
    a.obsm["X_sparse"] = sp.csr_matrix(np.eye(3))
    a.write_h5ad(tmp_path / "l.h5ad")
    report = convert_h5ad(tmp_path / "l.h5ad", tmp_path / "s1", ConvertOptions(layer="counts"), progress=False)
    s1 = CellStore.open(tmp_path / "s1")
    assert s1.obsm_keys == ["X_pca"] and np.array_equal(s1.obsm("X_pca"), a.obsm["X_pca"])
    assert any("skipped: X_sparse" in w for w in report.warnings)
    assert s1.is_counts and np.array_equal(s1.read_csr().toarray(), counts.toarray())
    # Ensembl IDs as names: symbols filled from the mapping table
    assert s1.genes["symbol"].tolist() == ["TP53", "EGFR", "MYC"]
    assert s1.genes["ensembl_id"].tolist() == ["ENSG00000141510", "ENSG00000146648", "ENSG00000136997"]
    convert_h5ad(tmp_path / "l.h5ad", tmp_path / "s2", ConvertOptions(gene_key="name"), progress=False)
    s2 = CellStore.open(tmp_path / "s2")
    assert not s2.is_counts and s2.genes["symbol"].tolist() == ["TP53", "EGFR", "MYC"]
    assert json.loads((tmp_path / "s2" / "meta.json").read_text())["value_type"] == "non_counts"
