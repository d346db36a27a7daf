"""Benchmark YAML validation: strict keys with suggestions, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from scdrugmap_ray.engine.errors import UserError
from scdrugmap_ray.jobs.spec import load_spec, parse_spec

REPO = Path(__file__).resolve().parents[1]

MINIMAL = {
    "name": "quickstart",
    "data": [{"path": "data/sim.h5ad", "label_key": "response", "dataset_key": "dataset", "sample_key": "sample"}],
    "models": [{"name": "pca-logreg"}, {"name": "hvg-mlp"}],
    "strategies": ["frozen"],
    "evaluation": {"pooled": {"folds": 5, "split": "sample"}, "cross_data": {"holdout": "each"}},
    "seeds": [0],
    "output": "runs/quickstart",
}


def test_minimal_contract_parses() -> None:
    spec = parse_spec(MINIMAL)
    assert spec.evaluation.pooled is not None and spec.evaluation.pooled.splits == ["sample"]
    assert spec.evaluation.cross_data is not None and spec.evaluation.cross_data.holdout == "each"
    assert spec.output_dir() == Path("runs/quickstart")
    assert spec.data[0].display_name == "sim"


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")))
def test_shipped_configs_parse(path: Path) -> None:
    assert load_spec(path).name


def test_unknown_top_level_key_suggests() -> None:
    bad = {**MINIMAL, "modles": []}
    with pytest.raises(UserError, match=r"unknown key 'modles' \(did you mean 'models'\?\)"):
        parse_spec(bad)


def test_unknown_nested_key_suggests() -> None:
    bad = {**MINIMAL, "evaluation": {"pooled": {"folds": 5, "splt": "cell"}}}
    with pytest.raises(UserError, match=r"evaluation.pooled.splt.*did you mean 'split'"):
        parse_spec(bad)


def test_data_entry_key_suggests() -> None:
    bad = {**MINIMAL, "data": [{"path": "x.h5ad", "lable_key": "response"}]}
    with pytest.raises(UserError, match=r"did you mean 'label_key'"):
        parse_spec(bad)


def test_bad_values_are_one_line() -> None:
    with pytest.raises(UserError) as err:
        parse_spec({**MINIMAL, "evaluation": {"pooled": {"folds": 1}}})
    assert "\n" not in str(err.value) and "folds" in str(err.value)
    with pytest.raises(UserError, match="strategy 'finetune' is not available"):
        parse_spec({**MINIMAL, "strategies": ["finetune"]})
    with pytest.raises(UserError, match="exactly one of 'path' or 'simulate'"):
        parse_spec({**MINIMAL, "data": [{"label_key": "x"}]})
    with pytest.raises(UserError, match="at least one of 'pooled' or 'cross_data'"):
        parse_spec({**MINIMAL, "evaluation": {}})


def test_yaml_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_spec(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_spec(broken)
    listy = tmp_path / "list.yaml"
    listy.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(UserError, match="expected a YAML mapping"):
        load_spec(listy)
