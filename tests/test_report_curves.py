"""Report curves (issue 18): one ROC and one precision-recall curve per condition, from the predictions of
exactly that condition's folds (cross_data k=0 and k=20 folds live in one unit and were pooled before);
binned curves match sklearn's exact AUROC and average precision."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scdrugmap_ray.jobs import report
from scdrugmap_ray.jobs.report import annotate, build_report, curve_counts
from sklearn.metrics import average_precision_score, roc_auc_score


def few_shot_run(root: Path) -> tuple[Path, dict[int, pd.DataFrame]]:
    """One cross_data unit holding out dsB: fold 0 zero-shot (barely better than chance), fold 1 k=20 (good)."""
    rng = np.random.default_rng(1)
    run = root / "run"
    (run / "predictions").mkdir(parents=True)
    unit = "sim__pca-logreg__frozen__cross_data__s0"
    rows, preds = [], {}
    for fold, (k, quality) in enumerate([(0, 0.55), (20, 0.9)]):
        y = rng.integers(0, 2, 400).astype("int8")
        p = np.clip(0.5 + (y - 0.5) * (quality - 0.5) * 2 + rng.normal(0, 0.2, 400), 0, 1).astype("float32")
        preds[fold] = pd.DataFrame({"cell_id": [f"c{fold}_{i}" for i in range(400)], "fold": fold, "y_true": y,
                                    "p_sensitive": p, "dataset": "dsB"})
        row = {"unit_id": unit, "model": "pca-logreg", "head": "logreg", "strategy": "frozen",
               "scheme": "cross_data", "split": None, "fold": fold, "fold_name": f"cross_data/holdout=dsB/k={k}",
               "seed": 0, "test_dataset": "dsB", "few_shot_k": k, "n_test": 400, "data": "sim"}
        for m in ("f1", "macro_f1", "accuracy", "precision", "recall", "auprc"):
            row[m] = 0.5
        row["auroc"] = roc_auc_score(y, p)
        row["auroc_ci_low"], row["auroc_ci_high"] = row["auroc"] - 0.04, row["auroc"] + 0.04
        rows.append(row)
    pd.concat(preds.values()).to_parquet(run / "predictions" / f"{unit}.parquet", index=False)
    pd.DataFrame(rows).to_parquet(run / "results.parquet", index=False)
    return run, preds


def test_few_shot_folds_are_not_pooled(tmp_path: Path) -> None:
    run, preds = few_shot_run(tmp_path)
    results = annotate(pd.read_parquet(run / "results.parquet"))
    counts = curve_counts(results, run / "predictions")
    assert sorted(counts) == [("cross_data", "pca-logreg"), ("cross_data k=20", "pca-logreg")]
    for cond, fold in (("cross_data", 0), ("cross_data k=20", 1)):
        pos, neg = counts[(cond, "pca-logreg")]
        truth = preds[fold]
        assert pos.sum() == (truth.y_true == 1).sum() and neg.sum() == (truth.y_true == 0).sum()
        roc = report._roc(pos, neg)
        pr = report._pr(pos, neg)
        assert roc is not None and pr is not None
        assert abs(roc[2] - roc_auc_score(truth.y_true, truth.p_sensitive)) < 2e-3
        assert abs(pr[2] - average_precision_score(truth.y_true, truth.p_sensitive)) < 1e-2
        assert abs(pr[3] - truth.y_true.mean()) < 1e-12  # the chance line: the share of sensitive cells
    aucs = {c: report._roc(*counts[(c, "pca-logreg")])[2] for c in ("cross_data", "cross_data k=20")}  # type: ignore[index]
    assert aucs["cross_data k=20"] - aucs["cross_data"] > 0.2  # the two conditions really differ

    page = build_report(run).read_text(encoding="utf-8")
    assert "<h3>ROC</h3>" in page and "<h3>Precision-recall</h3>" in page
    assert page.count('src="data:image/png;base64,') == page.count('<p class="caption">')
    assert "AUROC, cross_data k=20: model x held-out dataset" in page  # per-dataset AUROC heatmap (alt text)


@pytest.mark.slow
def test_embedding_map_of_real_cells(shared_dir: Path, ray_session: None, tmp_path: Path) -> None:
    """A run on real cells with scFoundation's published embeddings (obsm of SCAD JHU006) draws their map,
    coloured by response and dataset, from the run's embedding cache."""
    import scdrugmap_ray as sdr

    res = sdr.run({
        "name": "map", "data": [{"path": str(shared_dir / "data/scad_target_JHU006_Kinker2020_GSE157220.h5ad"),
                                 "name": "jhu006", "label_key": "response_Afatinib"}],
        "models": [{"name": "obsm:X_scFoundation_50M_tgthighres4", "head": "logreg"}],
        "strategies": ["frozen"], "evaluation": {"pooled": {"folds": 2, "split": "cell"}, "bootstrap": 20},
        "output": str(tmp_path / "run"), "cache": str(tmp_path / "cache"),
    }, progress=False)
    page = res.report.read_text(encoding="utf-8")
    assert 'alt="embedding map: obsm:X_scFoundation_50M_tgthighres4 on jhu006"' in page
    assert "120 of 120 cells in the PCA" in page or "120 of 120 cells in the UMAP" in page
    assert 'alt="auroc per fold with bootstrap confidence intervals"' in page  # bootstrap: 20 -> CI plot
    assert page.count('src="data:image/png;base64,') == page.count('<p class="caption">')


@pytest.mark.slow
def test_report_in_chromium(tmp_path: Path) -> None:
    """The report as a reader sees it: every plot decodes in a real headless Chromium, each with its caption;
    a full-page screenshot is kept (copied to $SCDRUGMAP_SCREENSHOT_DIR when set)."""
    import os
    import shutil

    from test_report import make_run

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not (os.path.exists(chromium) and os.path.exists(driver_path)):
        pytest.fail("Debian chromium and chromium-driver are needed: apt-get install -y chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    page = build_report(make_run(tmp_path))
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1200"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        driver.get(page.as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete && i.naturalWidth > 0, "
            "i.nextElementSibling && i.nextElementSibling.className]);")
        assert len(images) == 10
        assert all(ok for _, ok, _ in images), [alt for alt, ok, _ in images if not ok]
        assert all(cls == "caption" for _, _, cls in images), images
        height = int(driver.execute_script("return document.body.scrollHeight"))
        driver.set_window_size(1280, min(height + 100, 16000))
        shot = tmp_path / "report.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 50_000
    finally:
        driver.quit()
    out = os.environ.get("SCDRUGMAP_SCREENSHOT_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(out) / shot.name)
