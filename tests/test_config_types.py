"""Typed nested configs (issue 18): a wrong type or an unknown key anywhere in a benchmark's nested settings
(model options, head options, lora, prompting) or a numeric CLI option out of range is one line naming
the key path, exit status 2 from the CLI and a UserError from the API, before any conversion or Ray start."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

BASE: dict[str, Any] = {
    "name": "typed",
    "data": [{"name": "sim", "simulate": {"cells": 200, "datasets": 2, "genes": 300}}],
    "models": [{"name": "pca-logreg"}, {"name": "hvg-mlp"}, {"name": "pca-logreg", "options": {"n_components": 10}}],
    "strategies": ["frozen"],
    "evaluation": {"pooled": {"folds": 2}},
}


def set_in(path: str, value: Any) -> dict[str, Any]:
    """BASE with the dotted ``path`` (list indexes as numbers) set to ``value``."""
    spec = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node: Any = spec
    for key in parents:
        node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
    node[last] = value
    return spec


# (spec, the line's key path and message): the table and its neighbours
BAD = [
    (set_in("models.2.options.n_components", "fifty"),
     "models[2].options.n_components: expected an integer, got 'fifty'"),
    (set_in("lora", {"r": "eight"}), "lora.r: expected an integer, got 'eight'"),
    (set_in("lora.dropout", "high"), "lora.dropout: expected a number, got 'high'"),
    (set_in("models.0.lora", {"epochs": 2.5}), "models[0].lora.epochs: expected an integer, got 2.5"),
    (set_in("models.1.head_options", {"max_epochs": "ten"}),
     "models[1].head_options.max_epochs: expected an integer, got 'ten'"),
    (set_in("models.0.options", {"n_componets": 5}),
     "models[0].options.n_componets: unknown key (did you mean 'n_components'?)"),
    (set_in("prompting", {"k": "four"}), "prompting.k: expected an integer, got 'four'"),
    (set_in("evaluation.pooled.folds", "five"), "evaluation.pooled.folds: expected an integer, got 'five'"),
    (set_in("seeds", [0, "one"]), "seeds[1]: expected an integer, got 'one'"),
    (set_in("models.1.options", {"fit_cells": True}), "models[1].options.fit_cells: expected an integer, got True"),
]


@pytest.mark.parametrize(("spec", "line"), BAD, ids=[b[1].split(":")[0] for b in BAD])
def test_bad_types_cli_and_api(spec: dict[str, Any], line: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    import ray
    import scdrugmap_ray as sdr
    from scdrugmap_ray.cli.main import app

    spec = {**spec, "output": str(tmp_path / "run"), "cache": str(tmp_path / "cache")}
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(spec))
    was = ray.is_initialized()
    with pytest.raises(SystemExit) as exit_info:
        app(args=["run", str(path)], prog_name="scdrugmap-ray")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"error: {path}: {line}"), err
    with pytest.raises(sdr.UserError) as api_info:
        sdr.run(path)
    assert str(api_info.value).startswith(f"{path}: {line}")
    with pytest.raises(sdr.UserError) as dict_info:
        sdr.run(spec)
    assert str(dict_info.value).startswith(f"benchmark: {line}")
    assert ray.is_initialized() == was  # nothing started
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()  # nothing converted or written


def test_numbers_written_as_text_are_numbers() -> None:
    """PyYAML reads `lr: 1e-3` as a string: typed options take it as the number it spells."""
    import scdrugmap_ray as sdr

    spec = sdr.runs.load_benchmark(yaml.safe_load(
        "name: t\ndata: [{simulate: {cells: 100}}]\nevaluation: {pooled: {folds: 2}}\n"
        "models: [{name: hvg-mlp, head_options: {lr: 1e-3, class_weight: null}, options: {target_sum: 1e4}}]\n"
        "lora: {alpha: 16, targets: [query]}\n"))
    m = spec.models[0]
    assert m.head_options == {"lr": 0.001, "class_weight": None} and m.options == {"target_sum": 10000.0}
    assert spec.lora == {"alpha": 16.0, "targets": ["query"]}


@pytest.mark.parametrize(("args", "message"), [
    (["convert", "x.h5ad", "out", "--chunk-size", "0"], "Invalid value for '--chunk-size'"),
    (["embed", "store", "--model", "geneformer", "--out", "o", "--batch-tokens", "0"], "'--batch-tokens'"),
    (["predict", "x.h5ad", "--model", "m", "--out", "o.parquet", "--batch-cells", "0"], "'--batch-cells'"),
    (["simulate", "x.h5ad", "--cells", "five"], "'--cells'"),
    (["finetune", "store", "--model", "geneformer", "--out", "o", "--r", "0"], "'--r'"),
    (["bench", "embed", "--model", "geneformer", "--data", "d", "--cells", "0"], "'--cells'"),
])
def test_cli_numeric_bounds(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    from scdrugmap_ray.cli.main import app

    with pytest.raises(SystemExit) as info:
        app(args=args, prog_name="scdrugmap-ray")
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_api_embed_options_are_typed() -> None:
    import anndata as ad
    import numpy as np
    import scdrugmap_ray as sdr

    a = ad.AnnData(np.ones((2, 3), dtype=np.float32))
    with pytest.raises(sdr.UserError, match=r"^options\.emb_layer: expected an integer, got 'last'$"):
        sdr.tl.embed(a, "geneformer", preset="tiny", options={"emb_layer": "last"})
