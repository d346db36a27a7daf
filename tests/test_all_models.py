"""All eight single-cell foundation models run the frozen strategy end to end in one benchmark
(tiny random-weight presets, simulated data), and LoRA runs beside frozen in a benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scdrugmap_ray.engine.errors import UserError
from scdrugmap_ray.jobs.runner import run_benchmark
from scdrugmap_ray.jobs.spec import parse_spec

pytestmark = pytest.mark.slow

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EIGHT = {"geneformer", "tgpt", "uce", "scbert", "cellplm", "celllm", "scgpt", "scfoundation"}


def _config(name: str, tmp_path: Path) -> dict:
    raw = yaml.safe_load((CONFIGS / name).read_text())
    raw["output"] = str(tmp_path / "run")
    raw["cache"] = str(tmp_path / "cache")
    return raw


def test_all_eight_models_frozen_in_one_benchmark(ray_session: None, tmp_path: Path) -> None:
    spec = parse_spec(_config("foundation_models.yaml", tmp_path), "foundation_models.yaml")
    assert {m.name for m in spec.models} == EIGHT
    run_dir = run_benchmark(spec, progress=False)
    res = pd.read_parquet(run_dir / "results.parquet")
    # 8 models x (2 pooled folds + 2 held-out datasets)
    assert len(res) == 8 * 4
    assert set(res["model"]) == EIGHT
    assert res["random_weights"].all()
    assert np.isfinite(res["auroc"]).all() and res["n_test"].gt(0).all()
    emb = list((tmp_path / "cache" / "embeddings").glob("*/_embedding.json"))
    assert len(emb) == 8  # one finished embedding folder per model, shared by its folds
    assert "RANDOM WEIGHTS" in (run_dir / "report.html").read_text().upper()


def test_lora_beside_frozen_in_a_benchmark(ray_session: None, tmp_path: Path) -> None:
    raw = _config("lora.yaml", tmp_path)
    raw["models"] = raw["models"][:1]
    raw["lora"]["epochs"] = 2
    spec = parse_spec(raw, "lora.yaml")
    run_dir = run_benchmark(spec, progress=False)
    res = pd.read_parquet(run_dir / "results.parquet")
    assert set(res["strategy"]) == {"frozen", "lora"}
    lora = res[res.strategy == "lora"]
    assert len(lora) == 2 and np.isfinite(lora["auroc"]).all()
    for model_dir in run_dir.glob("units/*lora*/*.lora/model"):
        assert (model_dir / "adapter" / "adapter_model.safetensors").exists()
        assert (model_dir / "head.safetensors").exists() and (model_dir / "genes.parquet").exists()
    assert len(list(run_dir.glob("units/*lora*/*.lora/model"))) == 2
    assert not list(run_dir.glob("units/*lora*/*.lora/ray"))  # training state removed once exported

    # explain the LoRA unit: the loaded adapter + head reproduce the run's predictions, attributions follow
    from scdrugmap_ray.jobs.explain import ExplainOptions, explain_run

    unit = lora["unit_id"].iloc[0]
    out = explain_run(run_dir, tmp_path / "explain", ExplainOptions(unit=unit, fm_max_cells=8, n_steps=8))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["refit_max_abs_diff"] < 1e-4
    attr = pd.read_parquet(out / "attributions.parquet")
    assert attr["importance"].gt(0).any()


def test_lora_refused_for_a_baseline(tmp_path: Path) -> None:
    raw = _config("lora.yaml", tmp_path)
    raw["models"] = [{"name": "pca-logreg", "strategies": ["lora"]}]
    with pytest.raises(UserError, match=r"cannot (do|run) strategy 'lora'"):
        parse_spec(raw, "lora.yaml")
    # listed beside LoRA'd models under the benchmark's strategies, a baseline runs frozen only
    raw = _config("lora.yaml", tmp_path)
    raw["models"].append({"name": "pca-logreg"})
    assert parse_spec(raw, "lora.yaml").models[-1].name == "pca-logreg"
    raw = _config("lora.yaml", tmp_path)
    raw["models"][0]["lora"] = {"rank": 4}
    with pytest.raises(UserError, match=r"models\[0\]\.lora\.rank: unknown key; allowed: r, alpha"):
        parse_spec(raw, "lora.yaml")
