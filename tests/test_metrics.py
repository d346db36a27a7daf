"""Metrics against sklearn, by hand, in degenerate cases; bootstrap intervals; breakdowns."""

from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import pytest
from scdrugmap_ray.engine.eval.metrics import METRICS, bootstrap_ci, breakdown, compute_metrics
from sklearn import metrics as skm


def sklearn_metrics(y: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    pred = (p >= threshold).astype(int)
    return {
        "f1": skm.f1_score(y, pred, zero_division=0),
        "macro_f1": skm.f1_score(y, pred, average="macro", zero_division=0),
        "accuracy": skm.accuracy_score(y, pred),
        "precision": skm.precision_score(y, pred, zero_division=0),
        "recall": skm.recall_score(y, pred, zero_division=0),
        "auroc": skm.roc_auc_score(y, p),
        "auprc": skm.average_precision_score(y, p),
    }


@pytest.mark.parametrize("n", [7, 50, 2000])
@pytest.mark.parametrize("rounding", [None, 1])  # rounding makes many tied scores
def test_matches_sklearn_on_random_data(n: int, rounding: int | None) -> None:
    rng = np.random.default_rng(n)
    for trial in range(5):
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        p = np.clip(0.3 * y + rng.random(n) * 0.8, 0, 1).astype(np.float32)
        if rounding is not None:
            p = np.round(p, rounding)
        thr = 0.5 if trial < 3 else 0.3
        got, ref = compute_metrics(y, p, threshold=thr), sklearn_metrics(y, p, thr)
        assert tuple(got) == METRICS
        for m in METRICS:
            assert got[m] == pytest.approx(ref[m], abs=1e-9), m


def test_hand_checked_tiny_case() -> None:
    # truth 1 1 0 0, scores .9 .4 .6 .1 -> predictions 1 0 1 0: tp=1 fn=1 fp=1 tn=1
    m = compute_metrics(np.array([1, 1, 0, 0]), np.array([0.9, 0.4, 0.6, 0.1]))
    assert m["accuracy"] == 0.5 and m["precision"] == 0.5 and m["recall"] == 0.5 and m["f1"] == 0.5
    assert m["macro_f1"] == 0.5
    # positive pairs ranked above negative: (.9>.6, .9>.1, .4<.6, .4>.1) = 3/4
    assert m["auroc"] == 0.75
    # ranked .9(+) .6(-) .4(+) .1(-): AP = 1/2 * 1 + 1/2 * 2/3
    assert m["auprc"] == pytest.approx(0.5 + 1 / 3)
    # a tie between a positive and a negative counts one half
    assert compute_metrics(np.array([1, 0]), np.array([0.5, 0.5]))["auroc"] == 0.5
    # perfect separation
    assert compute_metrics(np.array([0, 0, 1]), np.array([0.1, 0.2, 0.7])) == {m: 1.0 for m in METRICS}


def test_one_class_and_empty() -> None:
    m = compute_metrics(np.ones(10), np.linspace(0, 1, 10))
    assert math.isnan(m["auroc"]) and math.isnan(m["auprc"]) and math.isnan(m["macro_f1"])
    assert m["accuracy"] == 0.5 and m["precision"] == 1.0 and m["recall"] == 0.5
    m0 = compute_metrics(np.zeros(4), np.array([0.1, 0.2, 0.3, 0.9]))
    assert m0["accuracy"] == 0.75 and m0["precision"] == 0.0 and m0["recall"] == 0.0 and m0["f1"] == 0.0
    assert math.isnan(m0["auroc"])
    assert all(math.isnan(v) for v in compute_metrics(np.array([]), np.array([])).values())


def test_bootstrap_contains_point_estimate_and_narrows_with_n() -> None:
    rng = np.random.default_rng(0)
    widths = []
    for n in (300, 3000):
        y = rng.integers(0, 2, n)
        p = np.clip(0.25 * y + rng.random(n) * 0.75, 0, 1)
        point = compute_metrics(y, p)
        ci = bootstrap_ci(y, p, n_boot=500, seed=1)
        assert set(ci) == set(METRICS)
        for m in METRICS:
            lo, hi = ci[m]
            assert lo <= point[m] <= hi, m
        widths.append({m: ci[m][1] - ci[m][0] for m in METRICS})
    for m in METRICS:
        assert widths[1][m] < widths[0][m] * 0.6, m  # ~1/sqrt(10) in theory
    # deterministic given the seed
    assert bootstrap_ci(y, p, n_boot=100, seed=3) == bootstrap_ci(y, p, n_boot=100, seed=3)


def test_bootstrap_matches_naive_resampling() -> None:
    """The weight trick gives the same interval as indexing resamples and calling sklearn."""
    rng = np.random.default_rng(5)
    n, n_boot = 200, 200
    y = rng.integers(0, 2, n)
    p = np.round(np.clip(0.3 * y + rng.random(n) * 0.7, 0, 1), 2)
    ci = bootstrap_ci(y, p, n_boot=n_boot, seed=11)
    # replay the same draws
    draws = np.random.default_rng(11)
    aucs = []
    for start in range(0, n_boot, 64):
        idx = draws.integers(0, n, size=(min(64, n_boot - start), n))
        aucs.extend(skm.roc_auc_score(y[i], p[i]) for i in idx)
    assert ci["auroc"] == pytest.approx(tuple(np.percentile(aucs, [2.5, 97.5])), abs=1e-9)


def test_bootstrap_one_class_is_nan_and_fast_enough() -> None:
    ci = bootstrap_ci(np.ones(50), np.linspace(0, 1, 50), n_boot=50)
    assert all(math.isnan(v) for v in ci["auroc"]) and not math.isnan(ci["accuracy"][0])
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 2, 10_000), rng.random(10_000).astype(np.float32)
    t0 = time.perf_counter()
    bootstrap_ci(y, p, n_boot=1000)
    assert time.perf_counter() - t0 < 5.0  # ~0.4 s measured on 2 cores


def test_breakdown() -> None:
    df = pd.DataFrame({
        "y_true": [1, 0, 1, 0, 1, 1],
        "p_sensitive": [0.9, 0.2, 0.3, 0.6, 0.8, 0.7],
        "dataset": ["A", "A", "A", "B", "B", "B"],
        "tissue": ["blood", None, "blood", "bone", None, "bone"],
    })
    bd = breakdown(df, by=("dataset", "cancer_type", "tissue"))
    assert list(bd.columns) == ["group_key", "group_value", "n", "n_sensitive", *METRICS]
    assert list(zip(bd["group_key"], bd["group_value"], strict=True)) == [
        ("dataset", "A"), ("dataset", "B"), ("tissue", "blood"), ("tissue", "bone")]
    a = bd.iloc[0]
    assert a["n"] == 3 and a["n_sensitive"] == 2
    assert a["auroc"] == compute_metrics(np.array([1, 0, 1]), np.array([0.9, 0.2, 0.3]))["auroc"] == 1.0
    blood = bd[bd["group_value"] == "blood"].iloc[0]
    assert blood["n"] == 2 and math.isnan(blood["auroc"]) and blood["recall"] == 0.5
    assert breakdown(df.iloc[:0], by=("dataset",)).empty
