"""``explain.html``: one self-contained page (inline CSS, matplotlib PNGs as base64, no scripts) with the
biomarker tables and plots of one explained unit. Values from user data are HTML-escaped."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..fsutil import atomic_file
from .de import log_normalize, sample_rows

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; padding: 0 1em; }
h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
.banner { background: #c62828; color: #fff; font-weight: bold; padding: 0.8em 1em; border-radius: 6px; }
.note { background: #fff8e1; border-left: 5px solid #f9a825; padding: 0.6em 1em; margin: 1em 0; }
table.t { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1em 0; }
table.t th, table.t td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
table.t th { background: #f3f3f3; } table.t td:first-child, table.t th:first-child { text-align: left; }
img { max-width: 100%; display: block; margin: 0.5em 0 1.5em 0; }
"""
RES_COLOR, SENS_COLOR = "#c62828", "#1565c0"
LFC_EDGE = 6.0


def _esc(v: Any) -> str:
    return html.escape(str(v))


def _table(df: pd.DataFrame, max_rows: int = 40) -> str:
    if df is None or df.empty:
        return "<p><i>none</i></p>"
    df = df.head(max_rows)
    head = "".join(f"<th>{_esc(c)}</th>" for c in df.columns)

    def cell(v: Any) -> str:
        if isinstance(v, float | np.floating):
            return "n/a" if np.isnan(v) else (f"{v:.3g}" if abs(v) < 1e-2 and v != 0 else f"{v:.3f}")
        return _esc(v)

    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in df.itertuples(index=False))
    return f'<table class="t"><tr>{head}</tr>{body}</table>'


def _img(fig: Figure, alt: str) -> str:
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _bar(table: pd.DataFrame, value: str, title: str, planted: dict[str, float], top: int) -> str:
    t = table.head(top)
    fig = Figure(figsize=(8, max(3.0, 0.25 * len(t) + 1)))
    ax = fig.add_subplot()
    colors = [RES_COLOR if d == "resistant" else SENS_COLOR for d in t.get("direction", ["sensitive"] * len(t))]
    labels = [f"{g} *" if g in planted else str(g) for g in t["gene"]]
    ax.barh(range(len(t))[::-1], t[value].to_numpy(), color=colors)
    ax.set_yticks(range(len(t))[::-1], labels, fontsize=8)
    ax.set_xlabel(value)
    ax.set_title(title + ("  (* planted)" if planted else "") + "\nred: argues for resistant, blue: for sensitive",
                 fontsize=9)
    fig.tight_layout()
    return _img(fig, title)


def _volcano(de: pd.DataFrame, planted: dict[str, float], top: int) -> str:
    fig = Figure(figsize=(11, 4.5))
    for i, comp in enumerate(("true", "predicted")):
        ax = fig.add_subplot(1, 2, i + 1)
        d = de[(de.level == "all") & (de.comparison == comp)]
        if d.empty:
            ax.set_title(f"{comp} classes: not enough cells")
            continue
        y = -np.log10(d["qvalue"].clip(lower=1e-300).fillna(1.0)).to_numpy()
        # genes absent from one class have |log2fc| ~ 30 (scanpy's 1e-9 pseudo-count): drawn at the edge
        lfc = d["log2fc"].clip(-LFC_EDGE, LFC_EDGE).to_numpy()
        is_pl = d["gene"].isin(list(planted)).to_numpy()
        ax.scatter(lfc, y, s=4, c="#999", label="gene")
        if is_pl.any():
            ax.scatter(lfc[is_pl], y[is_pl], s=8, c="#ef6c00", label="planted")
        for i in range(min(top, 10, len(d))):
            ax.annotate(str(d["gene"].iloc[i]), (lfc[i], y[i]), fontsize=6)
        ax.axhline(-np.log10(0.05), ls="--", c="k", lw=0.6)
        ax.set_xlabel(f"log2 FC, resistant vs sensitive (clipped at +-{LFC_EDGE})")
        ax.set_ylabel("-log10 q (BH)")
        ax.set_title(f"DE by {comp} class (all cells)", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _img(fig, "volcano plots")


def _distributions(store: Any, pred_rows: np.ndarray, preds_y: np.ndarray, genes: list[str]) -> str:
    if not genes:
        return ""
    symbols = store.genes.sort_values("position")["symbol"].astype(str).tolist()
    pos = [symbols.index(g) for g in genes if g in symbols]
    pick = sample_rows(np.arange(len(pred_rows)), 2000, 0)
    x = log_normalize(store.read_csr(pred_rows[pick]), counts=store.is_counts)[:, pos].toarray()
    y = preds_y[pick]
    fig = Figure(figsize=(min(2.0 * len(pos) + 1, 14), 3.5))
    ax = fig.add_subplot()
    data, ticks = [], []
    for j in range(len(pos)):
        data += [x[y == 0, j], x[y == 1, j]]
        ticks += [3 * j + 1, 3 * j + 2]
    parts = ax.violinplot([d if len(d) else np.zeros(1) for d in data], positions=ticks, showmedians=True)
    for k, body in enumerate(parts["bodies"]):
        body.set_facecolor(RES_COLOR if k % 2 == 0 else SENS_COLOR)
    ax.set_xticks([3 * j + 1.5 for j in range(len(pos))], genes[: len(pos)], fontsize=8)
    ax.set_ylabel("log1p CP10k")
    ax.set_title("top biomarkers by true class (red: resistant, blue: sensitive)", fontsize=10)
    fig.tight_layout()
    return _img(fig, "per-gene distributions")


def _samples_plot(samples: pd.DataFrame) -> str:
    if samples.empty:
        return ""
    s = samples.sort_values(["label", "predicted_resistant_fraction"])
    fig = Figure(figsize=(max(5.0, 0.3 * len(s) + 2), 3.5))
    ax = fig.add_subplot()
    ax.bar(range(len(s)), s["predicted_resistant_fraction"],
           color=[RES_COLOR if lab == "resistant" else SENS_COLOR for lab in s["label"]])
    ax.set_xticks(range(len(s)), s["sample"].astype(str), rotation=90, fontsize=7)
    ax.set_ylabel("predicted resistant fraction")
    ax.set_title("per sample (bar colour: the sample's label; red resistant, blue sensitive)", fontsize=10)
    fig.tight_layout()
    return _img(fig, "resistant fraction per sample")


def _scatter(preds: pd.DataFrame, xy: np.ndarray, model: str) -> str:
    if len(preds) == 0:
        return ""
    fig = Figure(figsize=(11, 4.5))
    ax = fig.add_subplot(1, 2, 1)
    ax.scatter(xy[:, 0], xy[:, 1], s=3, c=np.where(preds["y_true"] == 1, SENS_COLOR, RES_COLOR), alpha=0.5)
    ax.set_title("sample label (blue sensitive, red resistant)", fontsize=10)
    ax2 = fig.add_subplot(1, 2, 2)
    disc = (preds["y_pred"] != preds["y_true"]).to_numpy()
    ax2.scatter(xy[~disc, 0], xy[~disc, 1], s=3, c="#bbb", alpha=0.5, label="agrees with sample label")
    res_in_sens = disc & (preds["y_true"] == 1).to_numpy()
    ax2.scatter(xy[res_in_sens, 0], xy[res_in_sens, 1], s=5, c=RES_COLOR, label="predicted resistant, sensitive sample")
    sens_in_res = disc & (preds["y_true"] == 0).to_numpy()
    ax2.scatter(xy[sens_in_res, 0], xy[sens_in_res, 1], s=5, c=SENS_COLOR,
                label="predicted sensitive, resistant sample")
    ax2.legend(fontsize=7)
    ax2.set_title("cells whose prediction disagrees with their sample", fontsize=10)
    fig.suptitle(f"2-D view ({model})", fontsize=10)
    fig.tight_layout()
    return _img(fig, "2-D embedding")


def write_explain_html(path: Path, *, summary: dict[str, Any], attr: pd.DataFrame, coef: pd.DataFrame,
                       de: pd.DataFrame, bio: pd.DataFrame, bio_summary: pd.DataFrame, samples: pd.DataFrame,
                       disc: pd.DataFrame, preds: pd.DataFrame, xy: np.ndarray, store: Any, pred_rows: np.ndarray,
                       planted: dict[str, float], top: int) -> Path:
    parts = [f"<h1>Explain: {_esc(summary['unit_id'])}</h1>"]
    if summary.get("random_weights"):
        parts.append('<div class="banner">RANDOM WEIGHTS: this model is not pretrained; its attributions carry no '
                     "biology.</div>")
    for n in summary.get("notes", []):
        parts.append(f'<div class="note">{_esc(n)}</div>')
    info = {k: summary[k] for k in ("model", "strategy", "head", "method", "n_folds", "n_attributed_cells",
                                    "completeness_error_median", "refit_max_abs_diff") if k in summary}
    parts.append(_table(pd.DataFrame([info])))
    rec = summary.get(f"precision_at_{top}") or {}
    if rec:
        parts.append(f"<h2>Planted resistance genes ({summary['planted_genes']}) recovered: precision@{top}</h2>")
        parts.append(_table(pd.DataFrame([rec])))
    all_attr = attr[attr.level == "all"] if not attr.empty else attr
    parts.append("<h2>Gene attributions</h2>")
    if not all_attr.empty:
        parts.append(_bar(all_attr, "importance", f"top {top} genes by mean |attribution|", planted, top))
        parts.append(_table(all_attr.drop(columns=["level", "group"]).head(top)))
    if not coef.empty:
        parts.append(_bar(coef, "abs_coefficient", "linear model's own per-gene weights", planted, top))
    parts.append("<h2>Differential expression, resistant vs sensitive (true and predicted classes)</h2>")
    parts.append(_volcano(de, planted, top))
    parts.append("<h2>Biomarkers</h2><p>Top genes per group (mean of attribution and DE rank); "
                 f"<code>agree</code>: in the top {top} of both rankings.</p>")
    parts.append(_table(bio_summary))
    bio_all = bio[bio.level == "all"] if not bio.empty else bio
    parts.append(_table(bio_all.drop(columns=["level", "group"], errors="ignore")))
    parts.append(_distributions(store, pred_rows, _true_labels(store, pred_rows), bio_all["gene"].head(6).tolist()))
    parts.append("<h2>Resistance analysis</h2>")
    parts.append(_samples_plot(samples))
    parts.append(_table(samples))
    parts.append(_scatter(preds, xy, str(summary["model"])))
    parts.append(f"<p>{len(disc)} cells disagree with their sample's label (first 30 below; all in "
                 "<code>discordant_cells.parquet</code>).</p>")
    parts.append(_table(disc[[c for c in ("cell_id", "dataset", "sample", "y_true", "p_sensitive", "kind")
                              if c in disc.columns]], 30))
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_esc(summary['unit_id'])}</title>"
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>")
    with atomic_file(path) as tmp:
        tmp.write_text(page)
    return path


def _true_labels(store: Any, pred_rows: np.ndarray) -> np.ndarray:
    """True classes of all predicted cells, in pred_rows order (labels from the store)."""
    labels = store.obs(["label"])["label"].to_numpy()
    return np.nan_to_num(labels[pred_rows], nan=-1).astype(int)
