"""End-to-end benchmark runs on a real local Ray: planted signal, null signal, resume, obsm models."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from scdrugmap_ray.engine.data.simulate import simulate_h5ad
from scdrugmap_ray.engine.errors import UserError
from scdrugmap_ray.jobs.runner import run_benchmark
from scdrugmap_ray.jobs.spec import parse_spec

pytestmark = pytest.mark.slow

RESULT_COLUMNS = [
    "model", "strategy", "scheme", "fold", "seed", "test_dataset", "n_train", "n_test",
    "f1", "macro_f1", "accuracy", "precision", "recall", "auroc", "auprc",
]


@pytest.fixture(scope="module")
def sim_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sim")
    out = {}
    for name, effect in (("signal", 1.0), ("null", 0.0)):
        out[name] = root / f"{name}.h5ad"
        simulate_h5ad(out[name], n_cells=1500, n_datasets=3, samples_per_dataset=4, effect=effect,
                      seed=1, n_genes=2000, progress=False)
    return out


def _spec(path: Path, out: Path, cache: Path, **evaluation: object) -> dict:
    return {
        "name": "t",
        "data": [{"path": str(path), "label_key": "response", "dataset_key": "dataset", "sample_key": "sample"}],
        "models": [{"name": "pca-logreg"}, {"name": "hvg-mlp", "options": {"n_top_genes": 500}}],
        "evaluation": evaluation or {"pooled": {"folds": 3, "split": ["sample", "cell"]},
                                     "cross_data": {"holdout": "each", "few_shot": [10]},
                                     "bootstrap": 200},
        "output": str(out),
        "cache": str(cache),
    }


def test_planted_signal_recovered_and_resume(sim_files: dict[str, Path], tmp_path: Path, ray_session: None) -> None:
    spec = parse_spec(_spec(sim_files["signal"], tmp_path / "run", tmp_path / "cache"))
    run_dir = run_benchmark(spec, progress=False)
    res = pd.read_parquet(run_dir / "results.parquet")
    assert set(RESULT_COLUMNS) <= set(res.columns)
    # 2 models x (3 sample folds + 3 cell folds + 3 held-out datasets x (0-shot, 10-shot))
    assert len(res) == 2 * (3 + 3 + 6)
    assert set(res["scheme"]) == {"pooled", "cross_data"}
    cd = res[res.scheme == "cross_data"]
    assert cd["test_dataset"].notna().all() and set(cd["few_shot_k"]) == {0, 10}
    assert res.loc[res.scheme == "pooled", "test_dataset"].isna().all()
    assert (res["auroc_ci_low"] <= res["auroc"]).all() and (res["auroc"] <= res["auroc_ci_high"]).all()
    # The planted resistance program is found even when whole samples are held out...
    pca = res[res.model == "pca-logreg"]
    by_split = pca[pca.scheme == "pooled"].groupby("split")["auroc"].mean()
    assert by_split["sample"] > 0.75, pca[["fold_name", "auroc"]]
    # ...and the paper's cell-level split, which leaks sample identity, scores higher still.
    assert by_split["cell"] > by_split["sample"]

    # every labelled cell is predicted exactly once per pooled scheme
    preds = pd.read_parquet(next((run_dir / "predictions").glob("*pca-logreg*pooled-sample*.parquet")))
    assert preds["cell_id"].is_unique and len(preds) == 1500
    assert {"cell_id", "fold", "y_true", "p_sensitive", "y_pred", "dataset", "sample"} <= set(preds.columns)
    bd = pd.read_parquet(run_dir / "breakdowns.parquet")
    assert {"group_key", "group_value", "n", "f1", "auroc"} <= set(bd.columns)
    assert {"dataset", "cancer_type", "tissue", "therapy", "regimen"} <= set(bd["group_key"])
    assert (run_dir / "manifest.json").exists() and (run_dir / "report.html").stat().st_size > 10_000

    # a second run without --resume refuses; with --resume it recomputes only what is missing
    with pytest.raises(UserError, match="--resume"):
        run_benchmark(spec, progress=False)
    fold_files = sorted((run_dir / "units").rglob("*.result.parquet"))
    stamps = {p: p.stat().st_mtime_ns for p in fold_files}
    fold_files[0].unlink()
    run_benchmark(spec, resume=True, progress=False)
    again = pd.read_parquet(run_dir / "results.parquet")
    assert len(again) == len(res)
    changed = [p for p in fold_files if p.stat().st_mtime_ns != stamps[p]]
    assert changed == [fold_files[0]]
    key = ["unit_id", "fold_name"]
    merged = res.merge(again, on=key, suffixes=("", "_again"))
    assert (merged["auroc"] - merged["auroc_again"]).abs().max() < 1e-6  # deterministic


def test_null_simulation_near_chance(sim_files: dict[str, Path], tmp_path: Path, ray_session: None) -> None:
    spec = parse_spec(_spec(sim_files["null"], tmp_path / "run", tmp_path / "cache",
                            pooled={"folds": 3, "split": "sample"}, bootstrap=0))
    res = pd.read_parquet(run_benchmark(spec, progress=False) / "results.parquet")
    assert abs(res["auroc"].mean() - 0.5) < 0.15, res[["model", "fold", "auroc"]]


def test_obsm_embeddings_as_a_model(shared_dir: Path, tmp_path: Path, ray_session: None) -> None:
    """scFoundation's published embeddings of real cells, benchmarked as a model of their own."""
    spec = parse_spec({
        "name": "obsm",
        "data": [{"path": str(shared_dir / "data" / "scad_target_JHU006_Kinker2020_GSE157220.h5ad"),
                  "label_key": "response_Afatinib", "dataset": "JHU006"}],
        "models": [{"name": "obsm:X_scFoundation_50M_tgthighres4", "head": "logreg"}, {"name": "pca-logreg"}],
        "evaluation": {"pooled": {"folds": 3, "split": "cell"}, "bootstrap": 100},
        "output": str(tmp_path / "run"),
        "cache": str(tmp_path / "cache"),
    })
    run_dir = run_benchmark(spec, progress=False)
    res = pd.read_parquet(run_dir / "results.parquet")
    assert set(res["model"]) == {"obsm:X_scFoundation_50M_tgthighres4", "pca-logreg"}
    assert res["auroc"].min() > 0.8  # SCAD's tasks are easily separable (see ../shared/data/README.md)
    assert list((tmp_path / "cache" / "embeddings").glob("*/_embedding.json")), "embedding cached once"


def test_split_needing_two_classes_is_refused(shared_dir: Path, tmp_path: Path, ray_session: None) -> None:
    spec = parse_spec({
        "name": "oneclass",
        "data": [{"path": str(shared_dir / "data" / "gse149383_PC9_erlotinib_day11_rawcounts.h5ad"),
                  "label_key": "scdeal_label", "dataset": "PC9"}],
        "models": [{"name": "pca-logreg"}],
        "evaluation": {"pooled": {"folds": 3, "split": "cell"}},
        "output": str(tmp_path / "run"),
        "cache": str(tmp_path / "cache"),
    })
    with pytest.raises(UserError, match="one class"):
        run_benchmark(spec, progress=False)
    assert not (tmp_path / "run").exists()
