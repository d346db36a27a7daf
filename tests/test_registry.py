"""Model registry and atlas-scale predict: a real benchmark run saves each fold's fitted model; `models
register` versions it; `predict` streams a store through Ray Data and reproduces the benchmark's test
predictions exactly; names never become paths unchecked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from scdrugmap_ray.engine.errors import UserError
from scdrugmap_ray.engine.registry import Registry, check_name, parse_ref, remap_columns

CLI = str(Path(sys.executable).parent / "scdrugmap-ray")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "..", ".hidden", "x" * 65, "a b", "a@b@c"])
def test_bad_names_are_refused(bad: str) -> None:
    with pytest.raises(UserError):
        parse_ref(bad)


def test_refs() -> None:
    assert parse_ref("pca") == ("pca", None)
    assert parse_ref("pca@3") == ("pca", 3)
    assert parse_ref("pca@latest") == ("pca", None)
    assert check_name("scGPT_lora-v1.2") == "scGPT_lora-v1.2"
    with pytest.raises(UserError, match="version"):
        parse_ref("pca@-1")


def test_remap_columns() -> None:
    import scipy.sparse as sp

    x = sp.csr_matrix(np.array([[1, 0, 2], [0, 0, 0], [0, 3, 4]], dtype=np.float32))
    out = remap_columns(x, ["A", "B", "C"], ["C", "Z", "A"])
    np.testing.assert_array_equal(out.toarray(), [[2, 0, 1], [0, 0, 0], [4, 0, 0]])


@pytest.fixture(scope="module")
def run(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from scdrugmap_ray.jobs.runner import run_benchmark
    from scdrugmap_ray.jobs.spec import BenchmarkSpec

    d = tmp_path_factory.mktemp("registry")
    spec = BenchmarkSpec.model_validate({
        "name": "reg",
        "data": [{"name": "sim", "simulate": {"cells": 300, "datasets": 2, "samples_per_dataset": 2,
                                              "effect": 1.5, "genes": 300, "seed": 0}}],
        # one model keeps the test short; pca-logreg is served in test_serve.py
        "models": [{"name": "hvg-mlp", "options": {"n_top_genes": 50}, "head_options": {"max_epochs": 5}}],
        "strategies": ["frozen"],
        "evaluation": {"pooled": {"folds": 2, "split": "cell"}, "bootstrap": 0},
        "seeds": [0],
        "output": str(d / "run"),
        "cache": str(d / "cache"),
    })
    run_dir = run_benchmark(spec, progress=False)
    return {"run_dir": run_dir, "registry": d / "registry", "dir": d, "spec": spec}


@pytest.mark.slow
def test_register_list_predict(run: dict[str, Any], tmp_path: Path) -> None:
    from scdrugmap_ray.engine.data.store import CellStore
    from scdrugmap_ray.engine.registry import predict_store

    run_dir, reg_dir = run["run_dir"], run["registry"]
    res = pd.read_parquet(run_dir / "results.parquet")
    hvg_unit = res.loc[res["model"] == "hvg-mlp", "unit_id"].iloc[0]
    # every frozen fold kept its fitted model, in safe formats only
    model_dir = run_dir / "units" / hvg_unit / "pooled-cell-fold1.model"
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "config.json", "featurizer.json", "featurizer.safetensors", "genes.parquet", "head.json", "head.safetensors"]

    proc = cli("models", "register", str(run_dir), "--name", "best", "--best", "auroc", "--registry", str(reg_dir))
    assert proc.returncode == 0, proc.stderr
    from scdrugmap_ray.jobs.register import register_from_run

    register_from_run(run_dir, "hvg", unit=hvg_unit, fold="1", registry=reg_dir)
    assert register_from_run(run_dir, "hvg", unit=hvg_unit, registry=reg_dir).name == "2"  # a new version
    listing = cli("models", "list", "--registry", str(reg_dir))
    assert listing.returncode == 0
    assert {"best@1", "hvg@1", "hvg@2"} <= {line.split()[0] for line in listing.stdout.splitlines()}

    reg = Registry(reg_dir)
    info = reg.info("hvg@1")
    assert info["source"]["fold"] == 1 and info["kind"] == "frozen" and info["training_data"]["n_train"] > 0
    assert info["cv_metrics"]["auroc"]["n_folds"] == 2
    best = reg.info("best")
    means = res.groupby("unit_id")["auroc"].mean()
    assert means[best["source"]["unit_id"]] == means.max()

    # predict the whole training store: the fold's test cells get exactly the benchmark's predictions
    manifest = json.loads((run_dir / "manifest.json").read_text())
    store = CellStore.open(manifest["data"][0]["path"])
    out = tmp_path / "p.parquet"
    stats = predict_store(reg.resolve("hvg@1"), store, out)
    got = pd.read_parquet(out)
    assert stats.n_cells == len(got) == store.n_cells and got["cell_id"].is_unique
    assert set(got["label"]) <= {"sensitive", "resistant"}
    bench = pd.read_parquet(run_dir / "units" / hvg_unit / "pooled-cell-fold1.predictions.parquet")
    merged = bench.merge(got, on="cell_id", suffixes=("_bench", ""))
    assert len(merged) == len(bench)
    np.testing.assert_allclose(merged["p_sensitive"], merged["p_sensitive_bench"], atol=1e-6)

    # .h5ad out: the source file with predictions in obs and embeddings in obsm
    import anndata as ad

    src = Path(store.meta["source"])
    out_h5ad = tmp_path / "p.h5ad"
    predict_store(reg.resolve("best"), store, out_h5ad, embeddings=True, source_h5ad=src)
    a = ad.read_h5ad(out_h5ad)
    b = ad.read_h5ad(src)
    assert a.shape == b.shape and list(a.obs_names) == list(b.obs_names)
    assert {"scdrugmap_p_sensitive", "scdrugmap_label"} <= set(a.obs.columns)
    assert a.obsm["X_scdrugmap"].shape[0] == a.n_obs and np.isfinite(a.obsm["X_scdrugmap"]).all()
    p = a.obs["scdrugmap_p_sensitive"].to_numpy()
    assert ((p >= 0.5) == (a.obs["scdrugmap_label"] == "sensitive").to_numpy()).all()


@pytest.mark.slow
def test_cli_errors_are_one_line(run: dict[str, Any], tmp_path: Path) -> None:
    run_dir, reg_dir = run["run_dir"], str(tmp_path / "reg")

    def one_line(proc: subprocess.CompletedProcess[str], needle: str) -> None:
        assert proc.returncode == 2, (proc.stdout, proc.stderr)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr

    one_line(cli("models", "register", str(run_dir), "--name", "../evil", "--best", "auroc", "--registry", reg_dir),
             "invalid model name")
    one_line(cli("models", "register", str(run_dir), "--name", "x", "--unit", "nope", "--registry", reg_dir),
             "no unit 'nope'")
    from scdrugmap_ray.jobs.register import register_from_run

    with pytest.raises(UserError, match="unknown metric"):
        register_from_run(run_dir, "x", best="f2", registry=reg_dir)
    with pytest.raises(UserError, match="no model 'nothing'"):
        Registry(reg_dir).resolve("nothing")
    one_line(cli("predict", str(tmp_path), "--model", "a/../../b", "--out", str(tmp_path / "o.parquet"),
                 "--registry", reg_dir), "invalid model name")
    assert not Path(reg_dir).exists() or not any(Path(reg_dir).iterdir())
