"""A benchmark run's trained unit -> a versioned model in the registry (``scdrugmap-ray models register``).

Which unit: ``--unit ID``, or ``--best METRIC`` (the frozen or lora unit with the highest mean of METRIC
over its folds). Which fold: every fold of a unit trained its own model on its own training cells, so
one of them is taken: ``--fold NAME`` (a fold name such as ``fold=2``, or its number), by default the
fold with the highest METRIC (default AUROC). Picking the best fold by its test score is optimistic for
that fold's own score, so ``model.json`` carries the unit's cross-validated mean and spread
(``cv_metrics``) next to the fold's own metrics: the mean is the honest estimate of performance. We do
not refit on all labelled cells: that would train a model nobody evaluated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scdrugmap_ray.engine.errors import UserError
from scdrugmap_ray.engine.eval.metrics import METRICS
from scdrugmap_ray.engine.registry import Registry

from .planner import slug
from .runner import MANIFEST, RESULTS

REGISTRABLE = ("frozen", "lora")


def _fold_id(fold_name: str) -> str:
    return slug(fold_name.replace("/", "-").replace("=", "-"))  # as planner.Unit.fold_id


def _results(run_dir: Path) -> pd.DataFrame:
    path = run_dir / RESULTS
    if not path.is_file():
        raise UserError(f"{run_dir} has no {RESULTS}; give the directory of a finished `scdrugmap-ray run`")
    return pd.read_parquet(path)


def choose(res: pd.DataFrame, unit: str | None, best: str | None, fold: str | None, metric: str) -> pd.Series:
    """The result row of the chosen unit and fold."""
    for m in (best, metric):
        if m is not None and m not in METRICS:
            raise UserError(f"unknown metric {m!r}; metrics: {', '.join(METRICS)}")
    res = res[res["strategy"].isin(REGISTRABLE)]
    if res.empty:
        raise UserError(f"the run has no {' or '.join(REGISTRABLE)} units to register")
    if (unit is None) == (best is None):
        raise UserError("give exactly one of --unit ID or --best METRIC")
    if best is not None:
        means = res.groupby("unit_id")[best].mean().sort_values(ascending=False, kind="stable")
        unit = str(means.index[0])
        metric = best
    rows = res[res["unit_id"] == unit]
    if rows.empty:
        units = sorted(res["unit_id"].unique())
        more = " ..." if len(units) > 20 else ""
        raise UserError(f"no unit {unit!r} in the run; units: {', '.join(units[:20])}{more}")
    if fold is not None:
        pick = rows[(rows["fold_name"].astype(str) == fold) | (rows["fold"].astype(str) == fold)
                    | (rows["fold_name"].map(_fold_id) == fold)]
        if pick.empty:
            raise UserError(f"unit {unit!r} has no fold {fold!r}; folds: {', '.join(rows['fold_name'].astype(str))}")
        return pick.iloc[0]
    return rows.sort_values([metric, "fold"], ascending=[False, True], kind="stable").iloc[0]


def register_from_run(run_dir: str | Path, name: str, *, unit: str | None = None, best: str | None = None,
                      fold: str | None = None, metric: str = "auroc", registry: str | Path | None = None,
                      copy_checkpoint: bool = False) -> Path:
    run_dir = Path(run_dir)
    res = _results(run_dir)
    row = choose(res, unit, best, fold, metric)
    unit_id, strategy = str(row["unit_id"]), str(row["strategy"])
    fid = _fold_id(str(row["fold_name"]))
    base = run_dir / "units" / unit_id
    source = base / f"{fid}.model" if strategy == "frozen" else base / f"{fid}.lora" / "model"
    manifest = json.loads((run_dir / MANIFEST).read_text()) if (run_dir / MANIFEST).is_file() else {}
    spec_model = next((m for m in manifest.get("spec", {}).get("models", []) if m.get("name") == row["model"]), {})
    model_entry = next((m for m in manifest.get("models", []) if m.get("key") == row["model_key"]), {})
    data_entry = next((d for d in manifest.get("data", []) if d.get("name") == row["data"]), {})
    cfg_path = source / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    options = cfg.get("model_options", spec_model.get("options", {}))

    unit_rows = res[res["unit_id"] == unit_id]
    cv = {m: {"mean": float(np.nanmean(unit_rows[m])), "std": float(np.nanstd(unit_rows[m])), "n_folds": len(unit_rows)}
          for m in METRICS if m in unit_rows}
    fold_metrics = {m: float(row[m]) for m in METRICS if m in row}
    info: dict[str, Any] = {
        "model": str(row["model"]),
        "model_options": options,
        "model_identity": model_entry.get("identity"),
        "head": str(row["head"]),
        "random_weights": bool(row.get("random_weights", False)),
        "metrics": fold_metrics,
        "cv_metrics": cv,
        "selected_by": f"--fold {fold}" if fold is not None else f"highest {best or metric} among the unit's folds",
        "source": {"run_dir": str(run_dir.resolve()), "unit_id": unit_id, "strategy": strategy,
                   "scheme": str(row["scheme"]), "split": str(row["split"]), "fold": int(row["fold"]),
                   "fold_name": str(row["fold_name"]), "seed": int(row["seed"]), "run_name": manifest.get("name")},
        "training_data": {
            "data": str(row["data"]),
            "path": data_entry.get("path"),
            "content_hash": data_entry.get("content_hash"),
            "n_cells": data_entry.get("n_cells"),
            "n_train": int(row["n_train"]), "n_val": int(row["n_val"]), "n_test": int(row["n_test"]),
            "test_dataset": None if pd.isna(row.get("test_dataset")) else str(row.get("test_dataset")),
        },
        "train_info": cfg.get("train_info") or json.loads(str(row.get("train_info") or "{}")),
    }
    return Registry(registry).add(name, source, strategy, info, copy_checkpoint=copy_checkpoint)
