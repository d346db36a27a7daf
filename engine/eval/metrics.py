"""Classification metrics, bootstrap confidence intervals and per-group breakdowns.

Sensitive (label 1) is the positive class of F1, precision and recall, as in scDrugMap. Metrics that
need both classes in the truth (AUROC, AUPRC, macro-F1) are NaN when one is missing; F1, precision and
recall use zero_division = 0 (sklearn's convention); everything is NaN for an empty set.

All metrics are computed from per-cell weights, so one vectorised code path serves the point
estimate (weights 1) and the bootstrap (weights = how often each cell was drawn, a batch of
resamples at once). AUROC is the tie-aware Mann-Whitney statistic and AUPRC is sklearn's
average precision (step-wise, one threshold per distinct score); tests check both against sklearn.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

METRICS = ("f1", "macro_f1", "accuracy", "precision", "recall", "auroc", "auprc")
GROUP_KEYS = ("dataset", "cancer_type", "tissue", "therapy", "regimen")

_BOOT_CHUNK = 64  # resamples per vectorised batch: bounds memory at ~chunk x n float64


def _div(a: np.ndarray, b: np.ndarray, fill: float) -> np.ndarray:
    out = np.full(np.broadcast(a, b).shape, fill, dtype=np.float64)
    np.divide(a, b, out=out, where=b != 0)
    return out


class _Prepared:
    """Per-call precomputation shared by every batch of weights: score order and tie groups."""

    def __init__(self, y_true: np.ndarray, p: np.ndarray, threshold: float) -> None:
        y = np.asarray(y_true).astype(np.float64).ravel()
        p = np.asarray(p, dtype=np.float64).ravel()
        if y.shape != p.shape:
            raise ValueError(f"y_true has {y.size} values but p_sensitive has {p.size}")
        if np.isnan(p).any() or np.isnan(y).any():
            raise ValueError("y_true and p_sensitive must not contain NaN")
        self.n = y.size
        self.order = np.argsort(p, kind="stable")
        ps = p[self.order]
        self.ys = y[self.order]
        self.starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]]) if self.n else np.empty(0, dtype=np.int64)
        pred = (p >= threshold).astype(np.float64)
        # columns: tp, fp, fn, tn indicators per cell
        self.cells = np.stack([y * pred, (1 - y) * pred, y * (1 - pred), (1 - y) * (1 - pred)], axis=1)

    def metrics(self, w: np.ndarray) -> dict[str, np.ndarray]:
        """Metrics for each row of weights ``w`` [B, n]; returns arrays of length B."""
        tp, fp, fn, tn = (w @ self.cells).T
        total = tp + fp + fn + tn
        n_pos, n_neg = tp + fn, fp + tn
        both = (n_pos > 0) & (n_neg > 0)
        f1 = _div(2 * tp, 2 * tp + fp + fn, 0.0)
        f1_neg = _div(2 * tn, 2 * tn + fn + fp, 0.0)
        out = {
            "f1": f1,
            "macro_f1": np.where(both, (f1 + f1_neg) / 2, np.nan),
            "accuracy": _div(tp + tn, total, np.nan),
            "precision": _div(tp, tp + fp, 0.0),
            "recall": _div(tp, n_pos, 0.0),
        }
        if self.n:
            ws = w[:, self.order]
            pos = np.add.reduceat(ws * self.ys, self.starts, axis=1)  # [B, distinct scores], ascending
            neg = np.add.reduceat(ws * (1 - self.ys), self.starts, axis=1)
            neg_below = np.cumsum(neg, axis=1) - neg
            auroc = (pos * (neg_below + 0.5 * neg)).sum(axis=1) / np.where(both, n_pos * n_neg, 1)
            pos_d, neg_d = pos[:, ::-1], neg[:, ::-1]  # thresholds from the highest score down
            tp_c, fp_c = np.cumsum(pos_d, axis=1), np.cumsum(neg_d, axis=1)
            prec = _div(tp_c, tp_c + fp_c, 0.0)
            auprc = (pos_d * prec).sum(axis=1) / np.where(both, n_pos, 1)
        else:
            auroc = auprc = np.zeros(len(w))
        out["auroc"] = np.where(both, auroc, np.nan)
        out["auprc"] = np.where(both, auprc, np.nan)
        empty = total == 0
        return {k: np.where(empty, np.nan, v) for k, v in out.items()}


def compute_metrics(y_true: np.ndarray, p_sensitive: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """The 7 metrics of one set of predictions; a cell is predicted sensitive when p >= threshold."""
    prep = _Prepared(y_true, p_sensitive, threshold)
    res = prep.metrics(np.ones((1, prep.n)))
    return {m: float(res[m][0]) for m in METRICS}


def bootstrap_ci(
    y_true: np.ndarray,
    p: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    threshold: float = 0.5,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap interval of every metric, resampling cells with replacement.

    Resamples where a metric is undefined (e.g. one class drawn) are left out of its interval; a
    metric undefined in every resample gets (NaN, NaN).
    """
    prep = _Prepared(y_true, p, threshold)
    n = prep.n
    if n == 0 or n_boot <= 0:
        return {m: (np.nan, np.nan) for m in METRICS}
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {m: [] for m in METRICS}
    for start in range(0, n_boot, _BOOT_CHUNK):
        b = min(_BOOT_CHUNK, n_boot - start)
        idx = rng.integers(0, n, size=(b, n))
        # a resample as draw counts per cell: same metrics as indexing, without copying scores
        counts = np.bincount((idx + (np.arange(b) * n)[:, None]).ravel(), minlength=b * n).reshape(b, n)
        res = prep.metrics(counts.astype(np.float64))
        for m in METRICS:
            parts[m].append(res[m])
    out: dict[str, tuple[float, float]] = {}
    for m in METRICS:
        vals = np.concatenate(parts[m])
        vals = vals[~np.isnan(vals)]
        if vals.size == 0:
            out[m] = (np.nan, np.nan)
        else:
            lo, hi = np.percentile(vals, [100 * alpha / 2, 100 * (1 - alpha / 2)])
            out[m] = (float(lo), float(hi))
    return out


def breakdown(df: pd.DataFrame, by: Sequence[str] = GROUP_KEYS, threshold: float = 0.5) -> pd.DataFrame:
    """Metrics per value of each grouping column (``df`` has y_true, p_sensitive and the group columns).

    Columns: group_key, group_value, n, n_sensitive and the 7 metrics. Cells whose group value is null
    are left out of that key's groups; columns missing from ``df`` are skipped.
    """
    rows: list[dict[str, object]] = []
    for key in by:
        if key not in df.columns:
            continue
        col = df[key]
        valid = col.notna()
        for value, part in df[valid].groupby(col[valid].astype(str), sort=True):
            y = part["y_true"].to_numpy()
            rows.append({
                "group_key": key,
                "group_value": str(value),
                "n": len(part),
                "n_sensitive": int((y == 1).sum()),
                **compute_metrics(y, part["p_sensitive"].to_numpy(), threshold),
            })
    columns = ["group_key", "group_value", "n", "n_sensitive", *METRICS]
    out = pd.DataFrame(rows, columns=columns)
    return out.astype({"n": np.int64, "n_sensitive": np.int64, **{m: np.float64 for m in METRICS}})
