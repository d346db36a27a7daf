"""docs/notebook.py (a jupytext percent script) runs end to end on the real cells, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "docs" / "notebook.py"


def test_notebook_is_a_percent_script() -> None:
    text = NOTEBOOK.read_text()
    assert "format_name: percent" in text
    assert text.count("\n# %%") >= 8 and text.count("# %% [markdown]") >= 4


@pytest.mark.slow
def test_notebook_runs(shared_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "SCDRUGMAP_DATA": str(shared_dir / "data"), "SDR_NOTEBOOK_DIR": str(tmp_path),
           "SCDRUGMAP_RAY_CACHE": str(tmp_path / "cache")}
    res = subprocess.run([sys.executable, str(NOTEBOOK)], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert "(200, 64)" in out  # obsm["X_geneformer"] of the 200 cells
    assert "'random_weights': True" in out and "'backend': 'local'" in out
    assert "pca-logreg" in out and "jhu006-pca@1" in out
    assert (tmp_path / "run" / "report.html").is_file()
    assert (tmp_path / "registry" / "jhu006-pca" / "1" / "model.json").is_file()
