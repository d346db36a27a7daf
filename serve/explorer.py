"""The explorer's data routes (``/v1/explorer/...``) for the web page's Datasets, Models and Results tabs.

A FastAPI router mounted on the Serve app's ingress (``serve/app.py``): the scDrugMap catalog, one card per
registry model (what it was trained on, how it scored with CIs from the run that registered it), and the
benchmark runs it can find with their leaderboards and breakdowns. Runs are found, never named by a request:
the run directories of the registry's models (``model.json`` ``source.run_dir``) and those under the
directories in ``$SCDRUGMAP_RAY_RUNS`` (``os.pathsep``-separated; a run directory or a folder of them).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from importlib.resources import files
from pathlib import Path
from typing import Any

import pandas as pd
from fastapi import APIRouter, HTTPException, Query, Response
from scdrugmap_ray.engine.eval.metrics import METRICS

RUNS_ENV = "SCDRUGMAP_RAY_RUNS"
RESULTS = "results.parquet"
BREAKDOWNS = "breakdowns.parquet"
#: the leaderboard's score columns (mean and sd over a unit's folds)
BOARD_METRICS = ("auroc", "f1", "auprc", "macro_f1", "accuracy")
BREAKDOWN_KEYS = ("cancer_type", "tissue", "therapy", "regimen", "dataset")
_UNIT_KEYS = ["unit_id", "data", "model", "head", "strategy", "scheme", "split"]
_SLUG = re.compile(r"[^A-Za-z0-9._-]+")
#: files this router serves to the page (a fixed list, never a path from a request)
STATIC = {"explorer.js": "text/javascript", "explorer.css": "text/css"}


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _records(df: pd.DataFrame) -> list[dict[str, Any]]:
    return [_clean(r) for r in df.astype(object).where(df.notna(), None).to_dict(orient="records")]


# --------------------------------------------------------------------------------------------- runs


def _run_id(path: Path) -> str:
    name = _SLUG.sub("-", path.name).strip("-") or "run"
    return f"{name}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


def discover_runs(registry_models: list[dict[str, Any]], env: str | None = None) -> dict[str, Path]:
    """run id -> run directory (with a results.parquet), from the registry's sources and $SCDRUGMAP_RAY_RUNS."""
    candidates: list[Path] = []
    for info in registry_models:
        run_dir = (info.get("source") or {}).get("run_dir")
        if run_dir:
            candidates.append(Path(run_dir))
    for entry in (env if env is not None else os.environ.get(RUNS_ENV, "")).split(os.pathsep):
        if not entry.strip():
            continue
        root = Path(entry.strip())
        if (root / RESULTS).is_file():
            candidates.append(root)
        elif root.is_dir():
            candidates += sorted(p for p in root.iterdir() if (p / RESULTS).is_file())
    out: dict[str, Path] = {}
    for path in candidates:
        path = path.resolve()
        if (path / RESULTS).is_file():
            out.setdefault(_run_id(path), path)
    return out


def _manifest(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "manifest.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def _random_models(manifest: dict[str, Any], results: pd.DataFrame) -> list[str]:
    names = {m.get("name") for m in manifest.get("models", []) if m.get("random_weights")}
    if "random_weights" in results.columns:
        names |= set(results.loc[results["random_weights"].fillna(False).astype(bool), "model"].astype(str))
    return sorted(n for n in names if n)


def run_summary(run_id: str, run_dir: Path) -> dict[str, Any]:
    res = pd.read_parquet(run_dir / RESULTS)
    manifest = _manifest(run_dir)
    return _clean({
        "id": run_id, "name": manifest.get("name") or run_dir.name, "dir": run_dir.name,
        "n_units": int(res["unit_id"].nunique()), "n_folds": len(res),
        "models": sorted(res["model"].astype(str).unique().tolist()),
        "random_weights": _random_models(manifest, res),
    })


def leaderboard(res: pd.DataFrame) -> list[dict[str, Any]]:
    """One row per unit: its folds' mean and sd of each score, best mean AUROC first."""
    keys = [k for k in _UNIT_KEYS if k in res.columns]
    if "few_shot_k" in res.columns:
        res = res.assign(few_shot_k=res["few_shot_k"].fillna(0).astype(int))
        keys.append("few_shot_k")
    metrics = [m for m in BOARD_METRICS if m in res.columns]
    g = res.groupby(keys, dropna=False)
    board = g[metrics].agg(["mean", "std"])
    board.columns = [f"{m}_{s}" for m, s in board.columns]
    board["n_folds"] = g.size()
    board = board.reset_index().sort_values(["auroc_mean", "f1_mean"], ascending=False, na_position="last")
    return _records(board)


def breakdown_tables(res: pd.DataFrame, bd: pd.DataFrame) -> dict[str, list[dict[str, Any]]]:
    """Per group key: mean F1 / AUROC over folds of each (model, strategy, scheme) and group value."""
    if bd.empty or "group_key" not in bd.columns:
        return {}
    keys = [k for k in ("model", "head", "strategy", "scheme") if k in bd.columns]
    out: dict[str, list[dict[str, Any]]] = {}
    for key in BREAKDOWN_KEYS:
        part = bd[bd["group_key"] == key]
        if part.empty:
            continue
        g = part.groupby([*keys, "group_value"], dropna=False)
        table = g[["f1", "auroc"]].mean()
        table["n_cells"] = g["n"].sum()
        table["n_folds"] = g.size()
        out[key] = _records(table.reset_index().sort_values(["group_value", *keys]))
    return out


def run_detail(run_id: str, run_dir: Path) -> dict[str, Any]:
    res = pd.read_parquet(run_dir / RESULTS)
    bd_path = run_dir / BREAKDOWNS
    bd = pd.read_parquet(bd_path) if bd_path.is_file() else pd.DataFrame()
    return {**run_summary(run_id, run_dir), "leaderboard": leaderboard(res),
            "breakdowns": breakdown_tables(res, bd)}


# ------------------------------------------------------------------------------------------- models


def model_card(info: dict[str, Any]) -> dict[str, Any]:
    """What a registry model is: base model, strategy, training data, and its scores: the registered fold's
    with 95% bootstrap CIs (from the run's results.parquet when it is still there) and the unit's
    cross-validated mean and sd (the honest estimate)."""
    src = info.get("source") or {}
    scores: dict[str, dict[str, Any]] = {}
    for m, v in (info.get("metrics") or {}).items():
        scores[m] = {"value": v, "ci_low": None, "ci_high": None}
    cv = dict(info.get("cv_metrics") or {})
    run_dir = Path(src["run_dir"]) if src.get("run_dir") else None
    run_found = bool(run_dir and (run_dir / RESULTS).is_file())
    if run_found and run_dir is not None:
        res = pd.read_parquet(run_dir / RESULTS)
        row = res[(res["unit_id"] == src.get("unit_id")) & (res["fold"] == src.get("fold"))]
        if len(row):
            r = row.iloc[0]
            for m in METRICS:
                if m in r:
                    scores[m] = {"value": r[m], "ci_low": r.get(f"{m}_ci_low"), "ci_high": r.get(f"{m}_ci_high")}
        unit = res[res["unit_id"] == src.get("unit_id")]
        if len(unit):  # the sample sd over folds, as the leaderboard and report.html give it
            cv = {m: {"mean": unit[m].mean(), "std": unit[m].std(ddof=1) if len(unit) > 1 else 0.0,
                      "n_folds": len(unit)} for m in METRICS if m in unit}
    return _clean({
        "name": info.get("name"), "version": info.get("version"), "ref": f"{info.get('name')}@{info.get('version')}",
        "base_model": info.get("model"), "model_options": info.get("model_options") or {},
        "head": info.get("head"), "strategy": src.get("strategy") or info.get("kind"), "kind": info.get("kind"),
        "random_weights": bool(info.get("random_weights")), "training_data": info.get("training_data") or {},
        "scores": scores, "cv_metrics": cv, "selected_by": info.get("selected_by"),
        "source": {k: src.get(k) for k in ("unit_id", "run_name", "scheme", "split", "fold_name", "seed")},
        "run_id": _run_id(run_dir.resolve()) if run_found and run_dir is not None else None,
        "created": info.get("created"),
    })


# ------------------------------------------------------------------------------------------- router


def explorer_router(registry: str, key_dependency: Any = None) -> APIRouter:
    """The explorer's routes; ``key_dependency`` (the app's API-key check) guards the data routes, not the
    page's script and style."""
    from scdrugmap_ray.engine.data import catalog
    from scdrugmap_ray.engine.errors import UserError
    from scdrugmap_ray.engine.registry import Registry

    router = APIRouter(prefix="/v1/explorer", tags=["explorer"])
    guarded = [key_dependency] if key_dependency is not None else []

    @router.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in STATIC:
            raise HTTPException(404, "not found")
        body = files("scdrugmap_ray.serve").joinpath("static", name).read_bytes()
        return Response(body, media_type=STATIC[name], headers={"Cache-Control": "max-age=300"})

    @router.get("/datasets", dependencies=guarded, summary="The scDrugMap catalog and its cells per subgroup")
    def datasets(collection: str | None = Query(None, description="primary or external"),
                 cancer_type: str | None = None, tissue: str | None = None, therapy: str | None = None,
                 regimen: str | None = None) -> dict[str, Any]:
        try:
            table = catalog.datasets(cancer_type=cancer_type, tissue=tissue, therapy=therapy, regimen=regimen,
                                     collection=collection)
        except UserError as err:
            raise HTTPException(422, str(err)) from None
        cells, shared = catalog.cells_of(table["id"].tolist())
        return {"datasets": _records(table), "total_cells": cells, "cells_unknown_for": shared,
                "subgroups": _records(catalog.subgroup_table(collection))}

    @router.get("/datasets/{name}", dependencies=guarded, summary="One catalog dataset and its subgroups")
    def dataset(name: str, collection: str = "primary") -> dict[str, Any]:
        try:
            d = catalog.dataset(name, collection)
        except UserError as err:
            raise HTTPException(404, str(err)) from None
        groups = [{"kind": g.kind, "value": g.value, "datasets": list(g.datasets), "cells": g.cells,
                   "sensitive": g.sensitive, "resistant": g.resistant} for g in catalog.subgroups_of(d.id)]
        return _clean({**d.to_dict(), "subgroups": groups})

    @router.get("/models", dependencies=guarded, summary="A card per registry model")
    def models() -> dict[str, Any]:
        return {"models": [model_card(info) for info in Registry(registry).list()]}

    @router.get("/runs", dependencies=guarded, summary="Benchmark runs the server can show")
    def runs() -> dict[str, Any]:
        found = discover_runs(Registry(registry).list())
        return {"runs": [run_summary(k, v) for k, v in found.items()]}

    @router.get("/runs/{run_id}", dependencies=guarded, summary="A run's leaderboard and breakdowns")
    def run(run_id: str) -> dict[str, Any]:
        found = discover_runs(Registry(registry).list())
        if run_id not in found:
            raise HTTPException(404, f"no run {run_id!r}; runs: {', '.join(found) or 'none'} (the server shows the "
                                     f"runs of its registry's models and those under ${RUNS_ENV})")
        return run_detail(run_id, found[run_id])

    return router
