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
from scdrugmap_ray.engine.explain.attribution import (
    GeneSums,
    adapter_for,
    attribute_baseline,
    attribute_fm,
    gene_coefficients,
    supports,
)
from scdrugmap_ray.engine.explain.de import log_normalize, sample_rows, wilcoxon_de
from scdrugmap_ray.engine.fsutil import atomic_file, write_json
from scdrugmap_ray.engine.models.base import EmbeddingModel, FittedFeatureModel, FoundationModel, get_model

from .planner import Unit, plan_units
from .spec import BenchmarkSpec, DataSpec, parse_spec

log = logging.getLogger(__name__)

LEVELS = ("dataset", "cancer_type", "regimen")  # biomarker groupings besides "all" ("regimen" = the drug)


@dataclass
class ExplainOptions:
    unit: str | None = None
    method: str = "ig"  # ig | gxi | attention (foundation models; attention: geneformer and tgpt only)
    max_cells: int = 1000  # attributed test cells per fold
    fm_max_cells: int = 64  # attributed test cells per fold for foundation models (expensive on CPU)
    n_steps: int = 32  # integrated-gradients steps (baselines); foundation models use half
    de_max_cells: int = 2000  # cells per class per group in DE
    top: int = 20
    batch_cells: int = 256
    seed: int = 0
    workers: int = 1  # > 1: attribution batches go to a pool of this many Ray actors


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
    from .runner import _digest

    if d.simulate is not None:
        return cache / "simulated" / f"sim-{_digest(d.simulate.model_dump())}.h5ad"
    return Path(d.path) if d.path and str(d.path).endswith(".h5ad") else None


def planted_genes(src: Path | None) -> dict[str, float]:
    """Genes with a non-zero ``var["resistance_effect"]`` (the simulator's planted program) -> log2 FC."""
    if src is None or not src.is_file():
        return {}
    import anndata as ad
    import h5py

    try:
        with h5py.File(src, "r") as f:
            var = ad.io.read_elem(f["var"])
    except (OSError, KeyError):
        return {}
    if "resistance_effect" not in var.columns:
        return {}
    eff = var["resistance_effect"].astype(float)
    return {str(g): float(v) for g, v in eff.items() if v != 0}


def precision_at(ranked_genes: list[str], planted: set[str], k: int = 20) -> float:
    top = ranked_genes[:k]
    return float(np.mean([g in planted for g in top])) if top else float("nan")


# ------------------------------------------------------------------------------------------ refitting


@dataclass
class FoldModel:
    kind: str  # baseline | fm | lora | none
    model: Any
    head: Any
    reference: np.ndarray | None = None  # baselines: the mean prepared training cell
    module: Any = None
    p_test: np.ndarray | None = None


def _labels(obs: pd.DataFrame, rows: np.ndarray) -> np.ndarray:
    return obs["label"].to_numpy()[rows].astype(np.int64)


def refit_fold(unit: Unit, fold: Fold, store: CellStore, obs: pd.DataFrame, spec: BenchmarkSpec,
               run_dir: Path, embedding: np.ndarray | None) -> FoldModel:
    """The fold's trained model again: frozen units refitted as the runner did, LoRA units loaded."""
    from scdrugmap_ray.engine.train.frozen import fold_features
    from scdrugmap_ray.engine.train.heads import make_head

    if unit.strategy == "lora":
        from scdrugmap_ray.engine.train.lora import load_finetuned

        model_dir = run_dir / "units" / unit.unit_id / f"{unit.fold_id(fold)}.lora" / "model"
        fm, backbone, head = load_finetuned(model_dir)
        return FoldModel("lora", fm, head, module=backbone)
    model = get_model(unit.model.name, unit.model.options)
    saved = _load_saved(run_dir / "units" / unit.unit_id / f"{unit.fold_id(fold)}.model", model)
    if saved is not None:  # the runner kept the fitted head (and featurizer): no refit needed
        model, head = saved
        if isinstance(model, FittedFeatureModel):
            x_test = model.transform(store.read_csr(fold.test))
        else:
            x_test = (embedding if embedding is not None else model.embed_store(store))[fold.test]
    else:
        x_train, x_val, x_test = fold_features(model, store, fold, unit.seed, embedding)
        head = make_head(unit.head, **unit.model.head_options)
        head.fit(x_train, _labels(obs, fold.train), x_val, _labels(obs, fold.val), unit.seed)
    p = np.asarray(head.predict_proba(x_test), dtype=np.float32)
    if isinstance(model, FittedFeatureModel):
        ref = _baseline_reference(model, store, fold)
        return FoldModel("baseline", model, head, reference=ref, p_test=p)
    if isinstance(model, FoundationModel):
        return FoldModel("fm", model, head, p_test=p)
    return FoldModel("none", model, head, p_test=p)


def _load_saved(directory: Path, model: Any) -> tuple[Any, Any] | None:
    """(featurizer, head) saved by the runner for this fold, or None (older runs: refit instead)."""
    if not directory.is_dir():
        return None
    try:
        from scdrugmap_ray.engine.train.frozen import load_fold_featurizer, load_fold_head
    except ImportError:
        return None
    return load_fold_featurizer(directory, model), load_fold_head(directory)


def _baseline_reference(model: Any, store: CellStore, fold: Fold, chunk: int = 2048) -> np.ndarray:
    """Mean prepared value per gene over the fold's training cells (streamed in chunks)."""
    total = np.zeros(store.n_genes)
    for start in range(0, len(fold.train), chunk):
        x = model._prepare(model._check(store.read_csr(fold.train[start:start + chunk])))
        total += np.asarray(x.sum(axis=0), dtype=np.float64).ravel()
    return (total / max(len(fold.train), 1)).astype(np.float32)


def _cells_of(store: CellStore, rows: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray], Any]:
    x = store.read_csr(rows)
    gi = [x.indices[x.indptr[i]:x.indptr[i + 1]].astype(np.int32) for i in range(x.shape[0])]
    vals = [x.data[x.indptr[i]:x.indptr[i + 1]].astype(np.float32) for i in range(x.shape[0])]
    return gi, vals, x


def finetuned_p(fmod: FoldModel, store: CellStore, obs: pd.DataFrame, rows: np.ndarray, batch_cells: int) -> np.ndarray:
    """p(sensitive) of some cells by the loaded LoRA backbone + head, in this process (padding is masked,
    so a cell's value does not depend on its batch)."""
    import torch

    fm = fmod.model
    tokenizer = fm.make_tokenizer(store.genes)
    ids = obs["cell_id"].astype(str).to_numpy()
    out = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_cells):
            part = rows[start:start + batch_cells]
            gi, vals, _ = _cells_of(store, part)
            batch = fm.collate(tokenizer(ids[part], gi, vals))
            logits = fmod.head(fm.embed(fmod.module, batch).float())
            out.append(torch.softmax(logits, dim=1)[:, 1].numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


def attribute_rows(fmod: FoldModel, store: CellStore, obs: pd.DataFrame, rows: np.ndarray,
                   opts: ExplainOptions, levels: dict[str, np.ndarray]) -> dict[str, GeneSums]:
    """Per-gene attribution sums of the given cells, by grouping level (``all``, ``dataset``, ...)."""
    sums = {lvl: GeneSums(store.n_genes) for lvl in levels}
    labels = _labels(obs, rows)
    tokenizer = None
    if fmod.kind in ("fm", "lora"):
        fm = fmod.model
        adapter = adapter_for(fm.name)
        assert adapter is not None
        tokenizer = fm.make_tokenizer(store.genes)
        if fmod.module is None:
            fmod.module = fm.load()
    for start in range(0, len(rows), opts.batch_cells):
        part = rows[start:start + opts.batch_cells]
        if fmod.kind == "baseline":
            assert fmod.reference is not None
            attr, delta = attribute_baseline(fmod.model, fmod.head, store.read_csr(part), fmod.reference,
                                             n_steps=opts.n_steps)
            scale = np.abs(attr.sum(axis=1)) + 1e-12
        else:
            gi, vals, _ = _cells_of(store, part)
            ids = obs["cell_id"].astype(str).to_numpy()[part]
            attr, delta, _ = attribute_fm(fmod.model, fmod.module, fmod.head, tokenizer, adapter,
                                          ids, gi, vals, store.n_genes, opts.method, max(4, opts.n_steps // 2))
            scale = np.abs(attr.sum(axis=1)) + 1e-12
        sl = slice(start, start + len(part))
        for lvl, groups in levels.items():
            sums[lvl].add(attr, groups[rows[sl]], labels[sl])
        sums["all"].deltas.extend((np.asarray(delta) / scale).tolist())
    return sums


class _Attributor:
    """A Ray actor holding one fold's model: attributes batches of cells, returns per-gene sums only."""

    def __init__(self, store_path: str, obs: pd.DataFrame, levels: dict[str, np.ndarray], opts: ExplainOptions) -> None:
        import torch

        torch.set_num_threads(1)
        self.store = CellStore.open(store_path)
        self.obs, self.levels, self.opts = obs, levels, opts
        self.fmod: FoldModel | None = None

    def set_fold(self, fmod: FoldModel) -> None:
        self.fmod = fmod

    def attribute(self, rows: np.ndarray) -> dict[str, GeneSums]:
        assert self.fmod is not None
        return attribute_rows(self.fmod, self.store, self.obs, rows, self.opts, self.levels)


class AttributorPool:
    """``workers`` Ray actors (1 CPU each); a fold's cells are attributed batch by batch across them and
    the per-gene sums merged on the driver, so no actor or the driver holds more than a batch of cells."""

    def __init__(self, workers: int, store: CellStore, obs: pd.DataFrame, levels: dict[str, np.ndarray],
                 opts: ExplainOptions) -> None:
        import ray
        from scdrugmap_ray.engine.runtime import init_ray

        init_ray(None)
        cls = ray.remote(num_cpus=1)(_Attributor)
        obs_ref, levels_ref = ray.put(obs), ray.put(levels)
        self.actors = [cls.remote(str(store.path), obs_ref, levels_ref, opts) for _ in range(workers)]

    def run(self, fmod: FoldModel, rows: np.ndarray, batch_cells: int) -> dict[str, GeneSums]:
        import ray
        from ray.util import ActorPool

        ref = ray.put(fmod)
        ray.get([a.set_fold.remote(ref) for a in self.actors])
        batches = [rows[i:i + batch_cells] for i in range(0, len(rows), batch_cells)]
        merged: dict[str, GeneSums] = {}
        for part in ActorPool(self.actors).map_unordered(lambda a, r: a.attribute.remote(r), batches):
            for lvl, gs in part.items():
                merged.setdefault(lvl, GeneSums(gs.n_genes)).merge(gs)
        return merged

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)


# ------------------------------------------------------------------------------------------------ DE


def _group_levels(obs: pd.DataFrame) -> dict[str, np.ndarray]:
    """Grouping arrays per level over all store rows; levels that repeat the dataset partition are dropped."""
    out = {"all": np.full(len(obs), "all", dtype=object)}
    ds = obs["dataset"].astype(str).to_numpy() if "dataset" in obs else out["all"]
    out["dataset"] = ds
    for lvl in LEVELS[1:]:
        if lvl not in obs or obs[lvl].isna().all():
            continue
        g = obs[lvl].astype(str).to_numpy()
        same = pd.crosstab(ds, g).astype(bool).sum(axis=1).eq(1).all() and \
            pd.crosstab(g, ds).astype(bool).sum(axis=1).eq(1).all()
        if not same:
            out[lvl] = g
    return out


def de_tables(store: CellStore, preds: pd.DataFrame, rows: np.ndarray, levels: dict[str, np.ndarray],
              opts: ExplainOptions) -> pd.DataFrame:
    """Wilcoxon DE resistant vs sensitive, by true and by predicted class, for every group of every level."""
    genes = store.genes.sort_values("position")["symbol"].astype(str).tolist()
    frames = []
    for lvl, groups in levels.items():
        g_of = groups[rows]
        for group in sorted(set(g_of)):
            in_group = g_of == group
            for comparison, col in (("true", "y_true"), ("predicted", "y_pred")):
                y = preds[col].to_numpy()
                picked = []
                for cls in (0, 1):
                    idx = np.flatnonzero(in_group & (y == cls))
                    picked.append(sample_rows(idx, opts.de_max_cells, opts.seed + cls))
                if min(len(p) for p in picked) < 3:
                    continue  # one class (nearly) absent: nothing to compare
                sel = np.concatenate(picked)
                x = log_normalize(store.read_csr(rows[sel]), counts=store.is_counts)
                is_res = np.concatenate([np.ones(len(picked[0]), bool), np.zeros(len(picked[1]), bool)])
                samples = preds["sample"].astype(str).to_numpy()[sel] if "sample" in preds else None
                de = wilcoxon_de(x, is_res, genes, samples)
                de.insert(0, "comparison", comparison)
                de.insert(0, "group", group)
                de.insert(0, "level", lvl)
                frames.append(de)
    if not frames:
        return pd.DataFrame(columns=["level", "group", "comparison", "gene", "rank", "log2fc", "qvalue"])
    return pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------------------------------- biomarkers


def biomarker_table(attr: pd.DataFrame, de: pd.DataFrame, top: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Top genes per (level, group): ranked by the mean of the attribution rank and the true-class DE rank
    (DE alone where there are no attributions), with effect sizes, q-values and agreement flags; plus a
    per-group summary (Spearman correlation of attribution importance and -log10 q, top-k overlap)."""
    from scipy.stats import spearmanr

    rows, summary = [], []
    for (lvl, group), d in de.groupby(["level", "group"], sort=True):
        true = d[d.comparison == "true"].set_index("gene")
        pred = d[d.comparison == "predicted"].set_index("gene")
        if true.empty:
            continue
        t = pd.DataFrame({"gene": true.index, "de_rank": true["rank"].to_numpy(), "log2fc": true["log2fc"].to_numpy(),
                          "auc": true["auc"].to_numpy(), "qvalue": true["qvalue"].to_numpy()})
        if not pred.empty:
            t = t.join(pred[["rank", "log2fc", "qvalue"]].rename(
                columns={"rank": "pred_de_rank", "log2fc": "pred_log2fc", "qvalue": "pred_qvalue"}), on="gene")
        a = attr[(attr.level == lvl) & (attr.group == group)] if not attr.empty else attr
        if not a.empty:
            t = t.join(a.set_index("gene")[["rank", "importance", "mean_sensitive", "mean_resistant", "direction"]]
                       .rename(columns={"rank": "attribution_rank", "direction": "attribution_direction"}), on="gene")
            score = (t["attribution_rank"] + t["de_rank"]) / 2.0
            t["agree"] = (t["attribution_rank"] <= top) & (t["de_rank"] <= top)
            ok = t["importance"].notna() & t["qvalue"].notna()
            imp, lq = t.loc[ok, "importance"], -np.log10(t.loc[ok, "qvalue"].clip(lower=1e-300))
            rho = spearmanr(imp, lq).statistic if imp.nunique() > 1 and lq.nunique() > 1 else np.nan
            overlap = int(t["agree"].sum())
        else:
            score, rho, overlap = t["de_rank"].astype(float), np.nan, np.nan
            t["agree"] = False
        t["score_rank"] = score.rank(method="first").astype(int)
        t["de_direction"] = np.where(t["log2fc"] > 0, "up in resistant", "up in sensitive")
        t = t.sort_values("score_rank").head(top)
        t.insert(0, "group", group)
        t.insert(0, "level", lvl)
        rows.append(t)
        summary.append({"level": lvl, "group": group, "spearman_importance_vs_de": float(rho),
                        f"top{top}_overlap": overlap, "n_de_significant": int((true["qvalue"] < 0.05).sum())})
    cols = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=["level", "group", "gene"])
    return cols, pd.DataFrame(summary)


# ---------------------------------------------------------------------------------------- resistance


def resistance_tables(preds: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    keys = [c for c in ("dataset", "sample") if c in preds.columns and preds[c].notna().any()]
    if "sample" not in keys:
        keys = [*keys, "sample"]
        preds = preds.assign(sample="all")
    per = preds.groupby(keys, observed=True).agg(
        n_cells=("cell_id", "size"), label=("y_true", "mean"),
        predicted_resistant_fraction=("y_pred", lambda s: 1 - s.mean()), mean_p_sensitive=("p_sensitive", "mean"),
    ).reset_index()
    per["label"] = np.where(per["label"] >= 0.5, "sensitive", "resistant")
    disc = preds[preds["y_pred"] != preds["y_true"]].copy()
    disc["kind"] = np.where(disc["y_true"] == 1, "predicted resistant in a sensitive sample",
                            "predicted sensitive in a resistant sample")
    disc = disc.sort_values("p_sensitive", kind="stable")
    return per, disc.reset_index(drop=True)


def embedding_2d(store: CellStore, preds_rows: np.ndarray, emb: np.ndarray | None, max_cells: int, seed: int,
                 counts: bool) -> tuple[np.ndarray, np.ndarray]:
    """(picked positions into preds_rows, 2-D coordinates): PCA of the model's embedding when there is one,
    else PCA of the log-normalised expression of the 1,000 most variable genes (of at most ``max_cells``)."""
    from sklearn.decomposition import PCA

    pick = sample_rows(np.arange(len(preds_rows)), max_cells, seed)
    rows = preds_rows[pick]
    if emb is not None:
        feats = emb[rows]
    else:
        x = log_normalize(store.read_csr(rows), counts=counts)
        sq = x.copy()
        sq.data **= 2
        var = np.asarray(sq.mean(axis=0)).ravel() - np.asarray(x.mean(axis=0)).ravel() ** 2
        feats = x[:, np.sort(np.argsort(-var)[:1000])].toarray()
    xy = PCA(n_components=2, random_state=seed).fit_transform(feats) if len(rows) > 2 else np.zeros((len(rows), 2))
    return pick, xy.astype(np.float32)


# ------------------------------------------------------------------------------------------------ run


def _median(values: list[float]) -> float | None:
    """Median of the finite values (gxi and attention have no completeness error: None, not NaN in JSON)."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    return float(np.median(finite)) if finite.size else None


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
    from .runner import _labelled_obs, prepare_store

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
    obs = _labelled_obs(store, data_name)
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


def explain_run(run_dir: str | Path, out: str | Path | None = None, opts: ExplainOptions | None = None) -> Path:
    """Explain one unit of a finished run (the best one by default); return the output directory."""
    from .runner import embedding_path

    opts = opts or ExplainOptions()
    ctx = load_unit(run_dir, opts.unit)
    run_dir, spec, results, unit, d, cache = ctx.run_dir, ctx.spec, ctx.results, ctx.unit, ctx.data, ctx.cache
    store, obs, preds, pred_rows = ctx.store, ctx.obs, ctx.preds, ctx.pred_rows
    unit_id = unit.unit_id
    out_dir = Path(out) if out else run_dir / "explain" / unit_id
    out_dir.mkdir(parents=True, exist_ok=True)
    genes = store.genes.sort_values("position")["symbol"].astype(str).tolist()
    levels = _group_levels(obs)

    # ---- attributions, fold by fold
    model = get_model(unit.model.name, unit.model.options)
    emb = None
    if isinstance(model, EmbeddingModel) and unit.strategy == "frozen":
        from scdrugmap_ray.engine.pipeline.embed import DONE, read_embeddings

        path = embedding_path(cache, store, model.identity())
        emb = read_embeddings(path) if (path / DONE).exists() else model.embed_store(store)
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
        "completeness_error_median": _median(sums["all"].deltas) if sums else None,
        "refit_max_abs_diff": refit_diff, "n_de_significant_q05": n_sig,
        "planted_genes": len(planted), f"precision_at_{opts.top}": recovery, "notes": notes,
        "levels": list(levels),
    }
    write_json(out_dir / "summary.json", summary)
    if refit_diff > 1e-3:
        log.warning("refitted predictions differ from the stored ones by up to %.3g", refit_diff)

    from scdrugmap_ray.engine.explain.report import write_explain_html

    write_explain_html(out_dir / "explain.html", summary=summary, attr=attr, coef=coef_table, de=de, bio=bio,
                       bio_summary=bio_summary, samples=samples, disc=disc,
                       preds=preds.iloc[pick].reset_index(drop=True), xy=xy, store=store, pred_rows=pred_rows,
                       planted=planted, top=opts.top)
    return out_dir


def explain_from_spec(spec: BenchmarkSpec, run_dir: Path) -> Path | None:
    """The benchmark's ``explain:`` block, run at the end of ``run_benchmark`` (None without a block)."""
    e = spec.explain
    if e is None:
        return None
    opts = ExplainOptions(unit=e.unit, method=e.method, max_cells=e.max_cells, fm_max_cells=e.fm_max_cells,
                          de_max_cells=e.de_max_cells, top=e.top, workers=e.workers)
    return explain_run(run_dir, e.out, opts)
