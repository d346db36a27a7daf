"""``scdrugmap-ray explain RUN_DIR``: gene attributions, differential expression, biomarkers and resistance
analysis of one unit of a finished benchmark run.

Frozen units load the fitted featurizer and head the runner saved per fold (runs from before that are
refitted exactly as the runner fitted them: same spec, store, folds, seed); LoRA units load each fold's
saved adapter + head (``units/<unit>/<fold>.lora/model``). Either way the model's test predictions (for
LoRA: of the attributed cells) are compared with the stored ones (``summary.json``:
``refit_max_abs_diff``), so the attributions are known to explain the model that was evaluated.

Outputs (``--out``): ``attributions.parquet`` (per gene, ranked, by level/group), ``coefficients.parquet``
(linear baselines), ``de.parquet`` (true and predicted classes side by side), ``biomarkers.parquet``,
``resistance_samples.parquet``, ``discordant_cells.parquet``, ``summary.json`` and ``explain.html``.

Attribution work runs per batch of cells; with ``workers > 1`` the batches go to a pool of Ray actors
(one model copy each) and only per-gene sums come back, so memory is bounded by the batch.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scdrugmap_ray.engine.data.splits import Fold
from scdrugmap_ray.engine.data.store import CellStore
from scdrugmap_ray.engine.errors import UserError
from scdrugmap_ray.engine.explain.attribute import (
    AttributorPool,
    FoldModel,
    attribute_rows,
    baseline_reference,
    finetuned_p,
    labels_of,
    load_saved_fold,
)
from scdrugmap_ray.engine.explain.attribution import GeneSums, adapter_for, gene_coefficients, supports
from scdrugmap_ray.engine.explain.biomarkers import (
    biomarker_table,
    de_tables,
    embedding_2d,
    finite_median,
    group_levels,
    planted_genes,
    precision_at,
    resistance_tables,
)
from scdrugmap_ray.engine.explain.de import sample_rows
from scdrugmap_ray.engine.explain.options import ExplainOptions
from scdrugmap_ray.engine.explain.report import write_explain_html
from scdrugmap_ray.engine.fsutil import atomic_file, write_json
from scdrugmap_ray.engine.models.base import EmbeddingModel, FittedFeatureModel, FoundationModel, get_model
from scdrugmap_ray.engine.pipeline.embed import DONE, read_embeddings
from scdrugmap_ray.engine.progress import progress_bar
from scdrugmap_ray.engine.train.frozen import fold_features, store_embedding
from scdrugmap_ray.engine.train.heads import make_head
from scdrugmap_ray.engine.train.lora import load_finetuned

from .planner import Unit, plan_units
from .spec import BenchmarkSpec, DataSpec, parse_spec
from .stores import embedding_path, labelled_obs, prepare_store, simulated_h5ad

__all__ = [  # the compute moved to engine/explain; these names stay importable from here
    "AttributorPool", "ExplainOptions", "FoldModel", "attribute_rows", "best_unit", "explain_from_spec",
    "explain_run", "load_unit", "planted_genes", "precision_at", "refit_fold", "source_h5ad",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- inputs


def _load_run(run_dir: Path) -> tuple[BenchmarkSpec, pd.DataFrame]:
    if not (run_dir / "spec.json").is_file() or not (run_dir / "results.parquet").is_file():
        raise UserError(f"{run_dir} is not a finished benchmark run directory (needs spec.json and results.parquet); "
                        "run `scdrugmap-ray run BENCHMARK.yaml` first")
    spec = parse_spec(json.loads((run_dir / "spec.json").read_text()), str(run_dir / "spec.json"))
    return spec, pd.read_parquet(run_dir / "results.parquet")


def best_unit(results: pd.DataFrame) -> str:
    """The unit with the highest mean AUROC over its folds (F1 breaks ties, then the unit id)."""
    agg = results.groupby("unit_id")[["auroc", "f1"]].mean().fillna(-1.0).reset_index()
    agg = agg.sort_values(["auroc", "f1", "unit_id"], ascending=[False, False, True])
    return str(agg["unit_id"].iloc[0])


def _data_entry(spec: BenchmarkSpec, name: str) -> DataSpec:
    return next(d for d in spec.data if d.display_name == name)


def source_h5ad(d: DataSpec, cache: Path) -> Path | None:
    """The .h5ad a data entry came from (the simulator's cached file for a ``simulate:`` entry), if any."""
    if d.simulate is not None:
        return simulated_h5ad(d.simulate, cache)
    return Path(d.path) if d.path and str(d.path).endswith(".h5ad") else None


# ------------------------------------------------------------------------------------------ refitting


def refit_fold(unit: Unit, fold: Fold, store: CellStore, obs: pd.DataFrame, spec: BenchmarkSpec,
               run_dir: Path, embedding: np.ndarray | None) -> FoldModel:
    """The fold's trained model again: frozen units refitted as the runner did, LoRA units loaded."""
    if unit.strategy == "lora":
        model_dir = run_dir / "units" / unit.unit_id / f"{unit.fold_id(fold)}.lora" / "model"
        fm, backbone, head = load_finetuned(model_dir)
        return FoldModel("lora", fm, head, module=backbone)
    model = get_model(unit.model.name, unit.model.options)
    saved = load_saved_fold(run_dir / "units" / unit.unit_id / f"{unit.fold_id(fold)}.model", model)
    if saved is not None:  # the runner kept the fitted head (and featurizer): no refit needed
        model, head = saved
        if isinstance(model, FittedFeatureModel):
            x_test = model.transform(store.read_csr(fold.test))
        else:
            x_test = (embedding if embedding is not None else store_embedding(model, store))[fold.test]
    else:
        x_train, x_val, x_test = fold_features(model, store, fold, unit.seed, embedding)
        head = make_head(unit.head, **unit.model.head_options)
        head.fit(x_train, labels_of(obs, fold.train), x_val, labels_of(obs, fold.val), unit.seed)
    p = np.asarray(head.predict_proba(x_test), dtype=np.float32)
    if isinstance(model, FittedFeatureModel):
        ref = baseline_reference(model, store, fold)
        return FoldModel("baseline", model, head, reference=ref, p_test=p)
    if isinstance(model, FoundationModel):
        return FoldModel("fm", model, head, p_test=p)
    return FoldModel("none", model, head, p_test=p)


# ------------------------------------------------------------------------------------------------ run


def _write(df: pd.DataFrame, path: Path) -> None:
    with atomic_file(path) as tmp:
        df.to_parquet(tmp, index=False)


@dataclass
class UnitContext:
    """A finished run's unit, with everything needed to rebuild its fold models."""

    run_dir: Path
    spec: BenchmarkSpec
    results: pd.DataFrame
    unit: Unit
    data: DataSpec
    cache: Path
    store: CellStore
    obs: pd.DataFrame
    preds: pd.DataFrame
    pred_rows: np.ndarray


def load_unit(run_dir: str | Path, unit_id: str | None = None) -> UnitContext:
    """The unit (the best one by default) of a finished run, re-planned from its spec."""
    run_dir = Path(run_dir)
    spec, results = _load_run(run_dir)
    unit_id = unit_id or best_unit(results)
    known = sorted(results["unit_id"].unique())
    if unit_id not in known:
        raise UserError(f"unit {unit_id!r} is not in {run_dir}; units: {', '.join(known)}")
    data_name = str(results.loc[results.unit_id == unit_id, "data"].iloc[0])
    d = _data_entry(spec, data_name)
    cache = spec.cache_dir()
    store = prepare_store(d, cache, progress=False)
    obs = labelled_obs(store, data_name)
    unit = next((u for u in plan_units(spec, {data_name: obs}) if u.unit_id == unit_id), None)
    if unit is None:
        raise UserError(f"unit {unit_id!r} cannot be re-planned from {run_dir / 'spec.json'} (was the spec edited?)")
    pred_file = run_dir / "predictions" / f"{unit_id}.parquet"
    if not pred_file.is_file():
        raise UserError(f"{pred_file} not found; the run did not finish (rerun it with --resume)")
    preds = pd.read_parquet(pred_file)
    row_of = pd.Series(np.arange(len(obs)), index=obs["cell_id"].astype(str))
    pred_rows = row_of.reindex(preds["cell_id"].astype(str)).to_numpy()
    if np.isnan(pred_rows.astype(float)).any():
        raise UserError(f"{pred_file} names cells that are not in the store {store.path}; the data changed since "
                        "the run")
    return UnitContext(run_dir, spec, results, unit, d, cache, store, obs, preds, pred_rows.astype(np.int64))


def explain_run(run_dir: str | Path, out: str | Path | None = None, opts: ExplainOptions | None = None,
                progress: bool = False) -> Path:
    """Explain one unit of a finished run (the best one by default); return the output directory.
    ``progress``: a bar of the steps (each fold's attributions, then DE and biomarkers, then the page)."""
    with progress_bar(progress, rate=False) as bar:
        return _explain_unit(run_dir, out, opts or ExplainOptions(), bar)


def _explain_unit(run_dir: str | Path, out: str | Path | None, opts: ExplainOptions, bar: Any) -> Path:
    ctx = load_unit(run_dir, opts.unit)
    run_dir, spec, results, unit, d, cache = ctx.run_dir, ctx.spec, ctx.results, ctx.unit, ctx.data, ctx.cache
    store, obs, preds, pred_rows = ctx.store, ctx.obs, ctx.preds, ctx.pred_rows
    unit_id = unit.unit_id
    out_dir = Path(out) if out else run_dir / "explain" / unit_id
    out_dir.mkdir(parents=True, exist_ok=True)
    genes = store.genes.sort_values("position")["symbol"].astype(str).tolist()
    levels = group_levels(obs)

    # ---- attributions, fold by fold
    model = get_model(unit.model.name, unit.model.options)
    emb = None
    if isinstance(model, EmbeddingModel) and unit.strategy == "frozen":
        path = embedding_path(cache, store, model.identity())
        emb = read_embeddings(path) if (path / DONE).exists() else store_embedding(model, store)
    attributable = unit.strategy in ("frozen", "lora") and (isinstance(model, FittedFeatureModel) or (
        isinstance(model, FoundationModel) and supports(model.name, opts.method)))
    notes: list[str] = []
    if not attributable:
        if unit.strategy not in ("frozen", "lora"):
            why = f"strategy {unit.strategy!r} has no trained model to attribute"
        elif adapter_for(unit.model.name) is not None:  # method attention, a model without eager attention
            why = (f"model {unit.model.name!r} exposes no attention weights (its attention is fused: SDPA, "
                   "Performer or flow attention); use --method ig or gxi")
        else:
            why = f"model {unit.model.name!r} has no attribution adapter"
        notes.append(f"no gene attributions ({why}); DE and resistance analysis only")
    sums: dict[str, GeneSums] = {}
    coefs: list[np.ndarray] = []
    refit_diff = 0.0
    pool = AttributorPool(opts.workers, store, obs, levels, opts) if attributable and opts.workers > 1 else None
    task = bar.add_task(f"explain {unit_id}", total=(len(unit.folds) if attributable else 0) + 2)
    for fold in unit.folds if attributable else []:
        fmod = refit_fold(unit, fold, store, obs, spec, run_dir, emb)
        limit = opts.max_cells if fmod.kind == "baseline" else opts.fm_max_cells
        rows = sample_rows(fold.test, limit, opts.seed + fold.fold)
        checked = fold.test
        if fmod.kind == "lora":  # the loaded adapter + head must give the run's predictions (attributed cells)
            fmod.p_test, checked = finetuned_p(fmod, store, obs, rows, opts.batch_cells), rows
        if fmod.p_test is not None:
            stored = preds.loc[preds["fold"] == fold.fold].set_index("cell_id")["p_sensitive"]
            ids = obs["cell_id"].astype(str).to_numpy()[checked]
            refit_diff = max(refit_diff, float(np.max(np.abs(stored.reindex(ids).to_numpy() - fmod.p_test),
                                                      initial=0.0)))
        c = gene_coefficients(fmod.model, fmod.head)
        if c is not None:
            coefs.append(c)
        fold_sums = pool.run(fmod, rows, opts.batch_cells) if pool else attribute_rows(fmod, store, obs, rows, opts,
                                                                                         levels)
        for lvl, s in fold_sums.items():
            sums.setdefault(lvl, GeneSums(store.n_genes)).merge(s)
        bar.advance(task)
    if pool is not None:
        pool.close()
    attr_frames = []
    for lvl, s in sums.items():
        for group in sorted({k[0] for k in s.counts}):
            t = s.table(genes, group)
            t.insert(0, "group", group)
            t.insert(0, "level", lvl)
            attr_frames.append(t)
    attr = pd.concat(attr_frames, ignore_index=True) if attr_frames else pd.DataFrame(
        columns=["level", "group", "gene", "rank", "importance"])
    _write(attr, out_dir / "attributions.parquet")
    coef_table = pd.DataFrame()
    if coefs:
        w = np.mean(coefs, axis=0)
        coef_table = pd.DataFrame({"gene": genes, "coefficient": w, "abs_coefficient": np.abs(w),
                                   "gene_position": np.arange(len(genes))})
        coef_table = coef_table.sort_values(["abs_coefficient", "gene_position"], ascending=[False, True])
        coef_table = coef_table.reset_index(drop=True)
        coef_table.insert(1, "rank", np.arange(1, len(coef_table) + 1))
        coef_table["direction"] = np.where(coef_table["coefficient"] > 0, "sensitive", "resistant")
        _write(coef_table, out_dir / "coefficients.parquet")

    # ---- DE, biomarkers, resistance
    de = de_tables(store, preds, pred_rows, levels, opts)
    _write(de, out_dir / "de.parquet")
    bio, bio_summary = biomarker_table(attr, de, opts.top)
    _write(bio, out_dir / "biomarkers.parquet")
    samples, disc = resistance_tables(preds)
    _write(samples, out_dir / "resistance_samples.parquet")
    _write(disc, out_dir / "discordant_cells.parquet")
    pick, xy = embedding_2d(store, pred_rows, emb, 5000, opts.seed, store.is_counts)
    bar.advance(task)

    # ---- planted genes (simulated data)
    planted = planted_genes(source_h5ad(d, cache))
    rankings: dict[str, list[str]] = {}
    if not attr.empty:
        rankings["attribution"] = attr[attr.level == "all"]["gene"].tolist()
    if not coef_table.empty:
        rankings["coefficients"] = coef_table["gene"].tolist()
    for comp in ("true", "predicted"):
        dd = de[(de.level == "all") & (de.comparison == comp)]
        if not dd.empty:
            rankings[f"de_{comp}"] = dd["gene"].tolist()
    recovery = {name: precision_at(r, set(planted), opts.top) for name, r in rankings.items()} if planted else {}

    n_sig = {comp: int((de[(de.level == "all") & (de.comparison == comp)]["qvalue"] < 0.05).sum())
             for comp in ("true", "predicted")}
    random_weights = bool(results.loc[results.unit_id == unit_id, "random_weights"].any()) \
        if "random_weights" in results else False
    summary: dict[str, Any] = {
        "run_dir": str(run_dir), "unit_id": unit_id, "model": unit.model.name, "strategy": unit.strategy,
        "head": unit.head, "random_weights": random_weights,
        "method": (opts.method if isinstance(model, FoundationModel) else "ig") if attributable else None,
        "n_folds": len(unit.folds), "n_attributed_cells": sums["all"].n_cells if sums else 0,
        "completeness_error_median": finite_median(sums["all"].deltas) if sums else None,
        "refit_max_abs_diff": refit_diff, "n_de_significant_q05": n_sig,
        "planted_genes": len(planted), f"precision_at_{opts.top}": recovery, "notes": notes,
        "levels": list(levels),
    }
    write_json(out_dir / "summary.json", summary)
    if refit_diff > 1e-3:
        log.warning("refitted predictions differ from the stored ones by up to %.3g", refit_diff)

    write_explain_html(out_dir / "explain.html", summary=summary, attr=attr, coef=coef_table, de=de, bio=bio,
                       bio_summary=bio_summary, samples=samples, disc=disc,
                       preds=preds.iloc[pick].reset_index(drop=True), xy=xy, store=store, pred_rows=pred_rows,
                       planted=planted, top=opts.top)
    bar.advance(task)
    return out_dir


def explain_from_spec(spec: BenchmarkSpec, run_dir: Path) -> Path | None:
    """The benchmark's ``explain:`` block, run at the end of ``run_benchmark`` (None without a block)."""
    e = spec.explain
    if e is None:
        return None
    opts = ExplainOptions(unit=e.unit, method=e.method, max_cells=e.max_cells, fm_max_cells=e.fm_max_cells,
                          de_max_cells=e.de_max_cells, top=e.top, workers=e.workers)
    return explain_run(run_dir, e.out, opts)
