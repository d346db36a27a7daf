"""One headless Chromium for the browser tests: Debian's chromium + chromedriver driven by Selenium (never
a downloaded browser; .ci/run installs both)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@contextlib.contextmanager
def headless_chromium(width: int = 1280, height: int = 1600, console: bool = False) -> Iterator[Any]:
    """A Selenium driver of a headless Chromium window of ``width`` x ``height``; ``console`` keeps the
    page's console log (for a failure's message). Quit on exit."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.fail("Debian chromium and chromium-driver are needed: apt-get install -y chromium chromium-driver "
                    "(.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}"):
        opts.add_argument(arg)
    if console:
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
