"""The explorer tabs of the web page (Datasets, Models, Results, Predict) in a real headless Chromium, on the
shared Serve app of tests/serving.py with a model registered from a real benchmark run.

Named so that it runs after test_web.py: it adds a model to the shared registry (and removes it at the end)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anndata as ad
import httpx
import pytest
from browser import headless_chromium
from serving import API_KEY, served

pytestmark = pytest.mark.slow

MODEL = "explorer-pca"


@pytest.fixture(scope="module")
def explored(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The shared app, plus a benchmark run on cells named by catalog ids and a model registered from it."""
    from scdrugmap_ray.engine.data.simulate import simulate_h5ad
    from scdrugmap_ray.jobs.register import register_from_run
    from scdrugmap_ray.jobs.runner import run_benchmark
    from scdrugmap_ray.jobs.spec import parse_spec

    app = served()
    root = tmp_path_factory.mktemp("explorer")
    h5ad = root / "cells.h5ad"
    simulate_h5ad(h5ad, n_cells=450, n_datasets=3, samples_per_dataset=4, effect=1.0, seed=5, n_genes=600,
                  progress=False)
    a = ad.read_h5ad(h5ad)
    a.obs["dataset"] = a.obs["dataset"].astype(str).map({"sim01": "Data12", "sim02": "Data28", "sim03": "Data9"})
    a.obs = a.obs.drop(columns=[c for c in ("cancer_type", "tissue", "therapy", "regimen") if c in a.obs])
    a.write_h5ad(h5ad)
    spec = parse_spec({
        "name": "explorer-run",
        "data": [{"name": "cat", "path": str(h5ad), "label_key": "response", "dataset_key": "dataset",
                  "sample_key": "sample", "catalog": True}],
        "models": [{"name": "pca-logreg"}, {"name": "hvg-mlp", "options": {"n_top_genes": 300}}],
        "evaluation": {"pooled": {"folds": 2, "split": "sample"}, "bootstrap": 50},
        "output": str(root / "run"),
        "cache": str(root / "cache"),
    })
    run_dir = run_benchmark(spec, progress=False)
    register_from_run(run_dir, MODEL, unit="cat.pca-logreg.logreg.frozen.pooled-sample.seed0",
                      registry=app["registry"])
    try:
        yield {**app, "run_dir": run_dir}
    finally:  # the shared registry goes back to what the other serve tests expect
        shutil.rmtree(Path(app["registry"]) / MODEL, ignore_errors=True)


def _api(app: dict[str, Any], path: str) -> Any:
    r = httpx.get(app["url"] + path, headers={"X-API-Key": API_KEY}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_explorer_api(explored: dict[str, Any]) -> None:
    url = explored["url"]
    assert httpx.get(url + "/v1/explorer/datasets", timeout=30).status_code == 401  # the server's key guards data
    js = httpx.get(url + "/v1/explorer/static/explorer.js", timeout=30)
    assert js.status_code == 200 and "TABS.push" in js.text  # the page's script needs no key
    assert httpx.get(url + "/v1/explorer/static/..%2Fapp.py", timeout=30).status_code == 404
    cat = _api(explored, "/v1/explorer/datasets")
    assert len(cat["datasets"]) == 60 and cat["total_cells"] == 326_751 + 168_486
    assert _api(explored, "/v1/explorer/datasets?cancer_type=prostate")["total_cells"] == 10_982
    bad = httpx.get(url + "/v1/explorer/datasets?tissue=brain", headers={"X-API-Key": API_KEY}, timeout=30)
    assert bad.status_code == 422 and "no catalog dataset matches" in bad.json()["detail"]
    runs = _api(explored, "/v1/explorer/runs")["runs"]
    assert [r["name"] for r in runs] == ["explorer-run"]
    missing = httpx.get(url + "/v1/explorer/runs/nope", headers={"X-API-Key": API_KEY}, timeout=30)
    assert missing.status_code == 404 and "no run 'nope'" in missing.json()["detail"]
    card = next(m for m in _api(explored, "/v1/explorer/models")["models"] if m["name"] == MODEL)
    assert card["base_model"] == "pca-logreg" and card["strategy"] == "frozen" and not card["random_weights"]
    auroc = card["scores"]["auroc"]
    assert auroc["ci_low"] <= auroc["value"] <= auroc["ci_high"]
    assert card["run_id"] == runs[0]["id"]
    board = _api(explored, f"/v1/explorer/runs/{runs[0]['id']}")["leaderboard"]
    unit = next(u for u in board if u["model"] == "pca-logreg")  # the card and the leaderboard agree
    assert (card["cv_metrics"]["auroc"]["mean"], card["cv_metrics"]["auroc"]["std"]) == \
        pytest.approx((unit["auroc_mean"], unit["auroc_std"]))


@pytest.fixture(scope="module")
def page(explored: dict[str, Any]) -> Iterator[Any]:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    with headless_chromium(1400, 1600, console=True) as driver:  # the console, for a failure's message
        driver.get(explored["url"] + "/#datasets")
        key = driver.find_element(By.ID, "api-key")
        key.send_keys(API_KEY)
        key.send_keys(Keys.TAB)  # the change event reloads every tab's data with the key
        try:
            WebDriverWait(driver, 120).until(
                lambda d: len(d.find_elements(By.CSS_SELECTOR, "#datasets-table tbody tr")) == 60)
        except TimeoutException:
            logs = [e["message"] for e in driver.get_log("browser")]
            pytest.fail(f"the catalog did not load: status {driver.find_element(By.ID, 'datasets-status').text!r}, "
                        f"console {logs}")
        yield driver


def _tab(b: Any, name: str) -> None:
    from selenium.webdriver.common.by import By

    b.find_element(By.ID, f"tab-btn-{name}").click()
    for other in ("datasets", "models", "results", "predict"):
        assert b.find_element(By.ID, f"tab-{other}").is_displayed() == (other == name)


def test_datasets_tab(explored: dict[str, Any], page: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    b = page
    _tab(b, "datasets")
    rows = b.find_elements(By.CSS_SELECTOR, "#datasets-table tbody tr")
    api = _api(explored, "/v1/explorer/datasets")
    assert [r.get_attribute("data-id") for r in rows] == [d["id"] for d in api["datasets"]]
    Select(b.find_element(By.ID, "ds-cancer-type")).select_by_visible_text("Prostate cancer")
    WebDriverWait(b, 10).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#datasets-table tbody tr")) == 2)
    ids = [r.get_attribute("data-id") for r in b.find_elements(By.CSS_SELECTOR, "#datasets-table tbody tr")]
    assert ids == [d["id"] for d in api["datasets"] if d["cancer_type"] == "Prostate cancer"] == ["Data12", "Data32"]
    b.find_element(By.CSS_SELECTOR, "#datasets-table tbody tr[data-id='Data12']").click()
    WebDriverWait(b, 30).until(lambda d: d.find_element(By.ID, "dataset-detail").is_displayed())
    assert "GSE140440" in b.find_element(By.ID, "dataset-detail-title").text
    assert b.find_element(By.CSS_SELECTOR, "#dataset-detail-fields dd[data-field='regimen']").text == "docetaxel"
    assert b.find_element(By.CSS_SELECTOR, "#dataset-detail-fields dd[data-field='cells']").text == "284"
    # cells per subgroup: one bar group per cancer-type subgroup of the catalog, with its published cells
    bars = b.find_elements(By.CSS_SELECTOR, "#subgroups-svg g.subgroup")
    published = [g for g in api["subgroups"] if g["kind"] == "cancer_type"]
    assert [(g.get_attribute("data-value"), int(g.get_attribute("data-cells"))) for g in bars] == \
        [(g["value"], g["cells"]) for g in published]
    Select(b.find_element(By.ID, "ds-cancer-type")).select_by_index(0)
    b.save_screenshot(str(Path(explored["run_dir"]) / "explorer-datasets.png"))


def test_models_tab(explored: dict[str, Any], page: Any) -> None:
    from selenium.webdriver.common.by import By

    b = page
    _tab(b, "models")
    cards = {c.get_attribute("data-ref"): c for c in b.find_elements(By.CSS_SELECTOR, "#model-cards article.card")}
    api = {m["ref"]: m for m in _api(explored, "/v1/explorer/models")["models"]}
    assert set(cards) == set(api) and f"{MODEL}@1" in cards
    card, m = cards[f"{MODEL}@1"], api[f"{MODEL}@1"]
    assert card.find_element(By.CSS_SELECTOR, "dd[data-field='base model']").text == "pca-logreg"
    assert card.find_element(By.CSS_SELECTOR, "dd[data-field='strategy']").text == "frozen"
    assert card.find_element(By.CSS_SELECTOR, "dd[data-field='trained on']").text.startswith("cat")
    auroc = card.find_element(By.CSS_SELECTOR, "tr[data-metric='auroc']")
    s, cv = m["scores"]["auroc"], m["cv_metrics"]["auroc"]
    assert auroc.find_element(By.CSS_SELECTOR, "td.value").text == f"{s['value']:.3f}"
    assert auroc.find_element(By.CSS_SELECTOR, "td.ci").text == f"{s['ci_low']:.3f}–{s['ci_high']:.3f}"
    assert auroc.find_element(By.CSS_SELECTOR, "td.cv").text == f"{cv['mean']:.3f} ± {cv['std']:.3f} (2 folds)"
    assert not card.find_elements(By.CSS_SELECTOR, ".random-weights")
    b.save_screenshot(str(Path(explored["run_dir"]) / "explorer-models.png"))


def test_results_tab(explored: dict[str, Any], page: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    b = page
    _tab(b, "results")
    run_id = _api(explored, "/v1/explorer/runs")["runs"][0]["id"]
    WebDriverWait(b, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#leaderboard tbody tr")) == 2)
    run = _api(explored, f"/v1/explorer/runs/{run_id}")
    rows = b.find_elements(By.CSS_SELECTOR, "#leaderboard tbody tr")
    assert [r.get_attribute("data-unit") for r in rows] == [u["unit_id"] for u in run["leaderboard"]]
    top = run["leaderboard"][0]
    assert rows[0].find_element(By.CSS_SELECTOR, "td.auroc").text == f"{top['auroc_mean']:.3f} ± {top['auroc_std']:.3f}"
    # the breakdowns show the catalog's annotation of the run's cells
    Select(b.find_element(By.ID, "breakdown-key")).select_by_value("cancer_type")
    rows = b.find_elements(By.CSS_SELECTOR, "#breakdown tbody tr")
    groups = {r.find_elements(By.TAG_NAME, "td")[0].text for r in rows}
    assert groups == {"Prostate cancer", "Breast cancer", "Lung cancer"}
    assert groups == {r["group_value"] for r in run["breakdowns"]["cancer_type"]}
    Select(b.find_element(By.ID, "breakdown-key")).select_by_value("regimen")
    cells = [r.find_elements(By.TAG_NAME, "td") for r in b.find_elements(By.CSS_SELECTOR, "#breakdown tbody tr")]
    want = run["breakdowns"]["regimen"]
    assert [(c[0].text, c[1].text, c[4].text) for c in cells] == [(r["group_value"], r["model"], f"{r['f1']:.3f}")
                                                                  for r in want]
    b.save_screenshot(str(Path(explored["run_dir"]) / "explorer-results.png"))


def test_predict_tab_and_model_link(explored: dict[str, Any], page: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    b = page
    _tab(b, "predict")
    options = [o.get_attribute("value") for o in Select(b.find_element(By.ID, "model")).options]
    assert f"{MODEL}@1" in options and "pca-sim@1" in options
    _tab(b, "models")
    b.find_element(By.CSS_SELECTOR, f"article.card[data-ref='{MODEL}@1'] button.open-run").click()
    WebDriverWait(b, 30).until(lambda d: d.find_element(By.ID, "tab-results").is_displayed())
    assert b.current_url.endswith("#results")
