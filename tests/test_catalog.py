"""The scDrugMap collection's catalog: ids, names, derived cells, filters, CLI, and catalog-driven annotation."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import anndata as ad
import pandas as pd
import pytest
from scdrugmap_ray.cli.main import app
from scdrugmap_ray.engine.data import catalog
from scdrugmap_ray.engine.data.convert import ConvertOptions, convert_h5ad
from scdrugmap_ray.engine.data.simulate import simulate_h5ad
from scdrugmap_ray.engine.data.store import CellStore
from scdrugmap_ray.engine.errors import UserError
from test_cli import assert_user_error, cli
from typer.testing import CliRunner

RESOURCES = Path(catalog.__file__).parent / "resources"


def _rows(name: str) -> list[dict[str, str]]:
    with (RESOURCES / name).open() as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def test_packaged_tables_are_the_shared_ones(shared_dir: Path) -> None:
    for name in ("scdrugmap_collection_datasets.tsv", "scdrugmap_collection_subgroups.tsv"):
        assert (RESOURCES / name).read_bytes() == (shared_dir / "data" / name).read_bytes()


def test_every_id_of_both_tables_resolves() -> None:
    rows = _rows("scdrugmap_collection_datasets.tsv")
    assert len(catalog.all_datasets()) == len(rows) == 60
    assert len(catalog.ids("primary")) == 36 and len(catalog.ids("external")) == 24
    for r in rows:
        coll = "external" if r["Collections"].startswith("External") else "primary"
        series = r["scDrugMap_collection_series_number"]
        d = catalog.dataset(series, collection=coll)
        assert d.series == series and d.collection == coll
        assert d.cancer_type == r["Cancer_type_level1"].strip() and d.therapy == r["Drug_type"].strip()
    for r in _rows("scdrugmap_collection_subgroups.tsv"):
        coll = "external" if r["Collections"].startswith("External") else "primary"
        for series in r["scDrugMap_collection_series_number"].split(","):
            if series.strip() != "All":
                assert catalog.resolve(series.strip(), coll) in catalog.ids(coll)


def test_names_resolve_and_bad_ones_are_one_line() -> None:
    assert catalog.resolve("Data12") == "Data12"
    assert catalog.resolve("data 12") == "Data12"
    assert catalog.resolve("ext:Data5") == catalog.resolve("external/Data5") == "ext:Data5"
    assert catalog.resolve("Data5", "external") == "ext:Data5"
    assert catalog.resolve("GSE131984_JQ1") == "Data28"  # a subgroup name
    assert catalog.resolve("gse164551") == "Data7"  # a GEO series with one dataset
    assert catalog.resolve("GSE161801_IMiD/GSE161801_post") == "Data4"  # series/subgroup
    with pytest.raises(UserError, match=r"names 5 catalog datasets \(Data27, Data28"):
        catalog.resolve("GSE131984")
    with pytest.raises(UserError, match="not a dataset of the scDrugMap catalog") as err:
        catalog.resolve("Data37")
    assert "\n" not in str(err.value)


def test_derived_cells_agree_with_every_published_total() -> None:
    by_id = {d.id: d for d in catalog.all_datasets()}
    checked = 0
    for g in catalog.subgroups():
        members = g.datasets if g.kind != "all" else tuple(catalog.ids(g.collection))
        if all(by_id[m].cells is not None for m in members):
            total = sum(by_id[m].cells for m in members)
            assert (total, sum(by_id[m].sensitive_cells for m in members)) == (g.cells, g.sensitive), g
            checked += 1
    assert checked >= 30  # 33 of the 62 published rows pin every member down
    assert catalog.cells_of(catalog.ids("primary")) == (326_751, [])
    assert catalog.cells_of(catalog.ids("external")) == (168_486, [])
    assert catalog.cells_of(catalog.ids()) == (326_751 + 168_486, [])  # both collections
    assert catalog.dataset("Data12").cells == 284  # the docetaxel regimen is Data12 alone
    assert catalog.cells_of(["Data1", "Data2"]) == (3421, [])  # only published jointly
    assert catalog.cells_of(["Data1"]) == (None, ["Data1"])


def test_filters() -> None:
    lung = catalog.datasets(cancer_type="lung")
    assert set(lung["id"]) == {"Data9", "Data11", "Data19", "Data22", "Data23", "ext:Data11", "ext:Data12",
                               "ext:Data13", "ext:Data14", "ext:Data24"}
    imm = catalog.datasets(therapy="immuno", collection="primary", tissue="tumor")
    assert set(imm["id"]) == {"Data22", "Data23"}
    assert len(catalog.datasets(collection="external")) == 24
    with pytest.raises(UserError, match="no catalog dataset matches --tissue 'brain'; values: Bone marrow"):
        catalog.datasets(tissue="brain")


def test_cli_list_and_show() -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["datasets", "list", "--cancer-type", "prostate"])
    assert res.exit_code == 0, res.output
    assert "Data12" in res.output and "Data32" in res.output and "10,982 cells" in res.output
    res = runner.invoke(app, ["datasets", "show", "Data12", "--format", "json"])
    assert res.exit_code == 0, res.output
    shown = json.loads(res.output)
    assert (shown["geo"], shown["regimen"], shown["cells"]) == ("GSE140440", "docetaxel", 284)
    assert {"kind": "regimen", "value": "docetaxel", "datasets": ["Data12"], "cells": 284, "sensitive": 134,
            "resistant": 150} in shown["subgroups"]
    assert_user_error(cli("datasets", "show", "Data99"), "'Data99' is not a dataset of the scDrugMap catalog")
    assert_user_error(cli("datasets", "list", "--collection", "extra"), "expected primary or external")


def test_annotate_obs_keeps_given_values() -> None:
    obs = pd.DataFrame({"dataset": ["Data12", "GSE131984_JQ1", "mine"],
                        "tissue": [None, "my tissue", None]})
    out = catalog.annotate(obs)
    assert out["cancer_type"].tolist() == ["Prostate cancer", "Breast cancer", None]
    assert out["tissue"].tolist() == ["Cell line", "my tissue", None]  # a given value wins
    assert out["regimen"].tolist() == ["docetaxel", "JQ1", None]
    with pytest.raises(UserError, match="no dataset value is a scDrugMap catalog dataset"):
        catalog.annotate(pd.DataFrame({"dataset": ["a", "b"]}))


@pytest.fixture(scope="module")
def catalog_h5ad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Simulated cells whose dataset column holds catalog names (an id, a GEO name, an external id)."""
    path = tmp_path_factory.mktemp("cat") / "sim.h5ad"
    simulate_h5ad(path, n_cells=600, n_datasets=3, samples_per_dataset=4, effect=1.0, seed=3, n_genes=1000,
                  progress=False)
    a = ad.read_h5ad(path)
    names = {"sim01": "Data12", "sim02": "GSE131984_JQ1", "sim03": "ext:Data5"}
    a.obs["dataset"] = a.obs["dataset"].astype(str).map(names)
    a.obs = a.obs.drop(columns=[c for c in ("cancer_type", "tissue", "therapy", "regimen") if c in a.obs])  # uncurated
    a.write_h5ad(path)
    return path


def test_convert_fills_the_four_columns(catalog_h5ad: Path, tmp_path: Path) -> None:
    opts = ConvertOptions(label_key="response", dataset_key="dataset", sample_key="sample", catalog="primary")
    report = convert_h5ad(catalog_h5ad, tmp_path / "store", opts, progress=False)
    assert any(line.startswith("catalog: 600 cells of 3 catalog dataset(s)") for line in report.lines())
    obs = CellStore.open(tmp_path / "store").obs()
    got = obs.groupby("dataset")[["cancer_type", "tissue", "therapy", "regimen"]].first()
    assert got.loc["Data12"].tolist() == ["Prostate cancer", "Cell line", "Chemotherapy", "docetaxel"]
    assert got.loc["GSE131984_JQ1"].tolist() == ["Breast cancer", "Cell line", "Targeted therapy", "JQ1"]
    assert got.loc["ext:Data5"].tolist() == ["Ovarian cancer", "Cell line", "Targeted therapy", "dabrafenib"]
    assert obs[["cancer_type", "tissue", "therapy", "regimen"]].notna().all().all()


def test_convert_names_unknown_ids(catalog_h5ad: Path, tmp_path: Path) -> None:
    a = ad.read_h5ad(catalog_h5ad)
    a.obs["dataset"] = a.obs["dataset"].astype(str).replace({"ext:Data5": "my_lab_set"})
    src = tmp_path / "mixed.h5ad"
    a.write_h5ad(src)
    runner = CliRunner()
    res = runner.invoke(app, ["validate", str(src), "--label-key", "response", "--dataset-key", "dataset",
                              "--catalog", "primary"])
    assert res.exit_code == 0, res.output
    warn = [line for line in res.output.splitlines() if "catalog does not know" in line]
    assert len(warn) == 1 and "'my_lab_set' (" in warn[0]
    a.obs["dataset"] = "nothing_known"
    a.write_h5ad(src)
    assert_user_error(cli("validate", str(src), "--dataset-key", "dataset", "--catalog", "primary"),
                      "no dataset value is a scDrugMap catalog dataset")


@pytest.mark.slow
def test_benchmark_breakdowns_show_catalog_columns(catalog_h5ad: Path, tmp_path: Path, ray_session: None) -> None:
    from scdrugmap_ray.jobs.runner import run_benchmark
    from scdrugmap_ray.jobs.spec import parse_spec

    spec = parse_spec({
        "name": "cat",
        "data": [{"path": str(catalog_h5ad), "label_key": "response", "dataset_key": "dataset",
                  "sample_key": "sample", "catalog": True}],
        "models": [{"name": "pca-logreg"}],
        "evaluation": {"pooled": {"folds": 2, "split": "sample"}, "bootstrap": 20},
        "output": str(tmp_path / "run"),
        "cache": str(tmp_path / "cache"),
    })
    run_dir = run_benchmark(spec, progress=False)
    bd = pd.read_parquet(run_dir / "breakdowns.parquet")
    for key, values in {"cancer_type": {"Prostate cancer", "Breast cancer", "Ovarian cancer"},
                        "tissue": {"Cell line"}, "therapy": {"Chemotherapy", "Targeted therapy"},
                        "regimen": {"docetaxel", "JQ1", "dabrafenib"}}.items():
        assert set(bd.loc[bd["group_key"] == key, "group_value"]) == values
    html = (run_dir / "report.html").read_text()
    for value in ("Prostate cancer", "Ovarian cancer", "docetaxel", "Chemotherapy"):
        assert value in html
