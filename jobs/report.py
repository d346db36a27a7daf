"""The HTML report of a benchmark run: one self-contained file, readable offline.

Everything is inline (CSS, plots as base64 PNG drawn with matplotlib's Agg canvas, no scripts, no external
URLs), so the file can be mailed or archived as is. It reads the run directory's contract files
(``results.parquet``, ``breakdowns.parquet``, ``predictions/*.parquet``, ``manifest.json``) and copes with
missing pieces: no cross_data, no breakdowns, no predictions, NaN metrics (one-class test sets) shown as
"n/a". Every value that comes from user data is HTML-escaped.

Predictions of a large run can be big: ROC curves are computed from per-bin counts of ``p_sensitive``
(streamed batch by batch, two columns only), so memory does not grow with the number of cells.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..engine.errors import UserError
from ..engine.fsutil import atomic_file

log = logging.getLogger(__name__)

REPORT = "report.html"
SUMMARY_METRICS = ("f1", "macro_f1", "auroc", "auprc", "accuracy")
ALL_METRICS = ("f1", "macro_f1", "accuracy", "precision", "recall", "auroc", "auprc")
SUMMARY_KEYS = ("model", "head", "strategy", "scheme", "split", "few_shot_k")
BREAKDOWN_GROUPS = ("dataset", "cancer_type", "tissue", "therapy", "regimen")
ROC_BINS = 2000  # score bins for ROC curves: exact up to ties within 1/2000 of probability
LONG_TABLE = 40  # tables with more rows are folded into <details>

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; padding: 0 1em; }
h1 { margin-bottom: 0.1em; } h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
.sub { color: #666; margin-top: 0; }
.banner { background: #c62828; color: #fff; font-size: 1.3em; font-weight: bold; padding: 0.8em 1em;
          border-radius: 6px; margin: 1em 0; }
.note { background: #fff8e1; border-left: 5px solid #f9a825; padding: 0.6em 1em; margin: 1em 0; }
table.t { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1em 0; }
table.t th, table.t td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
table.t th { background: #f3f3f3; } table.t tr:nth-child(even) td { background: #fafafa; }
table.t td:first-child, table.t th:first-child { text-align: left; }
img { max-width: 100%; display: block; margin: 0.5em 0 1.5em 0; }
details { margin: 0.5em 0; } summary { cursor: pointer; font-weight: bold; }
.muted { color: #888; }
p.caption { color: #444; font-size: 0.9em; margin: -1em 0 1.5em 0; font-style: italic; }
"""


# ------------------------------------------------------------------------------------------- helpers


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(x: Any, digits: int = 3) -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return "n/a"
    return "n/a" if not np.isfinite(v) else f"{v:.{digits}f}"


def _mean_sd(values: pd.Series) -> str:
    """``mean ± sd`` over the finite values; says how many folds had a defined metric when not all did."""
    v = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
    ok = v[np.isfinite(v)]
    if ok.size == 0:
        return "n/a"
    text = _num(ok.mean()) if ok.size == 1 else f"{ok.mean():.3f} ± {ok.std(ddof=1):.3f}"
    return text if ok.size == v.size else f"{text} ({ok.size}/{v.size})"


def _table(df: pd.DataFrame, *, fold_title: str | None = None) -> str:
    """An escaped HTML table; long ones folded into <details>."""
    if df.empty:
        return '<p class="muted">(nothing to show)</p>'
    body = df.to_html(index=False, escape=True, na_rep="n/a", border=0, classes="t")
    if fold_title is None and len(df) <= LONG_TABLE:
        return body
    title = fold_title or f"{len(df)} rows"
    return f"<details><summary>{_esc(title)}</summary>{body}</details>"


def _img(fig: Figure, alt: str) -> str:
    FigureCanvasAgg(fig)  # draw with Agg whatever pyplot backend the caller has chosen
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{data}">'


def _caption(text: str) -> str:
    """The one line under a plot saying what to read from it."""
    return f'<p class="caption">{_esc(text)}</p>'


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _col(df: pd.DataFrame, name: str, default: Any) -> pd.Series:
    return df[name] if name in df.columns else pd.Series(default, index=df.index)


# ------------------------------------------------------------------------------------------ loading


def _read_manifest(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "manifest.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        log.warning("cannot read %s: %s", path, err)
        return {}


def _read_parquet(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path) if path.exists() else pd.DataFrame()


def _condition(scheme: Any, split: Any, k: Any) -> str:
    """Short name of an evaluation condition: pooled-sample, pooled-cell, cross_data, cross_data k=20."""
    if scheme == "pooled":
        return f"pooled-{split}" if isinstance(split, str) and split else "pooled"
    if scheme == "cross_data":
        k = int(k) if pd.notna(k) else 0
        return "cross_data" if k == 0 else f"cross_data k={k}"
    return str(scheme)


def _condition_order(name: str) -> tuple[int, int, str]:
    if name.startswith("pooled"):
        return (0, {"pooled-sample": 0, "pooled-cell": 1}.get(name, 2), name)
    if name.startswith("cross_data"):
        k = int(name.split("k=")[1]) if "k=" in name else 0
        return (1, k, name)
    return (2, 0, name)


def annotate(results: pd.DataFrame) -> pd.DataFrame:
    """Add ``arm`` (model, plus head/strategy when they vary) and ``condition`` to the result rows."""
    df = results.copy()
    model = _col(df, "model", "?").astype(str)
    if "model_key" in df.columns and df["model_key"].nunique() > model.nunique():
        model = df["model_key"].astype(str)  # one model name listed twice with different options
    head = _col(df, "head", None)
    strategy = _col(df, "strategy", None)
    arm = model.copy()
    if head.notna().any() and (df.assign(_m=model, _h=head).groupby("_m")["_h"].nunique() > 1).any():
        arm = arm + "/" + head.astype(str)
    if strategy.nunique(dropna=True) > 1:
        arm = arm + "/" + strategy.astype(str)
    if "data" in df.columns and df["data"].nunique() > 1:
        arm = df["data"].astype(str) + " · " + arm
    if "random_weights" in df.columns:  # plots carry the warning too, not only the banner
        arm = arm.where(~df["random_weights"].fillna(False).astype(bool), arm + " (RANDOM)")
    df["arm"] = arm
    df["condition"] = [
        _condition(s, sp, k)
        for s, sp, k in zip(_col(df, "scheme", "?"), _col(df, "split", None), _col(df, "few_shot_k", 0), strict=True)
    ]
    return df


# ----------------------------------------------------------------------------------------- sections


def _random_weight_models(results: pd.DataFrame, manifest: dict[str, Any]) -> list[str]:
    names = {str(m.get("name")) for m in manifest.get("models", []) if m.get("random_weights")}
    if "random_weights" in results.columns:
        flagged = results[results["random_weights"].fillna(False).astype(bool)]
        names |= set(_col(flagged, "model", "?").astype(str))
    return sorted(names)


def _summary(results: pd.DataFrame) -> str:
    keys = [k for k in SUMMARY_KEYS if k in results.columns]
    if "model_key" in results.columns and results["model_key"].nunique() > _col(results, "model", "").nunique():
        keys.insert(keys.index("model") + 1 if "model" in keys else 0, "model_key")
    if "data" in results.columns and results["data"].nunique() > 1:
        keys.insert(0, "data")
    rows = []
    for key, g in results.groupby(keys, dropna=False, sort=False):
        row = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
        row = {k: ("" if pd.isna(v) else v) for k, v in row.items()}
        for m in SUMMARY_METRICS:
            row[m] = _mean_sd(g[m]) if m in g.columns else "n/a"
        row["n folds"] = len(g)
        rows.append((_condition_order(str(g["condition"].iloc[0])), str(row.get("model")), row))
    rows.sort(key=lambda r: r[:2])
    return _table(pd.DataFrame([r[2] for r in rows]))


def _leakage_note(results: pd.DataFrame) -> str:
    pooled = results[(results["condition"] == "pooled-sample") | (results["condition"] == "pooled-cell")]
    if pooled["condition"].nunique() < 2:
        return ""
    means = pooled.groupby(["arm", "condition"])[["auroc", "f1"]].mean().unstack("condition")
    gaps = means[("auroc", "pooled-cell")] - means[("auroc", "pooled-sample")]
    table = pd.DataFrame(
        {
            "model": means.index,
            "AUROC split=sample": [_num(v) for v in means[("auroc", "pooled-sample")]],
            "AUROC split=cell": [_num(v) for v in means[("auroc", "pooled-cell")]],
            "F1 split=sample": [_num(v) for v in means[("f1", "pooled-sample")]],
            "F1 split=cell": [_num(v) for v in means[("f1", "pooled-cell")]],
            "AUROC gap (cell - sample)": [_num(v) for v in gaps],
        }
    )
    gap = gaps.max()
    return (
        '<div class="note"><b>Leakage check.</b> Drug-response labels are sample-level. The cell-level split '
        "(<code>split: cell</code>, the scDrugMap paper's protocol) puts cells of one sample on both sides of a "
        "fold, so a model can recognise the sample instead of the response. The sample-grouped split "
        f"(<code>split: sample</code>) is the honest figure. Largest AUROC gap (cell - sample): <b>{_num(gap)}</b>."
        f"{_table(table)}</div>"
    )


def _heatmap(matrix: pd.DataFrame, title: str, metric: str = "F1") -> str:
    values = matrix.to_numpy(dtype=float)
    n_rows, n_cols = values.shape
    fig = Figure(figsize=(max(4.0, 1.0 + 0.9 * n_cols), max(2.0, 0.8 + 0.45 * n_rows)))
    ax = fig.add_subplot()
    masked = np.ma.masked_invalid(values)
    from matplotlib import colormaps

    cmap = colormaps["viridis"].with_extremes(bad="#dddddd")
    im = ax.imshow(masked, vmin=0.0, vmax=1.0, cmap=cmap, aspect="auto")
    ax.set_xticks(range(n_cols), [str(c) for c in matrix.columns], rotation=45, ha="right")
    ax.set_yticks(range(n_rows), [str(r) for r in matrix.index])
    if n_rows * n_cols <= 400:
        for i in range(n_rows):
            for j in range(n_cols):
                v = values[i, j]
                text, color = ("n/a", "#555") if not np.isfinite(v) else (f"{v:.2f}", "w" if v < 0.6 else "k")
                ax.text(j, i, text, ha="center", va="center", fontsize=8, color=color)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=metric)
    return _img(fig, title)


def _heatmaps(results: pd.DataFrame, breakdowns: pd.DataFrame) -> str:
    """Per-dataset F1 (at p >= 0.5) and AUROC (threshold-free): held-out datasets of cross_data, and each
    dataset's test cells in pooled folds (from the breakdowns)."""
    parts = []
    cross = results[_col(results, "scheme", None) == "cross_data"]
    for metric, label in (("f1", "F1"), ("auroc", "AUROC")):
        for cond in sorted(cross["condition"].unique(), key=_condition_order):
            sub = cross[cross["condition"] == cond]
            matrix = sub.pivot_table(index="arm", columns="test_dataset", values=metric, aggfunc="mean", dropna=False)
            if matrix.size:
                parts.append(_heatmap(matrix, f"{label}, {cond}: model x held-out dataset", label) + _caption(
                    f"{label} of each model on each dataset it never saw in training ({cond}); a dark row is a model "
                    "that does not transfer, a dark column a dataset unlike the others; grey: undefined "
                    "(one-class test set)."))
        if not breakdowns.empty and {"unit_id", "group_key", "group_value", metric} <= set(breakdowns.columns):
            bd = _with_condition(breakdowns[breakdowns["group_key"] == "dataset"], results)
            bd = bd[bd["condition"].str.startswith("pooled")]
            for cond in sorted(bd["condition"].unique(), key=_condition_order):
                sub = bd[bd["condition"] == cond]
                matrix = sub.pivot_table(index="arm", columns="group_value", values=metric, aggfunc="mean",
                                         dropna=False)
                if matrix.size:
                    parts.append(_heatmap(matrix, f"{label}, {cond}: model x dataset (test cells of each dataset)",
                                          label) + _caption(
                        f"{label} on each dataset's test cells inside the pooled folds ({cond}): which datasets a "
                        "model gets right when it has seen their neighbours; grey: undefined (one class)."))
    return "".join(parts) or '<p class="muted">No per-dataset results (no cross_data and no breakdowns).</p>'


def _scheme_plot(results: pd.DataFrame) -> str:
    conds = sorted(results["condition"].unique(), key=_condition_order)
    arms = sorted(results["arm"].unique())
    if not conds or not arms:
        return '<p class="muted">No results.</p>'
    stats = results.groupby(["arm", "condition"])[["auroc", "f1"]].agg(["mean", "std"])
    fig = Figure(figsize=(max(7.0, 1.2 * len(arms) * max(1, len(conds)) / 2 + 3), 3.8))
    width = 0.8 / len(conds)
    colors = _colors(len(conds))
    x = np.arange(len(arms))
    for pos, metric in enumerate(("auroc", "f1")):
        ax = fig.add_subplot(1, 2, pos + 1)
        for i, cond in enumerate(conds):
            mean = [stats[(metric, "mean")].get((a, cond), np.nan) for a in arms]
            sd = np.nan_to_num([stats[(metric, "std")].get((a, cond), np.nan) for a in arms])
            ax.bar(x + (i - (len(conds) - 1) / 2) * width, mean, width, yerr=sd, capsize=3, label=cond,
                   color=colors[i])
        if metric == "auroc":
            ax.axhline(0.5, color="#999", lw=0.8, ls="--")
        ax.set_xticks(x, arms, rotation=30 if len(arms) > 3 else 0, ha="right" if len(arms) > 3 else "center")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"mean {metric.upper()} (± sd over folds)")
    fig.axes[0].legend(fontsize=8, loc="lower left")
    return _img(fig, "scheme comparison") + _caption(
        "Mean AUROC and F1 of each model under each evaluation scheme (error bars: sd over folds); a drop from "
        "pooled-cell to pooled-sample or cross_data is what the model loses on unseen samples or datasets.")


def _roc_counts(paths: Iterable[Path], folds: Iterable[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-bin counts of sensitive and resistant cells by predicted score, streamed (two or three columns
    read); ``folds``: only the predictions of these folds (a unit's folds can belong to different
    conditions: cross_data k=0 and k=20)."""
    pos = np.zeros(ROC_BINS, dtype=np.int64)
    neg = np.zeros(ROC_BINS, dtype=np.int64)
    wanted = None if folds is None else np.asarray(sorted({int(f) for f in folds}), dtype=np.int64)
    for path in paths:
        try:
            pf = pq.ParquetFile(path)
            names = set(pf.schema_arrow.names)
            if not {"y_true", "p_sensitive"} <= names:
                log.warning("%s lacks y_true/p_sensitive; left out of the curves", path)
                continue
            if wanted is not None and "fold" not in names:
                log.warning("%s lacks the fold column; left out of the curves", path)
                continue
            columns = ["y_true", "p_sensitive"] + (["fold"] if wanted is not None else [])
            for batch in pf.iter_batches(batch_size=1 << 18, columns=columns):
                y = batch.column("y_true").to_numpy(zero_copy_only=False).astype(float)
                p = batch.column("p_sensitive").to_numpy(zero_copy_only=False).astype(float)
                ok = np.isfinite(y) & np.isfinite(p)
                if wanted is not None:
                    ok &= np.isin(batch.column("fold").to_numpy(zero_copy_only=False).astype(np.int64), wanted)
                bins = np.clip((p[ok] * ROC_BINS).astype(np.int64), 0, ROC_BINS - 1)
                pos += np.bincount(bins[y[ok] == 1], minlength=ROC_BINS)
                neg += np.bincount(bins[y[ok] == 0], minlength=ROC_BINS)
        except OSError as err:
            log.warning("cannot read %s: %s", path, err)
    return pos, neg


def _roc(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray, float] | None:
    if pos.sum() == 0 or neg.sum() == 0:
        return None
    # Thresholds from high to low scores; cells of one bin count as tied.
    tpr = np.concatenate([[0.0], np.cumsum(pos[::-1]) / pos.sum()])
    fpr = np.concatenate([[0.0], np.cumsum(neg[::-1]) / neg.sum()])
    return fpr, tpr, float(np.trapezoid(tpr, fpr))


def _pr(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float] | None:
    """(recall, precision, average precision, prevalence) from the binned counts; thresholds from high to
    low scores, empty bins skipped (they add no point). Sensitive is the positive class, as everywhere."""
    if pos.sum() == 0 or neg.sum() == 0:
        return None
    keep = (pos + neg)[::-1] > 0
    tp = np.cumsum(pos[::-1])[keep].astype(float)
    fp = np.cumsum(neg[::-1])[keep].astype(float)
    recall = tp / pos.sum()
    precision = tp / (tp + fp)
    ap = float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))
    return (np.concatenate([[0.0], recall]), np.concatenate([[precision[0]], precision]), ap,
            float(pos.sum() / (pos.sum() + neg.sum())))


def curve_counts(results: pd.DataFrame, pred_dir: Path) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
    """Binned (sensitive, resistant) counts per (condition, arm), from the predictions of exactly the folds
    of that condition: one curve per condition, never k=0 and k=20 folds pooled together."""
    out: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
    if not pred_dir.is_dir() or "unit_id" not in results.columns:
        return out
    has_folds = "fold" in results.columns
    for (cond, arm), g in results.groupby(["condition", "arm"], sort=False):
        paths = [pred_dir / f"{u}.parquet" for u in g["unit_id"].unique() if (pred_dir / f"{u}.parquet").exists()]
        if not paths:
            continue
        folds = g["fold"].dropna().astype(int).tolist() if has_folds else None
        out[(str(cond), str(arm))] = _roc_counts(paths, folds)
    return out


def _curves_plot(results: pd.DataFrame, pred_dir: Path) -> str:
    """ROC and precision-recall curves, one panel per condition (pooled-sample, pooled-cell, cross_data,
    cross_data k=20, ...), one curve per model."""
    if not pred_dir.is_dir() or "unit_id" not in results.columns:
        return '<p class="muted">No predictions recorded.</p>'
    counts = curve_counts(results, pred_dir)
    if not counts:
        return '<p class="muted">No predictions with both classes to draw ROC curves from.</p>'
    conds = sorted({c for c, _ in counts}, key=_condition_order)
    arms = sorted(results["arm"].unique())
    colors = dict(zip(arms, _colors(len(arms)), strict=True))
    ncols = min(3, len(conds))
    nrows = -(-len(conds) // ncols)
    figs = {kind: Figure(figsize=(4.2 * ncols, 4.0 * nrows)) for kind in ("roc", "pr")}
    drawn = 0
    for i, cond in enumerate(conds):
        ax_roc = figs["roc"].add_subplot(nrows, ncols, i + 1)
        ax_pr = figs["pr"].add_subplot(nrows, ncols, i + 1)
        prevalence = None
        for arm in arms:
            if (cond, arm) not in counts:
                continue
            pos, neg = counts[(cond, arm)]
            roc, pr = _roc(pos, neg), _pr(pos, neg)
            if roc is None or pr is None:
                continue
            fpr, tpr, auc = roc
            ax_roc.plot(fpr, tpr, color=colors[arm], lw=1.5, label=f"{arm} (AUC {auc:.3f})")
            recall, precision, ap, prevalence = pr
            ax_pr.step(recall, precision, where="post", color=colors[arm], lw=1.5, label=f"{arm} (AP {ap:.3f})")
            drawn += 1
        ax_roc.plot([0, 1], [0, 1], color="#999", lw=0.8, ls="--")
        ax_roc.set(title=cond, xlabel="false positive rate", ylabel="true positive rate", aspect="equal")
        if prevalence is not None:
            ax_pr.axhline(prevalence, color="#999", lw=0.8, ls="--")
        ax_pr.set(title=cond, xlabel="recall (sensitive)", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
        for ax in (ax_roc, ax_pr):
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="lower right" if ax is ax_roc else "lower left")
    if drawn == 0:
        return '<p class="muted">No predictions with both classes to draw ROC curves from.</p>'
    return (
        "<h3>ROC</h3>" + _img(figs["roc"], "ROC curves") + _caption(
            "Each model's test predictions of every fold of one condition pooled into one curve (the AUC of that "
            "curve can differ from the mean of per-fold AUROCs); higher and further left is better, the dashed "
            "diagonal is chance.")
        + "<h3>Precision-recall</h3>" + _img(figs["pr"], "precision-recall curves") + _caption(
            "Precision of the cells called sensitive against the share of sensitive cells found, same pooling; "
            "the dashed line is the share of sensitive cells (chance), AP the average precision (AUPRC).")
    )


def _ci_plot(results: pd.DataFrame, metric: str = "auroc") -> str:
    """Every fold's metric with its bootstrap 95% confidence interval, one panel per condition."""
    lo, hi = f"{metric}_ci_low", f"{metric}_ci_high"
    if lo not in results.columns or hi not in results.columns or not results[lo].notna().any():
        return '<p class="muted">No bootstrap intervals (evaluation.bootstrap: 0).</p>'
    conds = sorted(results["condition"].unique(), key=_condition_order)
    arms = sorted(results["arm"].unique())
    colors = dict(zip(arms, _colors(len(arms)), strict=True))
    ncols = min(3, len(conds))
    nrows = -(-len(conds) // ncols)
    fig = Figure(figsize=(max(4.5, 1.1 * len(arms) + 2) * ncols, 3.6 * nrows))
    for i, cond in enumerate(conds):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        sub = results[results["condition"] == cond]
        for j, arm in enumerate(arms):
            g = sub[sub["arm"] == arm]
            v = pd.to_numeric(g[metric], errors="coerce").to_numpy(dtype=float)
            a = pd.to_numeric(g[lo], errors="coerce").to_numpy(dtype=float)
            b = pd.to_numeric(g[hi], errors="coerce").to_numpy(dtype=float)
            ok = np.isfinite(v) & np.isfinite(a) & np.isfinite(b)
            if not ok.any():
                continue
            x = j + np.linspace(-0.25, 0.25, ok.sum()) if ok.sum() > 1 else np.array([float(j)])
            ax.errorbar(x, v[ok], yerr=[np.clip(v[ok] - a[ok], 0, None), np.clip(b[ok] - v[ok], 0, None)], fmt="o",
                        ms=4, capsize=2, color=colors[arm])
            ax.hlines(v[ok].mean(), j - 0.35, j + 0.35, color=colors[arm], lw=2)
        if metric == "auroc":
            ax.axhline(0.5, color="#999", lw=0.8, ls="--")
        ax.set_xticks(range(len(arms)), arms, rotation=30 if len(arms) > 3 else 0,
                      ha="right" if len(arms) > 3 else "center")
        ax.set(ylim=(0, 1.05), title=f"{cond}: {metric.upper()} per fold, 95% CI")
    return _img(fig, f"{metric} per fold with bootstrap confidence intervals") + _caption(
        "One point per fold with its bootstrap 95% interval (test cells resampled), the bar the mean over folds: "
        "intervals that overlap across models mean the data cannot tell them apart.")


def _with_condition(breakdowns: pd.DataFrame, results: pd.DataFrame) -> pd.DataFrame:
    """Breakdown rows with the arm and condition of their own fold (a unit's folds can belong to different
    conditions: cross_data k=0 and k=20), by (unit_id, fold) where both tables have folds."""
    keys = ["unit_id", "fold"] if "fold" in breakdowns.columns and "fold" in results.columns else ["unit_id"]
    folds = results.drop_duplicates(keys).set_index(keys)[["arm", "condition"]]
    return breakdowns.join(folds, on=keys, how="inner")


EMBEDDING_MAP_CELLS = 3000  # cells drawn per embedding map (a seeded sample: memory does not grow with the data)


def _embedding_folders(manifest: dict[str, Any]) -> list[tuple[str, str, Path, Path]]:
    """(data name, model key, cell store, embedding folder) of every finished embedding of the run's data by
    its foundation models and precomputed (obsm) embeddings, found in the run's cache."""
    from scdrugmap_ray.engine.models.base import cache_root

    from .stores import embedding_path

    spec = manifest.get("spec") or {}
    cache = Path(spec["cache"]) if spec.get("cache") else cache_root()
    out = []
    for data in manifest.get("data") or []:
        store_dir = Path(str(data.get("path", "")))
        if not (store_dir / "meta.json").is_file():
            continue
        from scdrugmap_ray.engine.data.store import CellStore

        store = CellStore.open(store_dir)
        for m in manifest.get("models") or []:
            ident = m.get("identity") or {}
            embeds = "checkpoint_sha256" in ident or str(m.get("name", "")).startswith("obsm:")
            folder = embedding_path(cache, store, ident) if embeds else None
            if folder is not None and (folder / "_embedding.json").is_file():
                out.append((str(data.get("name")), str(m.get("name") or m.get("key")), store_dir, folder))
    return out


def _project_2d(x: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D coordinates: UMAP when umap-learn is installed, else the first two principal components."""
    import importlib.util

    x = np.nan_to_num(np.asarray(x, dtype=np.float64))
    if importlib.util.find_spec("umap") is not None and len(x) > 15:
        import umap

        return np.asarray(umap.UMAP(n_components=2, random_state=seed).fit_transform(x)), "UMAP"
    centred = x - x.mean(axis=0)
    _, sv, vt = np.linalg.svd(centred, full_matrices=False)
    share = (sv[:2] ** 2).sum() / max((sv**2).sum(), 1e-12)
    return centred @ vt[:2].T, f"PCA ({share:.0%} of variance)"


def _embedding_maps(manifest: dict[str, Any]) -> str:
    """Per (data, embedding model): its cells in 2-D, coloured by drug-response label and by dataset."""
    from scdrugmap_ray.engine.data.store import CellStore
    from scdrugmap_ray.engine.pipeline.embed import EmbeddingSet

    parts = []
    try:
        folders = _embedding_folders(manifest)
    except (OSError, ValueError, KeyError, UserError) as err:
        log.warning("embedding maps left out: %s", err)
        folders = []
    for data_name, model_key, store_dir, folder in folders:
        store = CellStore.open(store_dir)
        rng = np.random.default_rng(0)
        n = store.n_cells
        rows = np.sort(rng.choice(n, size=min(n, EMBEDDING_MAP_CELLS), replace=False))
        emb = EmbeddingSet(folder).take(rows)
        obs = store.obs(["label", "dataset"]).iloc[rows]
        xy, method = _project_2d(emb)
        fig = Figure(figsize=(10, 4.2))
        label = obs["label"].map({1: "sensitive", 0: "resistant"}).fillna("unlabelled").astype(str).to_numpy()
        dataset = obs["dataset"].astype(str).to_numpy()
        for pos, (title, values) in enumerate((("drug response", label), ("dataset", dataset))):
            ax = fig.add_subplot(1, 2, pos + 1)
            names = sorted(set(values))
            palette = {"sensitive": "#1e88e5", "resistant": "#e53935", "unlabelled": "#bdbdbd"} if pos == 0 else \
                dict(zip(names, _colors(len(names)), strict=True))
            for name in names:
                sel = values == name
                ax.scatter(xy[sel, 0], xy[sel, 1], s=6, alpha=0.7, color=palette.get(name), label=name,
                           linewidths=0)
            ax.set(title=f"coloured by {title}", xticks=[], yticks=[], xlabel=f"{method} 1", ylabel=f"{method} 2")
            if len(names) <= 12:
                ax.legend(fontsize=7, markerscale=2, loc="best")
        fig.suptitle(f"{model_key} on {data_name}")
        parts.append(_img(fig, f"embedding map: {model_key} on {data_name}") + _caption(
            f"{len(rows):,} of {n:,} cells in the {method} of {model_key}'s embeddings: sensitive and resistant cells "
            "apart (left) is what a head can learn; cells grouped by dataset (right) is a batch effect it must "
            "see past."))
    return "".join(parts) or '<p class="muted">No embeddings of foundation models or obsm in this run\'s cache.</p>'


def _breakdown_tables(results: pd.DataFrame, breakdowns: pd.DataFrame) -> str:
    need = {"unit_id", "group_key", "group_value"}
    if breakdowns.empty or not need <= set(breakdowns.columns):
        return '<p class="muted">No breakdowns recorded.</p>'
    bd = _with_condition(breakdowns, results)
    parts = []
    for key in BREAKDOWN_GROUPS:
        sub = bd[(bd["group_key"] == key) & bd["group_value"].notna()]
        if sub.empty:
            continue
        rows = []
        for (arm, cond, value), g in sub.groupby(["arm", "condition", "group_value"], sort=False):
            row: dict[str, Any] = {"model": arm, "scheme": cond, key: value}
            row["n"] = int(_col(g, "n", 0).sum())
            row["n sensitive"] = int(_col(g, "n_sensitive", 0).sum())
            for m in SUMMARY_METRICS:
                row[m] = _mean_sd(g[m]) if m in g.columns else "n/a"
            rows.append(((_condition_order(cond), str(value), arm), row))
        rows.sort(key=lambda r: r[0])
        table = pd.DataFrame([r[1] for r in rows])
        parts.append(f"<h3>By {_esc(key)}</h3>{_table(table)}")
    return "".join(parts) or '<p class="muted">No breakdowns recorded.</p>'


def _unit_table(results: pd.DataFrame) -> str:
    cols = [
        c
        for c in ("unit_id", "model", "head", "strategy", "scheme", "split", "fold", "fold_name", "seed",
                  "test_dataset", "few_shot_k", "n_train", "n_val", "n_test", "n_test_sensitive")
        if c in results.columns
    ]
    table = results[cols].copy()
    for m in ALL_METRICS:
        lo = _col(results, f"{m}_ci_low", np.nan)
        hi = _col(results, f"{m}_ci_high", np.nan)
        table[m] = [
            _num(v) if _num(v) == "n/a" or _num(a) == "n/a" else f"{_num(v)} [{_num(a)}, {_num(b)}]"
            for v, a, b in zip(results[m], lo, hi, strict=True)
        ]
    for c in ("fit_seconds", "predict_seconds"):
        if c in results.columns:
            table[c] = [_num(v, 2) for v in results[c]]
    return _table(table, fold_title=f"Every fold ({len(table)} rows; metrics with bootstrap 95% CI)")


def _manifest_section(results: pd.DataFrame, manifest: dict[str, Any]) -> str:
    parts = []
    if not manifest:
        parts.append('<p class="muted">manifest.json not found: the run may not have finished.</p>')
    else:
        info = pd.DataFrame(
            [(k, manifest.get(k, "")) for k in ("name", "started", "finished")], columns=["field", "value"]
        )
        parts.append(_table(info))
        versions = manifest.get("versions") or {}
        if versions:
            frame = pd.DataFrame([(k, str(v)) for k, v in versions.items()], columns=["package", "version"])
            parts.append("<h3>Versions</h3>" + _table(frame))
        data = manifest.get("data") or []
        if data:
            parts.append("<h3>Data</h3>" + _table(pd.DataFrame(data).astype(str)))
        models = manifest.get("models") or []
        if models:
            frame = pd.DataFrame(models)
            if "identity" in frame.columns:
                frame["identity"] = [json.dumps(v, sort_keys=True, default=str) for v in frame["identity"]]
            parts.append("<h3>Models</h3>" + _table(frame.astype(str)))
    if "fit_seconds" in results.columns:
        rows = []
        for arm, g in results.assign(_p=_col(results, "predict_seconds", np.nan)).groupby("arm"):
            rows.append(
                {
                    "model": arm,
                    "folds": len(g),
                    "fit s (total)": _num(g["fit_seconds"].sum(), 2),
                    "fit s (mean/fold)": _num(g["fit_seconds"].mean(), 2),
                    "predict s (total)": _num(g["_p"].sum(min_count=1), 2),
                }
            )
        parts.append("<h3>Timing</h3>" + _table(pd.DataFrame(rows)))
    return "".join(parts)


# ---------------------------------------------------------------------------------------------- page


def _page(title: str, subtitle: str, banner: str, sections: Sequence[tuple[str, str]]) -> str:
    body = "".join(f"<h2>{_esc(name)}</h2>{content}" for name, content in sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_esc(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{_esc(title)}</h1><p class=\"sub\">{_esc(subtitle)}</p>{banner}{body}</body></html>\n"
    )


def build_report(run_dir: Path) -> Path:
    """Write ``run_dir/report.html`` (atomically) from the run's result files; return its path."""
    run_dir = Path(run_dir)
    results_path = run_dir / "results.parquet"
    if not results_path.exists():
        raise UserError(f"{run_dir} has no results.parquet; is it the output directory of `scdrugmap-ray run`?")
    results = annotate(pd.read_parquet(results_path))
    breakdowns = _read_parquet(run_dir / "breakdowns.parquet")
    manifest = _read_manifest(run_dir)
    for m in ALL_METRICS:  # an absent metric column reads as n/a everywhere
        if m not in results.columns:
            results[m] = np.nan

    name = manifest.get("name") or run_dir.name
    when = manifest.get("finished") or datetime.fromtimestamp(results_path.stat().st_mtime, UTC).isoformat(
        timespec="seconds"
    )
    subtitle = f"run {name} · {run_dir} · finished {when} · {len(results)} folds"

    banner = ""
    random = _random_weight_models(results, manifest)
    if random:
        banner = (
            f'<div class="banner">RANDOM WEIGHTS: {_esc(", ".join(random))} ran on random, untrained weights. '
            "Their scores mean nothing; they only show that the pipeline runs.</div>"
        )

    if results.empty:
        sections = [("Results", '<p class="muted">results.parquet has no rows.</p>')]
    else:
        sections = [
            ("Summary (mean ± sd over folds and seeds)", _summary(results) + _leakage_note(results)),
            ("Scheme comparison", _scheme_plot(results)),
            ("Confidence intervals", _ci_plot(results)),
            ("F1 and AUROC by dataset", _heatmaps(results, breakdowns)),
            ("ROC and precision-recall curves", _curves_plot(results, run_dir / "predictions")),
            ("Embedding maps", _embedding_maps(manifest)),
            ("Breakdowns (mean ± sd over folds)", _breakdown_tables(results, breakdowns)),
            ("Per fold", _unit_table(results)),
        ]
    sections.append(("Run", _manifest_section(results, manifest)))

    out = run_dir / REPORT
    with atomic_file(out) as tmp:
        tmp.write_text(_page(f"scdrugmap-ray benchmark: {name}", subtitle, banner, sections), encoding="utf-8")
    log.info("wrote %s", out)
    return out
