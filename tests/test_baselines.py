"""Baseline models: PCA and HVG fitted on training cells only, normalisation, state, obsm embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scdrugmap_ray.engine.data.convert import ConvertOptions, convert_h5ad
from scdrugmap_ray.engine.data.splits import pooled_folds
from scdrugmap_ray.engine.data.store import CellStore
from scdrugmap_ray.engine.errors import UserError
from scdrugmap_ray.engine.eval.metrics import compute_metrics
from scdrugmap_ray.engine.models.base import EmbeddingModel, FittedFeatureModel, get_model
from scdrugmap_ray.engine.models.baselines import HVGMLP, PCALogReg, is_counts, seurat_dispersion
from scdrugmap_ray.engine.train.heads import make_head


def counts_matrix(n: int = 600, g: int = 400, seed: int = 0, planted: np.ndarray | None = None) -> sp.csr_matrix:
    """Negative-binomial-like counts, ~85% zeros; ``planted`` genes are strongly overdispersed."""
    rng = np.random.default_rng(seed)
    means = rng.lognormal(-1.5, 1.0, size=g)
    lib = rng.lognormal(0, 0.3, size=(n, 1))
    rate = means * lib
    shape = np.full(g, 20.0)  # near-Poisson
    if planted is not None:
        shape[planted] = 0.05  # same mean, huge dispersion
    lam = rng.gamma(shape, rate / shape)
    return sp.csr_matrix(rng.poisson(lam).astype(np.float32))


def genes_table(g: int) -> pd.DataFrame:
    return pd.DataFrame({"position": np.arange(g, dtype=np.int32), "symbol": [f"GENE{i}" for i in range(g)],
                         "ensembl_id": [None] * g})


def log_cp10k_dense(x: sp.csr_matrix) -> np.ndarray:
    d = x.toarray().astype(np.float64)
    s = d.sum(axis=1, keepdims=True)
    return np.log1p(np.divide(d * 1e4, s, out=np.zeros_like(d), where=s > 0))


def test_registry_defaults() -> None:
    pca, hvg = get_model("pca-logreg"), get_model("hvg-mlp")
    assert isinstance(pca, FittedFeatureModel) and pca.default_head == "logreg"
    assert isinstance(hvg, FittedFeatureModel) and hvg.default_head == "mlp"
    assert pca.options == {"n_components": 50, "target_sum": 1e4, "normalize": "auto", "fit_cells": 200_000}
    assert hvg.options["n_top_genes"] == 2000
    with pytest.raises(UserError, match=r"has no option\(s\) n_pcs"):
        get_model("pca-logreg", {"n_pcs": 10})
    with pytest.raises(UserError, match="normalize must be auto, true or false"):
        get_model("hvg-mlp", {"normalize": "yes"})


def test_pca_fitted_on_train_only() -> None:
    x = counts_matrix()
    train, test = x[:400], x[400:]
    model = PCALogReg(n_components=10)
    model.fit(train, genes_table(x.shape[1]), seed=0)
    assert model.normalize is True  # counts detected
    before = {k: np.copy(v) for k, v in model.state().items() if isinstance(v, np.ndarray)}
    f_test = model.transform(test)
    f_train = model.transform(train)
    after = model.state()
    for k, v in before.items():
        assert np.array_equal(v, after[k]), k  # transforming cells never refits
    assert f_test.shape == (200, 10) and f_test.dtype == np.float32
    # the fit is the PCA of the TRAINING cells' log1p CP10k: same scores as a dense exact PCA (up to sign)
    dense = log_cp10k_dense(train)
    centred = dense - dense.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    ref = centred @ vt[:10].T
    signs = np.sign((ref * f_train).sum(axis=0))
    np.testing.assert_allclose(f_train, ref * signs, atol=2e-3 * np.abs(ref).max())
    np.testing.assert_allclose(f_train.mean(axis=0), 0, atol=1e-3 * np.abs(ref).max())
    # test cells projected with the training mean and axes, not their own
    dense_test = log_cp10k_dense(test)
    np.testing.assert_allclose(f_test, (dense_test - dense.mean(axis=0)) @ (vt[:10].T * signs),
                               atol=2e-3 * np.abs(ref).max())
    # refitting on other cells gives another fit: the test rows really were not part of it
    other = PCALogReg(n_components=10)
    other.fit(x, genes_table(x.shape[1]), seed=0)
    assert not np.allclose(other.state()["mean"], model.state()["mean"])


def test_pca_rows_independent_deterministic_and_state_round_trip() -> None:
    x = counts_matrix(seed=1)
    a, b = PCALogReg(n_components=8), PCALogReg(n_components=8)
    a.fit(x[:300], genes_table(x.shape[1]), seed=3)
    b.fit(x[:300], genes_table(x.shape[1]), seed=3)
    full = a.transform(x)
    assert np.array_equal(full, b.transform(x))
    np.testing.assert_allclose(a.transform(x[[5, 450, 7]]), full[[5, 450, 7]], rtol=1e-5, atol=1e-5)
    loaded = PCALogReg(n_components=8)
    loaded.load_state(a.state())
    assert np.array_equal(loaded.transform(x), full)
    assert a.state()["gene_symbols"][:2] == ["GENE0", "GENE1"]
    with pytest.raises(UserError, match="cannot be loaded into 'hvg-mlp'"):
        HVGMLP().load_state(a.state())


def test_pca_components_clipped_and_non_counts_used_as_is() -> None:
    x = counts_matrix(n=30, g=50)
    model = PCALogReg()  # 50 components asked, 29 possible
    model.fit(x, genes_table(50), seed=0)
    assert model.transform(x).shape == (30, 29)
    logged = x.copy()
    logged.data = np.log1p(logged.data) * 0.37  # not integers: already normalised
    assert not is_counts(logged) and is_counts(x)
    m2 = PCALogReg(n_components=5)
    m2.fit(logged, genes_table(50), seed=0)
    assert m2.normalize is False
    dense = logged.toarray().astype(np.float64)
    np.testing.assert_allclose(m2.state()["mean"], dense.mean(axis=0), rtol=1e-5, atol=1e-6)
    forced = PCALogReg(n_components=5, normalize=False)
    forced.fit(x, genes_table(50), seed=0)
    assert forced.normalize is False


def test_hvg_picks_planted_dispersed_genes() -> None:
    g = 400
    planted = np.arange(7, g, 40)  # 10 genes spread over the mean range
    x = counts_matrix(n=1500, g=g, seed=2, planted=planted)
    model = HVGMLP(n_top_genes=len(planted))
    model.fit(x[:1000], genes_table(g), seed=0)
    assert set(model.selected.tolist()) == set(planted.tolist())
    feats = model.transform(x[1000:])
    assert feats.shape == (500, len(planted)) and feats.dtype == np.float32
    # features: log1p CP10k of the selected genes, with library sizes over ALL genes
    np.testing.assert_allclose(feats, log_cp10k_dense(x[1000:])[:, model.selected], rtol=1e-5, atol=1e-5)
    st = model.state()
    assert st["selected_symbols"] == [f"GENE{i}" for i in sorted(planted)]
    loaded = HVGMLP(n_top_genes=len(planted))
    loaded.load_state(st)
    assert np.array_equal(loaded.transform(x[:50]), model.transform(x[:50]))


def test_hvg_selection_uses_training_cells_only() -> None:
    g = 200
    x = counts_matrix(n=800, g=g, seed=3)
    a = HVGMLP(n_top_genes=20)
    a.fit(x[:400], genes_table(g), seed=0)
    # make 20 other genes wildly variable in the test rows only: the fitted choice must not move
    test = x[400:].toarray()
    test[:, 100:120] *= np.random.default_rng(0).integers(0, 50, size=(400, 20))
    selected = a.selected.copy()
    a.transform(sp.csr_matrix(test))
    assert np.array_equal(a.selected, selected)
    b = HVGMLP(n_top_genes=20)
    b.fit(sp.vstack([x[:400], sp.csr_matrix(test)]).tocsr(), genes_table(g), seed=0)
    assert len(set(b.selected.tolist()) & set(range(100, 120))) > 10  # they would have been picked


def test_hvg_more_genes_asked_than_expressed() -> None:
    x = sp.csr_matrix(np.array([[1, 0, 3, 0], [2, 0, 0, 0], [0, 0, 5, 0]], dtype=np.float32))
    model = HVGMLP(n_top_genes=2000)
    model.fit(x, genes_table(4), seed=0)
    assert model.selected.tolist() == [0, 2]  # genes never expressed cannot vary
    with pytest.raises(UserError, match="no gene varies"):
        HVGMLP().fit(sp.csr_matrix((3, 4), dtype=np.float32), genes_table(4), seed=0)


def test_seurat_dispersion_z_scores_within_bins() -> None:
    mean = np.array([1.0, 1.0, 1.0, 0.0, 50.0])
    var = np.array([1.0, 2.0, 4.0, 0.0, 100.0])
    z = seurat_dispersion(mean, var, n_bins=2)
    d = np.log([1.0, 2.0, 4.0])
    np.testing.assert_allclose(z[:3], (d - d.mean()) / d.std(ddof=1))
    assert np.isnan(z[3]) and z[4] == 1.0  # never expressed; alone in its bin


# ------------------------------------------------------------------------------------------- obsm


def test_obsm_model_from_registry() -> None:
    m = get_model("obsm:X_scFoundation")
    assert isinstance(m, EmbeddingModel) and m.name == "obsm:X_scFoundation" and m.default_head == "mlp"
    assert m.identity() == {"name": "obsm:X_scFoundation", "options": {}}
    with pytest.raises(UserError, match="no option"):
        get_model("obsm:X_pca", {"dims": 3})
    with pytest.raises(UserError, match="unknown model 'obsm:'"):
        get_model("obsm:")


def test_obsm_embed_store_and_missing_key(tmp_path: Path) -> None:
    import anndata as ad

    rng = np.random.default_rng(0)
    n = 40
    x = counts_matrix(n=n, g=30, seed=4).toarray()
    x[:, 0] = 1  # no empty cells
    adata = ad.AnnData(
        X=sp.csr_matrix(x),
        obs=pd.DataFrame({"response": rng.choice(["sensitive", "resistant"], n)}, index=[f"c{i}" for i in range(n)]),
        var=pd.DataFrame(index=[f"GENE{i}" for i in range(30)]),
    )
    emb = rng.normal(size=(n, 6)).astype(np.float32)
    adata.obsm["X_emb"] = emb
    adata.write_h5ad(tmp_path / "a.h5ad")
    convert_h5ad(tmp_path / "a.h5ad", tmp_path / "store", ConvertOptions(label_key="response"),
                          progress=False)
    store = CellStore.open(tmp_path / "store")
    got = get_model("obsm:X_emb").embed_store(store)
    assert got.dtype == np.float32 and np.array_equal(got, emb)
    with pytest.raises(UserError, match="has no obsm key 'X_pca'; available obsm keys: X_emb"):
        get_model("obsm:X_pca").embed_store(store)


def test_real_scad_data_obsm_and_pca(shared_dir: Path, tmp_path: Path) -> None:
    """Published scFoundation embeddings and z-scored (non-count) expression of real cells, end to end."""
    import anndata as ad

    adata = ad.read_h5ad(shared_dir / "data" / "scad_target_JHU006_Kinker2020_GSE157220.h5ad")
    # two genes of this file have no symbol; name them by their Entrez ID (the index) so names are unique
    sym = adata.var["gene_symbol"].astype(object)
    adata.var["gene_symbol"] = sym.where(sym.notna(), adata.var_names.to_series()).astype(str)
    adata.write_h5ad(tmp_path / "jhu006.h5ad")
    convert_h5ad(tmp_path / "jhu006.h5ad", tmp_path / "store",
                         ConvertOptions(label_key="response_Afatinib"), progress=False)
    store = CellStore.open(tmp_path / "store")
    obs = store.obs()
    fold = pooled_folds(obs, n_folds=3, split="cell", seed=0)[0]  # no samples in this file: cell split
    y = obs["label"].to_numpy()

    emb = get_model("obsm:X_scFoundation_50M_tgthighres4").embed_store(store)
    assert emb.shape == (120, 3072)
    head = make_head("logreg")
    head.fit(emb[fold.train], y[fold.train], emb[fold.val], y[fold.val], seed=0)
    assert compute_metrics(y[fold.test], head.predict_proba(emb[fold.test]))["auroc"] > 0.8

    pca = PCALogReg(n_components=10)
    pca.fit(store.read_csr(fold.train), store.genes, seed=0)
    assert pca.normalize is False  # z-scored values, negatives: used as they are
    feats = pca.transform(store.read_csr(np.arange(store.n_cells)))
    head = make_head("logreg")
    head.fit(feats[fold.train], y[fold.train], feats[fold.val], y[fold.val], seed=0)
    assert compute_metrics(y[fold.test], head.predict_proba(feats[fold.test]))["auroc"] > 0.8


def test_atlas_sized_fold_fits_on_a_stated_subsample(tmp_path: Path) -> None:
    """`fit_cells` caps the cells the featurizer is fitted on (seeded), every cell is still transformed, shard
    by shard, and the features equal an unchunked transform."""
    from scdrugmap_ray.engine.data.convert import ConvertOptions, convert_h5ad
    from scdrugmap_ray.engine.data.simulate import simulate_h5ad
    from scdrugmap_ray.engine.data.splits import pooled_folds
    from scdrugmap_ray.engine.data.store import CellStore
    from scdrugmap_ray.engine.train.frozen import fit_subsample, fold_features

    simulate_h5ad(tmp_path / "s.h5ad", n_cells=600, n_datasets=2, samples_per_dataset=2, effect=1.0, seed=0,
                  n_genes=200, progress=False)
    convert_h5ad(tmp_path / "s.h5ad", tmp_path / "st", ConvertOptions(label_key="response", dataset_key="dataset",
                 sample_key="sample", shard_cells=130), progress=False)
    store = CellStore.open(tmp_path / "st")
    fold = pooled_folds(store.obs(), 2, "cell", seed=0)[0]
    model = get_model("pca-logreg", {"n_components": 5, "fit_cells": 100})
    x_train, x_val, x_test = fold_features(model, store, fold, 0, None)
    assert x_val.shape == (len(fold.val), 5)
    assert x_train.shape == (len(fold.train), 5) and x_test.shape == (len(fold.test), 5)
    sub = fit_subsample(fold.train, 100, 0)
    assert len(sub) == 100 and set(sub) <= set(fold.train) and np.array_equal(sub, fit_subsample(fold.train, 100, 0))
    ref = get_model("pca-logreg", {"n_components": 5})
    ref.fit(store.read_csr(sub), store.genes, 0)  # type: ignore[attr-defined]
    np.testing.assert_allclose(x_test, ref.transform(store.read_csr(fold.test)), atol=1e-4)  # type: ignore[attr-defined]
    with pytest.raises(UserError, match="fit_cells"):
        get_model("hvg-mlp", {"fit_cells": "many"})
