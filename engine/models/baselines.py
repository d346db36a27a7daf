"""Baseline models: what every foundation model has to beat.

* ``pca-logreg``: log1p(CP10k) -> PCA fitted on the fold's training cells -> logistic regression.
* ``hvg-mlp``: log1p(CP10k) -> highly variable genes chosen on the training cells (Seurat-flavour
  dispersion ranking) -> their log-expression -> scDrugMap's MLP head.
* ``obsm:<key>``: embeddings precomputed by someone else and stored in the .h5ad's ``obsm``
  (e.g. published scFoundation embeddings) -> MLP head.

Normalisation (``normalize``): ``auto`` normalises when the values are raw counts (every value a
non-negative integer, decided on the training cells) and otherwise uses the values as they are,
assuming they are already normalised; ``true`` / ``false`` force it.

Nothing here densifies a cells x genes matrix: PCA works on the sparse matrix with implicit centering
(ARPACK), HVG statistics are sparse column sums, and transforms produce only [cells, features].
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import UserError
from .base import EmbeddingModel, FittedFeatureModel, Model, register, register_prefix

log = logging.getLogger(__name__)


def is_counts(x: sp.csr_matrix) -> bool:
    """True when every stored value is a non-negative integer (raw counts)."""
    data = x.data
    return bool(data.size == 0 or (np.all(data >= 0) and np.all(data == np.rint(data))))


def scale_rows(x: sp.csr_matrix, target_sum: float, sums: np.ndarray | None = None) -> sp.csr_matrix:
    """Each cell scaled to ``target_sum`` total (CP10k by default); empty cells stay zero. Returns a copy.

    ``sums`` are the cells' totals over ALL genes (pass them when ``x`` holds a subset of columns)."""
    x = sp.csr_matrix(x, dtype=np.float32, copy=True)
    if sums is None:
        sums = np.asarray(x.sum(axis=1), dtype=np.float64).ravel()
    scale = np.divide(target_sum, sums, out=np.zeros_like(sums), where=sums > 0)
    x.data *= np.repeat(scale, np.diff(x.indptr)).astype(np.float32)
    return x


def log1p_inplace(x: sp.csr_matrix) -> sp.csr_matrix:
    np.log1p(x.data, out=x.data)
    return x


class _Normalizing(FittedFeatureModel):
    """Shared normalisation decision and state for the fitted baselines."""

    default_options: ClassVar[dict[str, Any]] = {"target_sum": 1e4, "normalize": "auto", "fit_cells": 200_000}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        fit_cells = self.options["fit_cells"]
        if isinstance(fit_cells, bool) or not isinstance(fit_cells, int) or fit_cells < 2:
            raise UserError(f"model {self.name!r}: fit_cells must be a whole number >= 2, got {fit_cells!r}")
        if self.options["normalize"] not in ("auto", True, False):
            raise UserError(f"model {self.name!r}: normalize must be auto, true or false, got "
                            f"{self.options['normalize']!r}")
        self.normalize: bool | None = None
        self.gene_symbols: list[str] = []
        self.n_genes: int = 0

    def _decide(self, train: sp.csr_matrix, genes: pd.DataFrame) -> None:
        opt = self.options["normalize"]
        if opt == "auto":
            self.normalize = is_counts(train)
            if not self.normalize:
                log.info("%s: values are not raw counts, so they are used as they are (no log1p CP10k)", self.name)
        else:
            self.normalize = bool(opt)
        self.n_genes = train.shape[1]
        sym = genes["symbol"] if "symbol" in genes.columns else pd.Series(range(self.n_genes))
        self.gene_symbols = sym.astype(str).tolist()

    def _check(self, cells: sp.csr_matrix) -> sp.csr_matrix:
        if self.normalize is None:
            raise RuntimeError(f"{self.name} is not fitted")
        cells = sp.csr_matrix(cells)
        if cells.shape[1] != self.n_genes:
            raise UserError(f"{self.name}: cells have {cells.shape[1]} genes but the model was fitted on "
                            f"{self.n_genes}")
        return cells

    def _prepare(self, cells: sp.csr_matrix) -> sp.csr_matrix:
        """Log-normalised expression (or the values as they are)."""
        if self.normalize:
            return log1p_inplace(scale_rows(cells, float(self.options["target_sum"])))
        return sp.csr_matrix(cells, dtype=np.float32, copy=True)

    def prepared(self, cells: sp.csr_matrix) -> sp.csr_matrix:
        """The cells as the featurizer reads them (checked against the fitted genes, then log-normalised):
        the input that ``explain`` attributes."""
        return self._prepare(self._check(cells))

    def _base_state(self) -> dict[str, Any]:
        return {"model": self.name, "options": self.options, "normalize": self.normalize,
                "n_genes": self.n_genes, "gene_symbols": self.gene_symbols}

    def _load_base_state(self, state: dict[str, Any]) -> None:
        if state.get("model") != self.name:
            raise UserError(f"state of model {state.get('model')!r} cannot be loaded into {self.name!r}")
        self.normalize = bool(state["normalize"])
        self.n_genes = int(state["n_genes"])
        self.gene_symbols = list(state["gene_symbols"])


@register
class PCALogReg(_Normalizing):
    name = "pca-logreg"
    default_head = "logreg"
    default_options: ClassVar[dict[str, Any]] = {"n_components": 50, "target_sum": 1e4, "normalize": "auto",
                                                 "fit_cells": 200_000}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.components: np.ndarray | None = None  # [k, genes] float32
        self.mean: np.ndarray | None = None  # [genes] float32, of the training cells' prepared values

    def fit(self, train: sp.csr_matrix, genes: pd.DataFrame, seed: int) -> None:
        from sklearn.decomposition import PCA

        train = sp.csr_matrix(train)
        self._decide(train, genes)
        x = self._prepare(train)
        k_max = min(x.shape) - 1  # ARPACK needs k < min(n, d)
        k = min(int(self.options["n_components"]), k_max)
        if k < 1:
            raise UserError(f"{self.name}: {x.shape[0]} training cells x {x.shape[1]} genes are too few for PCA")
        if k < int(self.options["n_components"]):
            log.warning("%s: %d principal components requested, %d possible; using %d",
                        self.name, self.options["n_components"], k_max, k)
        # sparse input + arpack: centred implicitly, the dense cells x genes matrix is never built
        pca = PCA(n_components=k, svd_solver="arpack", random_state=seed & 0xFFFFFFFF).fit(x)
        self.components = pca.components_.astype(np.float32)
        self.mean = pca.mean_.astype(np.float32).ravel()

    def transform(self, cells: sp.csr_matrix) -> np.ndarray:
        cells = self._check(cells)
        assert self.components is not None and self.mean is not None
        x = self._prepare(cells)
        out = np.asarray(x @ self.components.T, dtype=np.float32)
        return out - (self.mean @ self.components.T)[None, :]

    def state(self) -> dict[str, Any]:
        return {**self._base_state(), "components": self.components, "mean": self.mean}

    def load_state(self, state: dict[str, Any]) -> None:
        self._load_base_state(state)
        self.components = np.asarray(state["components"], dtype=np.float32)
        self.mean = np.asarray(state["mean"], dtype=np.float32)


def seurat_dispersion(mean: np.ndarray, var: np.ndarray, n_bins: int = 20) -> np.ndarray:
    """Normalised dispersion per gene, as Seurat's (and scanpy's flavor="seurat") HVG method.

    ``mean``/``var`` are per-gene statistics on the linear (not log) scale. Dispersion = var / mean,
    its log is z-scored within bins of log1p(mean) (20 equal-width bins). A bin holding one gene
    gets z = 1 (scanpy's convention, so an isolated highly expressed gene is not lost); genes never
    expressed or with zero variance get NaN (never selected).
    """
    mean = np.asarray(mean, dtype=np.float64)
    var = np.asarray(var, dtype=np.float64)
    disp = np.full_like(mean, np.nan)
    ok = (mean > 0) & (var > 0)
    disp[ok] = np.log(var[ok] / mean[ok])
    z = np.full_like(mean, np.nan)
    if not ok.any():
        return z
    mean_log = np.log1p(mean[ok])
    bins = pd.cut(mean_log, bins=n_bins, labels=False) if np.ptp(mean_log) > 0 else np.zeros(ok.sum(), int)
    frame = pd.DataFrame({"bin": bins, "disp": disp[ok]})
    grouped = frame.groupby("bin")["disp"]
    mu = grouped.transform("mean").to_numpy()
    sd = grouped.transform("std").to_numpy()  # ddof=1: NaN for one-gene bins
    zz = np.divide(frame["disp"].to_numpy() - mu, sd, out=np.ones(len(frame)), where=np.nan_to_num(sd) > 0)
    z[ok] = zz
    return z


@register
class HVGMLP(_Normalizing):
    name = "hvg-mlp"
    default_head = "mlp"
    default_options: ClassVar[dict[str, Any]] = {"n_top_genes": 2000, "target_sum": 1e4, "normalize": "auto",
                                                 "fit_cells": 200_000}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.selected: np.ndarray | None = None  # gene positions, ascending

    def fit(self, train: sp.csr_matrix, genes: pd.DataFrame, seed: int) -> None:
        train = sp.csr_matrix(train)
        self._decide(train, genes)
        n = train.shape[0]
        if n < 2:
            raise UserError(f"{self.name}: highly variable genes need at least 2 training cells, got {n}")
        if self.normalize:
            lin = scale_rows(train, float(self.options["target_sum"]))  # dispersion on the linear CP10k scale
            mean, var = _col_mean_var(lin)
            score = seurat_dispersion(mean, var)
        else:
            x = sp.csr_matrix(train, dtype=np.float32)
            mean, var = _col_mean_var(x)
            if x.data.size and x.data.min() < 0:
                # scaled data (negative values): dispersion is meaningless, rank by variance
                log.info("%s: values include negatives; highly variable genes ranked by variance", self.name)
                score = np.where(var > 0, var, np.nan)
            else:
                # non-count, non-negative values, taken as already log-normalised: back to linear as Seurat
                lin_mean, lin_var = _col_mean_var(sp.csr_matrix((np.expm1(x.data), x.indices, x.indptr), x.shape))
                score = seurat_dispersion(lin_mean, lin_var)
        valid = np.flatnonzero(~np.isnan(score))
        if valid.size == 0:
            raise UserError(f"{self.name}: no gene varies across the training cells; check the input data")
        k = min(int(self.options["n_top_genes"]), valid.size)
        # highest score first; ties broken by gene position so the choice is deterministic
        order = valid[np.lexsort((valid, -score[valid]))]
        self.selected = np.sort(order[:k]).astype(np.int64)
        log.info("%s: %d highly variable genes selected on %d training cells", self.name, k, n)

    def transform(self, cells: sp.csr_matrix) -> np.ndarray:
        cells = self._check(cells)
        assert self.selected is not None
        sub = cells[:, self.selected]
        if self.normalize:
            totals = np.asarray(cells.sum(axis=1), dtype=np.float64).ravel()
            sub = log1p_inplace(scale_rows(sub, float(self.options["target_sum"]), sums=totals))
        return sub.toarray().astype(np.float32, copy=False)

    def state(self) -> dict[str, Any]:
        return {**self._base_state(), "selected": self.selected,
                "selected_symbols": [self.gene_symbols[i] for i in self.selected] if self.selected is not None else []}

    def load_state(self, state: dict[str, Any]) -> None:
        self._load_base_state(state)
        self.selected = np.asarray(state["selected"], dtype=np.int64)


def _col_mean_var(x: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and unbiased variance of a sparse matrix, without densifying it."""
    n = x.shape[0]
    mean = np.asarray(x.sum(axis=0), dtype=np.float64).ravel() / n
    sq = x.copy()
    sq.data = sq.data.astype(np.float64) ** 2
    mean_sq = np.asarray(sq.sum(axis=0), dtype=np.float64).ravel() / n
    var = np.maximum(mean_sq - mean**2, 0.0) * (n / max(n - 1, 1))
    return mean, var


class ObsmEmbedding(EmbeddingModel):
    """Precomputed embeddings stored with the cells (``obsm.<key>`` columns of the cell store)."""

    name = "obsm"
    default_head = "mlp"
    default_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, key: str, **options: Any) -> None:
        super().__init__(**options)
        self.key = key
        self.name = f"obsm:{key}"  # type: ignore[misc]  # per instance: the registry name it was built from

    def check_store(self, store: Any) -> None:
        super().check_store(store)
        if self.key not in store.obsm_keys:
            keys = ", ".join(store.obsm_keys) or "none"
            raise UserError(f"model 'obsm:{self.key}': {store.path} has no obsm key {self.key!r}; available obsm "
                            f"keys: {keys}")

    def embed_store(self, store: Any) -> np.ndarray:
        self.check_store(store)
        emb = np.asarray(store.obsm(self.key), dtype=np.float32)
        if emb.ndim != 2 or emb.shape[0] != store.n_cells:
            raise UserError(f"obsm {self.key!r} has shape {emb.shape}, expected [{store.n_cells} cells, dims]")
        if not np.isfinite(emb).all():
            raise UserError(f"obsm {self.key!r} contains NaN or inf values; fix or drop those cells before converting")
        return emb


def _obsm_factory(key: str, options: dict[str, Any]) -> Model:
    return ObsmEmbedding(key, **options)


register_prefix("obsm", _obsm_factory)
