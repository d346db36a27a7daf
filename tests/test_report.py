"""report.html from a run directory built by hand to the results contract (docs: notes/common.md)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scdrugmap_ray.engine.errors import UserError
from scdrugmap_ray.jobs.report import _roc, _roc_counts, build_report
from sklearn.metrics import roc_auc_score

METRICS = ["f1", "macro_f1", "accuracy", "precision", "recall", "auroc", "auprc"]
EVIL = "<script>alert(1)</script>"
DATASETS = ["dsA", "dsB", EVIL]
MODELS = ["pca-logreg", "rand-fm"]
IMG = '<img alt="'


def _result_row(rng: np.random.Generator, unit_id: str, model: str, scheme: str, split: str | None, fold: int,
                test_dataset: str | None, quality: float) -> dict:
    row: dict = {
        "unit_id": unit_id, "model": model, "head": "mlp", "strategy": "frozen", "scheme": scheme, "split": split,
        "fold": fold, "fold_name": test_dataset or f"fold{fold}", "seed": 0, "test_dataset": test_dataset,
        "few_shot_k": 0, "n_train": 800, "n_val": 100, "n_test": 200, "n_test_sensitive": 90,
    }
    for m in METRICS:
        v = float(np.clip(quality + rng.normal(0, 0.03), 0, 1))
        row[m], row[f"{m}_ci_low"], row[f"{m}_ci_high"] = v, v - 0.05, min(1.0, v + 0.05)
    row.update(fit_seconds=1.5 + fold, predict_seconds=0.25, random_weights=model == "rand-fm", data="sim")
    return row


def _predictions(rng: np.random.Generator, n: int, fold: int, quality: float, dataset: str) -> pd.DataFrame:
    y = rng.integers(0, 2, n).astype("int8")
    p = np.clip(0.5 + (y - 0.5) * (quality - 0.5) * 2 + rng.normal(0, 0.25, n), 0, 1).astype("float32")
    return pd.DataFrame({
        "cell_id": [f"c{fold}_{i}" for i in range(n)], "fold": fold, "y_true": y, "p_sensitive": p,
        "y_pred": (p >= 0.5).astype("int8"), "dataset": dataset, "sample": f"s{fold}", "cancer_type": "melanoma",
        "tissue": "skin", "therapy": "targeted", "regimen": "BRAFi",
    })


def make_run(root: Path, *, cross_data: bool = True, breakdowns: bool = True, manifest: bool = True) -> Path:
    """2 models x (pooled split=sample, pooled split=cell, cross_data) x 3 folds; rand-fm on random weights."""
    rng = np.random.default_rng(0)
    run = root / "run"
    (run / "predictions").mkdir(parents=True)
    rows, bd_rows = [], []
    conditions = [("pooled", "sample", 0.72), ("pooled", "cell", 0.95)] + ([("cross_data", "sample", 0.6)]
                                                                           if cross_data else [])
    for model in MODELS:
        for scheme, split, quality in conditions:
            q = quality if model == "pca-logreg" else 0.5
            unit_id = f"sim__{model}__frozen__{scheme}-{split}__s0"
            preds = []
            for fold in range(3):
                test_ds = DATASETS[fold] if scheme == "cross_data" else None
                row = _result_row(rng, unit_id, model, scheme, split if scheme == "pooled" else None, fold, test_ds, q)
                rows.append(row)
                preds.append(_predictions(rng, 300, fold, q, test_ds or DATASETS[fold]))
                for key, value in [("dataset", test_ds or DATASETS[fold]), ("cancer_type", "melanoma"),
                                   ("tissue", "skin"), ("therapy", "targeted"), ("regimen", "BRAFi")]:
                    bd = {k: row[k] for k in ("unit_id", "model", "head", "strategy", "scheme", "fold", "seed",
                                              "test_dataset", "few_shot_k")}
                    bd.update(group_key=key, group_value=value, n=300, n_sensitive=140,
                              **{m: row[m] for m in METRICS})
                    bd_rows.append(bd)
            pd.concat(preds).to_parquet(run / "predictions" / f"{unit_id}.parquet", index=False)
    results = pd.DataFrame(rows)
    # A one-class test fold: AUROC/AUPRC undefined.
    one_class = (results.model == "pca-logreg") & (results.split == "sample") & (results.fold == 2)
    results.loc[one_class, ["auroc", "auroc_ci_low", "auroc_ci_high"]] = np.nan
    results.to_parquet(run / "results.parquet", index=False)
    bd = pd.DataFrame(bd_rows)
    (bd if breakdowns else bd.iloc[0:0]).to_parquet(run / "breakdowns.parquet", index=False)
    if manifest:
        (run / "manifest.json").write_text(json.dumps({
            "name": "handmade", "spec": {"name": "handmade"},
            "versions": {"package": "0.1.0", "python": "3.11", "ray": "2.60.0", "torch": "2.13.0"},
            "data": [{"name": "sim", "path": "/data/sim.h5ad", "content_hash": "abc123", "n_cells": 3000}],
            "models": [{"name": "pca-logreg", "identity": {"n_components": 50}, "random_weights": False},
                       {"name": "rand-fm", "identity": {"ckpt": "random"}, "random_weights": True}],
            "started": "2025-01-01T10:00:00+00:00", "finished": "2025-01-01T10:05:00+00:00",
            "units": [{"unit_id": u, "status": "finished"} for u in results.unit_id.unique()],
        }))
    return run


def _mean_sd(values: pd.Series) -> str:
    v = values.dropna()
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}"


def test_full_report(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    out = build_report(run)
    assert out == run / "report.html"
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "handmade" in page and "2025-01-01T10:05:00" in page
    # Loud banner naming the random-weight model.
    assert re.search(r'class="banner">RANDOM WEIGHTS: rand-fm', page)
    # Summary numbers: mean ± sd over the 3 folds.
    res = pd.read_parquet(run / "results.parquet")
    for split in ("sample", "cell"):
        sel = res[(res.model == "pca-logreg") & (res.split == split)]
        assert _mean_sd(sel["f1"]) in page
        assert _mean_sd(sel["auprc"]) in page
    # The one-class fold: AUROC over the 2 defined folds, marked as such; its own row shows n/a.
    sel = res[(res.model == "pca-logreg") & (res.split == "sample")]
    assert f"{_mean_sd(sel['auroc'])} (2/3)" in page
    assert "<td>n/a</td>" in page
    # Plots: scheme comparison, CI per fold, F1 and AUROC heatmaps (cross-data, 2 pooled from breakdowns each),
    # ROC and precision-recall curves; every plot with its one-line caption.
    assert page.count('src="data:image/png;base64,') == 10
    assert page.count('<p class="caption">') == 10
    assert "Leakage check" in page
    # User data is escaped everywhere; nothing external, no scripts.
    assert EVIL not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script" not in page and "http://" not in page and "https://" not in page
    # Breakdowns, per-fold details, manifest and timing.
    assert "By cancer_type" in page and "melanoma" in page and "BRAFi" in page
    assert "<details><summary>Every fold (18 rows" in page
    assert "abc123" in page and "2.13.0" in page and "fit s (total)" in page
    assert f"{res[res.model == 'pca-logreg'].fit_seconds.sum():.2f}" in page
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # atomic write left no temp file


def test_report_without_cross_data_breakdowns_or_manifest(tmp_path: Path) -> None:
    run = make_run(tmp_path, cross_data=False, breakdowns=False, manifest=False)
    page = build_report(run).read_text(encoding="utf-8")
    assert "No breakdowns recorded" in page
    assert "No per-dataset results" in page
    assert "manifest.json not found" in page
    # Random weights are also read from results.random_weights when there is no manifest.
    assert 'class="banner">RANDOM WEIGHTS: rand-fm' in page
    assert page.count('src="data:image/png;base64,') == 4  # scheme comparison, CIs, ROC and PR


def test_report_all_metrics_nan_and_no_predictions(tmp_path: Path) -> None:
    run = make_run(tmp_path, cross_data=False)
    res = pd.read_parquet(run / "results.parquet")
    res[[c for c in res.columns if c.startswith(("auroc", "auprc"))]] = np.nan
    res["random_weights"] = False
    res.to_parquet(run / "results.parquet", index=False)
    for p in (run / "predictions").iterdir():
        p.unlink()
    (run / "manifest.json").unlink()
    page = build_report(run).read_text(encoding="utf-8")
    assert "RANDOM WEIGHTS" not in page
    assert "No predictions with both classes" in page
    assert "n/a" in page


def test_report_needs_results(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"no results\.parquet"):
        build_report(tmp_path)


def test_binned_roc_matches_exact_auc(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 50_000).astype("int8")
    p = np.clip(rng.normal(0.4 + 0.2 * y, 0.2), 0, 1).astype("float32")
    y_with_unknown = y.astype("float64")
    y_with_unknown[:10] = np.nan  # unlabelled cells are left out
    for i in range(2):
        pd.DataFrame({"y_true": y_with_unknown[i::2], "p_sensitive": p[i::2]}).to_parquet(tmp_path / f"{i}.parquet")
    curve = _roc(*_roc_counts([tmp_path / "0.parquet", tmp_path / "1.parquet"]))
    assert curve is not None
    fpr, tpr, auc = curve
    assert auc == pytest.approx(roc_auc_score(y[10:], p[10:]), abs=1e-3)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert _roc(np.zeros(10, int), np.ones(10, int)) is None  # one class: no curve


def test_two_data_entries_are_kept_apart(tmp_path: Path) -> None:
    run = make_run(tmp_path, cross_data=False)
    res = pd.read_parquet(run / "results.parquet")
    other = res.assign(data="simB", unit_id=res.unit_id + "-b", f1=0.111)
    pd.concat([res, other]).to_parquet(run / "results.parquet", index=False)
    page = build_report(run).read_text(encoding="utf-8")
    assert "<th>data</th>" in page  # the summary groups by data too
    assert "simB · pca-logreg" in page and "sim · pca-logreg" in page
    assert "0.111" in page  # simB's F1 is not averaged into sim's
