"""The simulator: real h5ad files, read back with anndata."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pytest
from scdrugmap_ray.engine.data.simulate import PROGRAM_SIZE, simulate_h5ad

OBS_COLUMNS = ["response", "dataset", "sample", "cancer_type", "tissue", "therapy", "regimen"]


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    path = tmp_path_factory.mktemp("sim") / "sim.h5ad"
    summary = simulate_h5ad(path, n_cells=3000, n_datasets=3, samples_per_dataset=4, n_genes=5000, chunk_cells=700,
                            seed=1, progress=False)
    return path, summary


def _log_norm(x: np.ndarray) -> np.ndarray:
    return np.log1p(x / x.sum(axis=1, keepdims=True) * 1e4)


def test_layout_and_metadata(sim: tuple[Path, object]) -> None:
    path, summary = sim
    a = ad.read_h5ad(path)
    assert a.shape == (3000, 5000)
    assert list(a.obs.columns) == OBS_COLUMNS
    assert a.obs_names.is_unique and a.var_names.is_unique
    assert set(a.obs["response"]) == {"sensitive", "resistant"}
    assert a.obs["dataset"].nunique() == 3 and a.obs["sample"].nunique() == 12
    assert a.var["ensembl_id"].str.match(r"^ENSG\d{11}$").all()
    assert a.obs.groupby("dataset", observed=True)["cancer_type"].nunique().eq(1).all()
    # X: float32 integer counts, CSR on disk (streamable by rows)
    with h5py.File(path) as f:
        assert f["X"].attrs["encoding-type"] == "csr_matrix"
    assert a.X.dtype == np.float32
    assert np.array_equal(a.X.data, np.round(a.X.data)) and (a.X.data > 0).all()
    assert summary.n_cells == 3000 and summary.n_samples == 12


def test_backed_read_matches_in_memory(sim: tuple[Path, object]) -> None:
    path, _ = sim
    full = ad.read_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    try:
        assert np.array_equal(backed.X[1000:1200].toarray(), full.X[1000:1200].toarray())
        assert backed.obs.equals(full.obs)
    finally:
        backed.file.close()


def test_labels_are_sample_level_and_balanced(sim: tuple[Path, object]) -> None:
    obs = ad.read_h5ad(sim[0]).obs
    assert obs.groupby("sample", observed=True)["response"].nunique().eq(1).all()
    per_dataset = obs.drop_duplicates("sample").groupby("dataset", observed=True)["response"].value_counts()
    assert per_dataset.eq(2).all() and len(per_dataset) == 6  # 2 sensitive + 2 resistant samples in each of 3


def test_count_distribution_is_realistic(sim: tuple[Path, object]) -> None:
    path, summary = sim
    x = ad.read_h5ad(path).X
    zeros = 1 - x.nnz / np.prod(x.shape)
    assert 0.85 <= zeros <= 0.95
    assert summary.fraction_zeros == pytest.approx(zeros)
    lib = np.asarray(x.sum(axis=1)).ravel()
    assert 1000 <= np.median(lib) <= 5000
    assert np.percentile(lib, 5) > 200 and np.percentile(lib, 95) < 2e4
    # over-dispersion: variance exceeds the mean (Poisson) for expressed genes
    dense = x.toarray()
    mean, var = dense.mean(axis=0), dense.var(axis=0)
    expressed = mean > 1
    assert expressed.sum() > 20 and np.median(var[expressed] / mean[expressed]) > 1.5


def test_resistance_program_recorded_and_visible(sim: tuple[Path, object]) -> None:
    path, summary = sim
    a = ad.read_h5ad(path)
    lfc = a.var["resistance_effect"].to_numpy()
    assert (lfc > 0).sum() == PROGRAM_SIZE and (lfc < 0).sum() == PROGRAM_SIZE
    assert sorted(summary.planted_up) == sorted(a.var_names[lfc > 0])
    expr = _log_norm(a.X.toarray())
    res = (a.obs["response"] == "resistant").to_numpy()
    diff = expr[res].mean(axis=0) - expr[~res].mean(axis=0)
    assert diff[lfc > 0].mean() > 0.15 and diff[lfc < 0].mean() < -0.15
    assert abs(diff[lfc == 0].mean()) < 0.05


def test_effect_zero_has_no_signal(tmp_path: Path) -> None:
    kw = dict(n_cells=2000, n_datasets=3, n_genes=5000, seed=1, progress=False)
    with_effect = ad.read_h5ad(simulate_h5ad(tmp_path / "a.h5ad", effect=1.0, **kw).path)
    null = ad.read_h5ad(simulate_h5ad(tmp_path / "b.h5ad", effect=0.0, **kw).path)
    assert (null.var["resistance_effect"] == 0).all()
    up = with_effect.var["resistance_effect"].to_numpy() > 0  # same seed: same genes were drawn for the program
    down = with_effect.var["resistance_effect"].to_numpy() < 0

    def signal(a: ad.AnnData) -> float:
        expr = _log_norm(a.X.toarray())
        res = (a.obs["response"] == "resistant").to_numpy()
        diff = expr[res].mean(axis=0) - expr[~res].mean(axis=0)
        return float(diff[up].mean() - diff[down].mean())

    assert signal(with_effect) > 0.35
    assert abs(signal(null)) < 0.1


def test_deterministic_by_seed(tmp_path: Path) -> None:
    kw = dict(n_cells=500, n_datasets=2, n_genes=300, progress=False)
    a = ad.read_h5ad(simulate_h5ad(tmp_path / "a.h5ad", seed=7, **kw).path)
    b = ad.read_h5ad(simulate_h5ad(tmp_path / "b.h5ad", seed=7, **kw).path)
    c = ad.read_h5ad(simulate_h5ad(tmp_path / "c.h5ad", seed=8, **kw).path)
    assert (a.X != b.X).nnz == 0 and a.obs.equals(b.obs) and a.var.equals(b.var)
    assert list(a.var_names) != list(c.var_names) or (a.X != c.X).nnz > 0
