"""Differential expression between two groups of cells: Wilcoxon rank-sum per gene, Benjamini-Hochberg.

Values are log1p(CP10k) of raw counts (or the stored values when they are not counts). The test is
the two-sided Mann-Whitney U with tie correction and continuity correction, the normal approximation
(what ``scipy.stats.mannwhitneyu(method="asymptotic")`` and scanpy's ``rank_genes_groups(method=
"wilcoxon")`` compute), evaluated on the sparse matrix: zeros form one tie group whose average rank is
known without ranking them, so only the non-zero values of each gene are ranked and nothing is
densified. q-values: ``scipy.stats.false_discovery_control`` (BH).

Effect sizes: ``log2fc`` as scanpy defines it, log2((expm1(mean_a) + 1e-9) / (expm1(mean_b) + 1e-9))
from the means of the log values; ``auc`` = U_a / (n_a n_b), the probability that a random cell of
group a expresses the gene more than one of group b (0.5: no difference); ``pct_a``/``pct_b``: the
fraction of cells expressing it.

Memory is bounded by the caller: it passes at most ``max_cells`` cells per group (see ``sample_rows``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats

TARGET_SUM = 1e4


def log_normalize(x: sp.csr_matrix, counts: bool = True) -> sp.csr_matrix:
    """log1p(CP10k) of raw counts (a copy); other values are returned as float32 as they are."""
    x = sp.csr_matrix(x, dtype=np.float32, copy=True)
    if not counts:
        return x
    sums = np.asarray(x.sum(axis=1), dtype=np.float64).ravel()
    scale = np.divide(TARGET_SUM, sums, out=np.zeros_like(sums), where=sums > 0)
    x.data *= np.repeat(scale, np.diff(x.indptr)).astype(np.float32)
    np.log1p(x.data, out=x.data)
    return x


def sample_rows(rows: np.ndarray, max_cells: int | None, seed: int) -> np.ndarray:
    """At most ``max_cells`` of ``rows`` (a seeded random subset, kept in their order)."""
    rows = np.asarray(rows)
    if max_cells is None or len(rows) <= max_cells:
        return rows
    pick = np.sort(np.random.default_rng(seed).choice(len(rows), size=max_cells, replace=False))
    return rows[pick]


def rank_sum_test(
    x: sp.spmatrix, in_a: np.ndarray, clusters: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(U statistic of group a, two-sided p-value, design effect) per gene (column) of ``x`` for group a
    (``in_a``) vs the rest. Without ``clusters``: the numbers of scipy.stats.mannwhitneyu(...,
    method="asymptotic", use_continuity=True), design effect 1.

    With ``clusters`` (the sample of each cell): cells of one sample are not independent (labels are
    per sample, and samples differ), so the variance of U is multiplied by the design effect
    1 + (m - 1) * ICC, with m the mean cells per (sample, group) and ICC the intra-sample correlation
    of the gene's ranks, estimated by one-way ANOVA of the ranks on (sample, group) after removing the
    group means (Rosner, Glynn & Lee 2003, Biometrics 59:1089, "clustered Wilcoxon rank-sum test"), and
    the statistic is referred to Student's t with (number of (sample, group) sets - 2) degrees of freedom
    (few samples carry the evidence; the normal would be overconfident).
    Genes whose ICC cannot be estimated (one sample per group) get p = NaN."""
    x = sp.csc_matrix(x, dtype=np.float64, copy=True)
    x.eliminate_zeros()  # explicit zeros belong to the zero tie group
    in_a = np.asarray(in_a, dtype=bool)
    n, n_genes = x.shape
    n_a = int(in_a.sum())
    n_b = n - n_a
    u = np.full(n_genes, np.nan)
    p = np.full(n_genes, np.nan)
    deff = np.ones(n_genes)
    if n_a == 0 or n_b == 0:
        return u, p, deff
    # Rank the non-zero values of every gene at once: sort by (gene, value); ties get their average rank.
    nnz = np.diff(x.indptr)
    col = np.repeat(np.arange(n_genes), nnz)
    order = np.lexsort((x.data, col))
    col, val, row = col[order], x.data[order], x.indices[order]
    new = np.ones(len(val), dtype=bool)
    new[1:] = (col[1:] != col[:-1]) | (val[1:] != val[:-1])
    starts = np.flatnonzero(new)
    sizes = np.diff(np.append(starts, len(val))).astype(np.float64)
    group = np.cumsum(new) - 1
    pos_in_col = np.arange(len(val)) - x.indptr[col]
    n_zero = (n - nnz).astype(np.float64)
    n_neg = np.bincount(col[val < 0], minlength=n_genes).astype(np.float64)
    ranks = (pos_in_col[starts] + (sizes + 1) / 2.0)[group] + np.where(val > 0, n_zero[col], 0.0)
    zero_rank = n_neg + (n_zero + 1) / 2.0
    a_nz = in_a[row]
    n_a_zero = n_a - np.bincount(col[a_nz], minlength=n_genes)
    r_a = np.bincount(col[a_nz], weights=ranks[a_nz], minlength=n_genes) + n_a_zero * zero_rank
    u = r_a - n_a * (n_a + 1) / 2.0
    ties = np.bincount(col[starts], weights=sizes**3 - sizes, minlength=n_genes) + n_zero**3 - n_zero
    var = n_a * n_b / 12.0 * ((n + 1) - ties / (n * (n - 1)))
    if clusters is not None:
        # one id per (cluster, group) cell set: the ANOVA cells
        _, cg = np.unique(np.stack([pd.factorize(np.asarray(clusters))[0], in_a.astype(int)]), axis=1,
                          return_inverse=True)
        cg = cg.ravel()
        n_cg = np.bincount(cg).astype(np.float64)
        n_c = len(n_cg)
        cg_is_a = np.zeros(n_c, bool)
        cg_is_a[cg[in_a]] = True
        df_b, df_w = n_c - 2, n - n_c
        if df_b <= 0 or df_w <= 0:
            return u, p, np.full(n_genes, np.nan)  # one sample per group: no sample-level inference
        m0 = (n - float((n_cg**2).sum()) / n) / (n_c - 1)
        key = col * n_c + cg[row]
        nz_cg = np.bincount(key, minlength=n_genes * n_c).reshape(n_genes, n_c)
        zeros_cg = n_cg[None, :] - nz_cg
        s1 = np.bincount(key, weights=ranks, minlength=n_genes * n_c).reshape(n_genes, n_c)
        s1 += zeros_cg * zero_rank[:, None]
        s2 = np.bincount(key, weights=ranks**2, minlength=n_genes * n_c).reshape(n_genes, n_c)
        s2 += zeros_cg * (zero_rank**2)[:, None]
        mean_cg = s1 / n_cg[None, :]
        ssw = np.sum(s2 - s1 * mean_cg, axis=1)
        mu_a = s1[:, cg_is_a].sum(axis=1) / n_cg[cg_is_a].sum()
        mu_b = s1[:, ~cg_is_a].sum(axis=1) / n_cg[~cg_is_a].sum()
        ssb = np.sum(n_cg[None, :] * (mean_cg - np.where(cg_is_a[None, :], mu_a[:, None], mu_b[:, None])) ** 2, axis=1)
        msb, msw = ssb / df_b, np.maximum(ssw, 0.0) / df_w
        denom = msb + (m0 - 1) * msw
        icc = np.divide(msb - msw, denom, out=np.zeros(n_genes), where=denom > 0)
        deff = 1.0 + (m0 - 1) * np.clip(icc, 0.0, 1.0)
        var = var * deff
    z = np.divide(np.abs(u - n_a * n_b / 2.0) - 0.5, np.sqrt(np.maximum(var, 0.0)),
                  out=np.zeros(n_genes), where=var > 0)  # continuity correction towards the mean
    # with samples, the evidence comes from a handful of them: Student's t with (samples - 2) degrees of
    # freedom instead of the normal, as for cluster-level inference with few clusters
    tail = stats.t(df_b).sf(z) if clusters is not None else stats.norm.sf(z)
    p = np.where(z > 0, np.minimum(1.0, 2.0 * tail), 1.0)  # var 0: every cell has the same value
    return u, p, deff


def bh(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg q-values (NaN p-values stay NaN and do not count as tests)."""
    q = np.full(len(p), np.nan)
    ok = ~np.isnan(p)
    if ok.any():
        q[ok] = stats.false_discovery_control(p[ok], method="bh")
    return q


def wilcoxon_de(
    x: sp.spmatrix, in_a: np.ndarray, genes: pd.Series | list[str], samples: np.ndarray | None = None
) -> pd.DataFrame:
    """DE of group a vs group b (the other cells): one row per gene, ranked (smallest q first, then the
    largest |log2fc|). ``x`` holds log-normalised values [cells, genes]. With ``samples`` (each cell's
    sample), ``pvalue``/``qvalue`` correct for the cells of one sample being correlated (see
    ``rank_sum_test``) and ``pvalue_cells``/``qvalue_cells`` treat cells as independent (what most
    single-cell tools report: with sample-level labels it finds sample differences, not drug response);
    without ``samples`` both are the independent-cells test. Where the sample-aware test cannot be done
    (one sample per group), ``pvalue``/``qvalue`` are NaN."""
    x = sp.csr_matrix(x)
    in_a = np.asarray(in_a, dtype=bool)
    a, b = x[in_a], x[~in_a]
    n_a, n_b = a.shape[0], b.shape[0]
    mean_a = np.asarray(a.mean(axis=0)).ravel() if n_a else np.zeros(x.shape[1])
    mean_b = np.asarray(b.mean(axis=0)).ravel() if n_b else np.zeros(x.shape[1])
    pct_a = np.asarray((a != 0).sum(axis=0)).ravel() / max(n_a, 1)
    pct_b = np.asarray((b != 0).sum(axis=0)).ravel() / max(n_b, 1)
    u, p_cells, _ = rank_sum_test(x, in_a)
    p, deff = rank_sum_test(x, in_a, samples)[1:] if samples is not None else (p_cells, np.ones(len(p_cells)))
    lfc = np.log2((np.expm1(mean_a) + 1e-9) / (np.expm1(mean_b) + 1e-9))
    out = pd.DataFrame(
        {
            "gene": list(genes),
            "log2fc": lfc,
            "auc": u / (n_a * n_b) if n_a and n_b else np.nan,
            "mean_a": mean_a,
            "mean_b": mean_b,
            "pct_a": pct_a,
            "pct_b": pct_b,
            "pvalue": p,
            "qvalue": bh(p),
            "n_a": n_a,
            "n_b": n_b,
        }
    )
    out["pvalue_cells"] = p_cells
    out["qvalue_cells"] = bh(p_cells)
    out["design_effect"] = deff
    out["gene_position"] = np.arange(len(out), dtype=np.int64)
    order = np.lexsort((-np.abs(np.nan_to_num(out["log2fc"].to_numpy())), np.nan_to_num(out["qvalue_cells"], nan=2.0),
                        np.nan_to_num(out["qvalue"], nan=2.0)))
    out = out.iloc[order].reset_index(drop=True)
    out.insert(1, "rank", np.arange(1, len(out) + 1))
    return out
