"""`scdrugmap-ray plan`: units, folds and the cost estimate of a benchmark, before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from scdrugmap_ray.jobs.planner import DEFAULT_CELLS_PER_S, estimate, plan_units
from scdrugmap_ray.jobs.runner import prepare_store
from scdrugmap_ray.jobs.spec import load_spec, parse_spec
from test_cli import assert_user_error, cli

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "configs" / "scdrugmap.yaml"
TEN_MODELS = {"geneformer", "tgpt", "uce", "scbert", "cellplm", "celllm", "scgpt", "scfoundation", "llama",
              "openai-chat"}


def test_paper_matrix_lists_every_unit() -> None:
    spec = load_spec(PAPER)
    assert {m.name for m in spec.models} >= TEN_MODELS
    est = estimate(spec)
    by_model: dict[str, set[str]] = {}
    for u in est.units:
        by_model.setdefault(u.model, set()).add(u.strategy)
    for fm in TEN_MODELS - {"llama", "openai-chat"}:
        assert by_model[fm] == {"frozen", "lora"}
    assert by_model["llama"] == {"frozen"} and by_model["openai-chat"] == {"zero_shot", "few_shot"}
    assert {(u.scheme, u.split) for u in est.units} == {("pooled", "sample"), ("pooled", "cell"),
                                                        ("cross_data", "dataset")}
    # 2 collections x 3 seeds x (2 baselines + 8 FMs x 2 + llama + 2 prompted) x 3 scheme/splits
    assert len(est.units) == 2 * 3 * 21 * 3
    # the collections' sizes come from the catalog while the files are not there
    assert [(d.cells, len(d.datasets)) for d in est.data] == [(326_751, 36), (168_486, 24)]
    cd = next(u for u in est.units if u.data == "primary" and u.scheme == "cross_data")
    assert cd.folds == 36 * 4  # each dataset held out, zero-shot + three few-shot sizes

    proc = cli("plan", str(PAPER))
    assert proc.returncode == 0, proc.stderr
    for u in est.units:
        assert u.unit_id in proc.stdout
    assert f"total: {len(est.units)} units, {est.folds:,} folds" in proc.stdout
    assert "GPU-hours at 500 cells/s per GPU (an assumed round figure" in proc.stdout


def test_unknown_model_is_refused_in_one_line(tmp_path: Path) -> None:
    data = yaml.safe_load(PAPER.read_text())
    data["models"][2]["name"] = "genformer"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    assert_user_error(cli("plan", str(bad)), "unknown model 'genformer' (did you mean 'geneformer'?)")
    assert_user_error(cli("plan", str(PAPER), "--throughput", "nosuch=10"), "--throughput names model(s) nosuch")


def test_estimate_matches_the_runner_plan(tmp_path: Path) -> None:
    """Unit ids and folds agree with the planner the runner uses (which needs the data)."""
    spec = parse_spec({
        "name": "p",
        "data": [{"name": "sim", "simulate": {"cells": 300, "datasets": 3, "samples_per_dataset": 4,
                                               "genes": 500, "seed": 0}}],
        "models": [{"name": "pca-logreg"}, {"name": "geneformer", "options": {"preset": "tiny"}}],
        "strategies": ["frozen", "lora"],
        "lora": {"epochs": 2},
        "evaluation": {"pooled": {"folds": 3, "split": ["sample", "cell"]},
                       "cross_data": {"holdout": "each", "few_shot": [5]}},
        "seeds": [0, 1],
        "cache": str(tmp_path / "cache"),
    })
    store = prepare_store(spec.data[0], spec.cache_dir(), progress=False)
    real = {u.unit_id: len(u.folds) for u in plan_units(spec, {"sim": store.obs()})}
    est = estimate(spec, {"geneformer": 2 * DEFAULT_CELLS_PER_S})
    assert {u.unit_id: u.folds for u in est.units} == real
    # costs: a frozen foundation model embeds every cell once (first unit), baselines are CPU, LoRA trains
    frozen = [u for u in est.units if u.model == "geneformer" and u.strategy == "frozen"]
    assert sorted(u.forward_passes for u in frozen) == [0.0] * (len(frozen) - 1) + [300.0]
    assert all(u.forward_passes == 0 for u in est.units if u.model == "pca-logreg")
    pooled_lora = next(u for u in est.units if u.strategy == "lora" and u.scheme == "pooled")
    # 3 folds x (2 epochs x 3 passes x 200 training cells + 100 test cells)
    assert pooled_lora.forward_passes == pytest.approx(3 * (2 * 3 * 200 + 100))
    assert pooled_lora.gpu_hours == pytest.approx(pooled_lora.forward_passes / (2 * DEFAULT_CELLS_PER_S) / 3600)


def test_sizes_from_an_h5ad_and_a_cell_store(tmp_path: Path) -> None:
    from scdrugmap_ray.engine.data.convert import ConvertOptions, convert_h5ad
    from scdrugmap_ray.engine.data.simulate import simulate_h5ad
    from scdrugmap_ray.jobs.planner import data_size

    h5ad = tmp_path / "cells.h5ad"
    simulate_h5ad(h5ad, n_cells=240, n_datasets=3, samples_per_dataset=2, seed=2, n_genes=300, progress=False)
    convert_h5ad(h5ad, tmp_path / "store", ConvertOptions(label_key="response", dataset_key="dataset"), progress=False)
    entry = {"name": "x", "label_key": "response", "dataset_key": "dataset"}
    for path, source in ((h5ad, "(obs read)"), (tmp_path / "store", "cell store")):
        spec = parse_spec({"name": "s", "data": [{**entry, "path": str(path)}], "models": [{"name": "pca-logreg"}],
                           "evaluation": {"cross_data": {"holdout": "each"}}})
        size = data_size(spec.data[0])
        assert size.cells == 240 and sorted(size.datasets) == ["sim01", "sim02", "sim03"] and source in size.source
        assert sum(size.datasets.values()) == 240
        assert [u.folds for u in estimate(spec).units] == [3]
