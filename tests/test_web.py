"""The web page end to end in a real headless Chromium (Debian's chromium + chromedriver via Selenium):
enter the API key, upload an .h5ad, wait for the result, check the numbers against the API, screenshot."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from browser import headless_chromium
from serving import API_KEY, served

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with headless_chromium(1280, 1600) as driver:
        yield driver


def test_upload_predict_and_see_the_result(ray_session: None, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    app = served()
    b = browser
    b.get(app["url"] + "/")
    wait = WebDriverWait(b, 120)
    # without the key the page says why the model list is empty
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "401"), message=b.page_source[:3000])
    key = b.find_element(By.ID, "api-key")
    key.send_keys(API_KEY)
    key.send_keys(Keys.TAB)  # change event: the page lists the models with the key
    wait.until(lambda d: len(Select(d.find_element(By.ID, "model")).options) == 1)
    assert Select(b.find_element(By.ID, "model")).first_selected_option.get_attribute("value") == "pca-sim@1"
    # the key lives for this tab only (sessionStorage), never in localStorage
    assert b.execute_script("return sessionStorage.getItem('scdrugmap-api-key')") == API_KEY
    assert b.execute_script("return localStorage.length") == 0

    b.find_element(By.ID, "file").send_keys(str(app["h5ad"]))
    b.find_element(By.ID, "submit").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "done"))

    # the same request through the API: the page must show the same numbers
    with open(app["h5ad"], "rb") as fh:
        api = httpx.post(app["url"] + "/v1/predict", headers={"X-API-Key": API_KEY}, data={"model": "pca-sim@1"},
                         files={"file": ("cells.h5ad", fh)}, timeout=120).json()
    s = api["summary"]
    text = {k: b.find_element(By.ID, f"summary-{k}").text for k in ("n-cells", "n-sensitive", "n-resistant",
                                                                       "fraction", "mean-p")}
    assert text["n-cells"] == str(s["n_cells"]) == "300"
    assert text["n-sensitive"] == str(s["n_sensitive"])
    assert text["n-resistant"] == str(s["n_resistant"])
    assert text["fraction"] == f"{s['fraction_sensitive']:.3f}"
    assert text["mean-p"] == f"{s['mean_p_sensitive']:.3f}"

    bars = b.find_elements(By.CSS_SELECTOR, "#histogram-svg rect.bar")
    assert [int(r.get_attribute("data-count")) for r in bars] == s["histogram"]["counts"]
    points = b.find_elements(By.CSS_SELECTOR, "#embedding-svg circle.point")
    assert len(points) == s["n_cells"]
    assert len(b.find_elements(By.CSS_SELECTOR, "#embedding-svg circle.sensitive")) == s["n_sensitive"]
    rows = b.find_elements(By.CSS_SELECTOR, "#cells tbody tr")
    assert len(rows) == s["n_cells"]
    first = rows[0].find_elements(By.TAG_NAME, "td")
    assert first[0].text == api["cells"][0]["cell_id"]
    assert first[1].text == f"{api['cells'][0]['p_sensitive']:.4f}"
    assert first[2].text == api["cells"][0]["label"]

    # the CSV download is built in the page: check its text (the page's own function) without a download
    csv = b.execute_script("return csvText(lastResult.cells);")
    c0 = api["cells"][0]
    assert csv.splitlines()[1] == f"{c0['cell_id']},{c0['p_sensitive']},{c0['label']}"
    assert len(csv.splitlines()) == s["n_cells"] + 1
    # a cell id a spreadsheet would run as a formula stays text
    evil = b.execute_script("""return csvText([{cell_id: '=HYPERLINK("http://x","y")', p_sensitive: 0.5, label: 'ok'},
                                               {cell_id: '+1', p_sensitive: 0.1, label: '@SUM(A1)'},
                                               {cell_id: '-2', p_sensitive: 0.2, label: 'a,b'}]);""")
    assert evil.splitlines()[1:] == ['"\'=HYPERLINK(""http://x"",""y"")",0.5,ok', "'+1,0.1,'@SUM(A1)",
                                     "'-2,0.2,\"a,b\""]
    b.find_element(By.ID, "download").click()  # must not throw in the page

    shot = tmp_path / "web-page.png"
    assert b.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    out = os.environ.get("SCDRUGMAP_SCREENSHOT_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(out) / shot.name)


def test_docs_render_offline(ray_session: None, browser: Any) -> None:
    """/docs is Swagger UI from the server's own files (this Chromium has no internet) under the page's CSP."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    app = served()
    browser.get(app["url"] + "/docs")
    WebDriverWait(browser, 60).until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, ".swagger-ui .info .title"),
                                                                      "scdrugmap-ray"))
    paths = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")]
    assert "/v1/predict" in paths and "/readyz" in paths
    scripts = browser.execute_script("return [...document.scripts].map(s => s.src)")
    assert scripts and all(src.startswith(app["url"] + "/static/") for src in scripts)


def test_bad_upload_shows_the_message(ray_session: None, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    app = served()
    bad = tmp_path / "bad.h5ad"
    bad.write_text("not an h5ad")
    browser.get(app["url"] + "/")  # the key typed before is remembered by this tab (sessionStorage)
    WebDriverWait(browser, 60).until(lambda d: len(Select(d.find_element(By.ID, "model")).options) == 1)
    browser.find_element(By.ID, "file").send_keys(str(bad))
    browser.find_element(By.ID, "submit").click()
    WebDriverWait(browser, 60).until(ec.text_to_be_present_in_element((By.ID, "status"), "error 415"))
    assert "not HDF5" in browser.find_element(By.ID, "status").text
