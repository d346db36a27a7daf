"""The analyses of ``explain`` besides attributions: grouping levels, differential expression resistant vs
sensitive (true and predicted classes), biomarker tables joining DE and attributions, resistance per
sample, the 2-D embedding of the report, and recovery of the simulator's planted genes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..data.store import CellStore
from .de import log_normalize, sample_rows, wilcoxon_de
from .options import LEVELS, ExplainOptions


def planted_genes(src: Path | None) -> dict[str, float]:
    """Genes with a non-zero ``var["resistance_effect"]`` (the simulator's planted program) -> log2 FC."""
    if src is None or not src.is_file():
        return {}
    # anndata/h5py load only for a simulated source
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


def group_levels(obs: pd.DataFrame) -> dict[str, np.ndarray]:
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


def finite_median(values: list[float]) -> float | None:
    """Median of the finite values (gxi and attention have no completeness error: None, not NaN in JSON)."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    return float(np.median(finite)) if finite.size else None
