"""Gene attributions of trained classifiers, computed with captum.

Every attribution explains the log-odds of "sensitive" (logit[1] - logit[0] of the two-logit heads, the
linear score of logistic regression), so a positive value pushes a cell towards sensitive and a negative
one towards resistant.

* Baselines (``pca-logreg``, ``hvg-mlp``): the featurizer is rewritten as a differentiable torch function
  of the cell's full log-expression vector (PCA: centring and projection; HVG: column selection), the
  head's scaler and network follow, and captum's ``IntegratedGradients`` attributes the score to the
  input genes, from the average training cell as baseline. For PCA + logistic regression the model is
  linear, so the attributions are exactly coefficient x (x - mean); the coefficients themselves, mapped
  to genes through the PCA loadings (``gene_coefficients``), are the model's own per-gene weights.
* Foundation models: captum's ``LayerIntegratedGradients`` (or ``LayerGradientXActivation``, method
  ``gxi``) on the model's gene-token embedding layer, through backbone (+ LoRA adapter, merged) + embedding
  rule + head; the per-token attribution is summed over the embedding dimension and mapped back to the
  store's genes through the tokenizer's own gene -> token lookup. The baseline input replaces every gene
  token by the padding token (special tokens such as <cls> stay), attention masks unchanged.
  ``ADAPTERS`` says, per model, where the gene-token embedding is and how tokens map to genes; models
  without an adapter get DE and resistance analysis but no attributions (said in the output).

Per-cell attributions are reduced at once to per-gene sums by (dataset, class) (``GeneSums``), so memory
does not grow with the number of cells.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..models.base import FoundationModel, Model

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- sums


@dataclass
class GeneSums:
    """Per-gene sums of attributions by (dataset, true class), merged across batches and folds."""

    n_genes: int
    sums: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)  # signed
    abs_sums: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    counts: dict[tuple[str, int], int] = field(default_factory=dict)
    deltas: list[float] = field(default_factory=list)  # |completeness error| / |score change| per cell

    def add(self, attr: np.ndarray, datasets: np.ndarray, labels: np.ndarray) -> None:
        """Add per-cell attributions [cells, genes]."""
        attr = np.asarray(attr, dtype=np.float64)
        for key in set(zip(map(str, datasets), map(int, labels), strict=True)):
            sel = (np.asarray(datasets).astype(str) == key[0]) & (np.asarray(labels).astype(int) == key[1])
            self.sums[key] = self.sums.get(key, np.zeros(self.n_genes)) + attr[sel].sum(axis=0)
            self.abs_sums[key] = self.abs_sums.get(key, np.zeros(self.n_genes)) + np.abs(attr[sel]).sum(axis=0)
            self.counts[key] = self.counts.get(key, 0) + int(sel.sum())

    def merge(self, other: GeneSums) -> None:
        for key in other.counts:
            self.sums[key] = self.sums.get(key, np.zeros(self.n_genes)) + other.sums[key]
            self.abs_sums[key] = self.abs_sums.get(key, np.zeros(self.n_genes)) + other.abs_sums[key]
            self.counts[key] = self.counts.get(key, 0) + other.counts[key]
        self.deltas.extend(other.deltas)

    @property
    def n_cells(self) -> int:
        return sum(self.counts.values())

    def table(self, genes: list[str], dataset: str | None = None) -> pd.DataFrame:
        """Ranked per-gene table (all datasets, or one): ``importance`` = mean |attribution| over cells,
        ``mean_sensitive``/``mean_resistant`` = mean signed attribution in truly sensitive/resistant cells."""
        keys = [k for k in self.counts if dataset is None or k[0] == dataset]

        def total(which: dict[tuple[str, int], np.ndarray], label: int | None) -> tuple[np.ndarray, int]:
            ks = [k for k in keys if label is None or k[1] == label]
            s = sum((which[k] for k in ks), np.zeros(self.n_genes))
            return s, sum(self.counts[k] for k in ks)

        abs_all, n = total(self.abs_sums, None)
        s_sens, n_sens = total(self.sums, 1)
        s_res, n_res = total(self.sums, 0)
        out = pd.DataFrame(
            {
                "gene": genes,
                "importance": abs_all / max(n, 1),
                "mean_sensitive": s_sens / max(n_sens, 1) if n_sens else np.nan,
                "mean_resistant": s_res / max(n_res, 1) if n_res else np.nan,
                "gene_position": np.arange(self.n_genes, dtype=np.int64),
            }
        )
        # which class the gene's expression state argues for, seen from the cells where it differs most
        out["direction"] = np.where(out["mean_sensitive"].fillna(0) >= out["mean_resistant"].fillna(0),
                                    "sensitive", "resistant")
        out["n_cells"] = n
        out = out.sort_values(["importance", "gene_position"], ascending=[False, True], kind="stable")
        out = out.reset_index(drop=True)
        out.insert(1, "rank", np.arange(1, len(out) + 1))
        return out


# --------------------------------------------------------------------------------------------- heads


def head_score_fn(head: Any) -> Callable[[Any], Any]:
    """torch function features [n, d] -> sensitive log-odds [n] for a frozen head (mlp / logreg) or a
    LoRA head (an nn.Module giving two logits)."""
    import torch

    from ..train.heads import LogRegHead, MLPHead

    if isinstance(head, MLPHead):
        # copies: loaded heads may hold read-only arrays, which torch.from_numpy warns about
        mean, std = torch.tensor(np.asarray(head.mean)), torch.tensor(np.asarray(head.std))
        net = head.module.eval()

        def mlp(f: torch.Tensor) -> torch.Tensor:
            logits = net((f - mean) / std)
            return logits[:, 1] - logits[:, 0]

        return mlp
    if isinstance(head, LogRegHead):
        mean, std = torch.tensor(np.asarray(head.mean)), torch.tensor(np.asarray(head.std))
        coef = torch.tensor(np.asarray(head.coef, dtype=np.float32))
        intercept = float(head.intercept)
        return lambda f: ((f - mean) / std) @ coef + intercept
    if isinstance(head, torch.nn.Module):
        head = head.eval()

        def module(f: torch.Tensor) -> torch.Tensor:
            logits = head(f)
            return logits[:, 1] - logits[:, 0]

        return module
    raise TypeError(f"cannot attribute through a head of type {type(head).__name__}")


# ----------------------------------------------------------------------------------------- baselines


def baseline_input(model: Model, cells: sp.csr_matrix) -> np.ndarray:
    """The dense input genes of a fitted baseline, [cells, all genes]: its prepared values (log1p CP10k
    of counts, or the values as they are). Callers pass small batches."""
    return np.asarray(model._prepare(model._check(cells)).toarray(), dtype=np.float32)  # type: ignore[attr-defined]


def baseline_feature_fn(model: Model) -> Callable[[Any], Any]:
    """torch function prepared values [n, genes] -> the baseline's features, equal to ``model.transform``."""
    import torch

    from ..models.baselines import HVGMLP, PCALogReg

    if isinstance(model, PCALogReg):
        assert model.components is not None and model.mean is not None
        comp = torch.tensor(np.asarray(model.components))
        mean = torch.tensor(np.asarray(model.mean))
        return lambda x: (x - mean) @ comp.T
    if isinstance(model, HVGMLP):
        assert model.selected is not None
        sel = torch.tensor(np.asarray(model.selected))
        return lambda x: x[:, sel]
    raise TypeError(f"no gene attribution for baseline {model.name!r}")


def gene_coefficients(model: Model, head: Any) -> np.ndarray | None:
    """A linear model's own per-gene weights: d(sensitive log-odds)/d(gene's prepared value). PCA +
    logistic regression: sum_k loading[k, g] * coef[k] / std[k]. None for nonlinear models."""
    from ..models.baselines import PCALogReg
    from ..train.heads import LogRegHead

    if isinstance(model, PCALogReg) and isinstance(head, LogRegHead):
        assert model.components is not None and head.coef is not None and head.std is not None
        return (head.coef / head.std.astype(np.float64)) @ model.components.astype(np.float64)
    return None


def attribute_baseline(
    model: Model, head: Any, cells: sp.csr_matrix, reference: np.ndarray, n_steps: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """(attributions [cells, genes], completeness error per cell) by integrated gradients from
    ``reference`` (the mean prepared training cell)."""
    import torch
    from captum.attr import IntegratedGradients

    feat, score = baseline_feature_fn(model), head_score_fn(head)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return score(feat(x))

    x = torch.from_numpy(baseline_input(model, cells))
    ref = torch.from_numpy(np.asarray(reference, dtype=np.float32))[None, :].expand_as(x).contiguous()
    ig = IntegratedGradients(forward)
    attr, delta = ig.attribute(x, baselines=ref, n_steps=n_steps, return_convergence_delta=True)
    return attr.detach().numpy(), delta.detach().abs().numpy()


# ---------------------------------------------------------------------------------- foundation models


@dataclass(frozen=True)
class Adapter:
    """Where a foundation model's gene-token embedding is, and its tokenizer's store position -> token id."""

    layer: Callable[[Any], Any]
    position_to_token: Callable[[Any], np.ndarray]
    ids_key: str = "input_ids"


def _geneformer_lookup(tok: Any) -> np.ndarray:
    return np.where(tok.col_of_pos >= 0, tok.col_token[np.maximum(tok.col_of_pos, 0)], -1)


ADAPTERS: dict[str, Adapter] = {
    "scgpt": Adapter(layer=lambda m: m.encoder.embedding, position_to_token=lambda tok: tok.lookup),
    "geneformer": Adapter(
        layer=lambda m: getattr(m, "bert", m).embeddings.word_embeddings, position_to_token=_geneformer_lookup
    ),
}


def adapter_for(model_name: str) -> Adapter | None:
    return ADAPTERS.get(model_name)


def token_genes(ids: np.ndarray, gene_index: np.ndarray, lookup: np.ndarray) -> np.ndarray:
    """Store gene position of each token of one cell (-1 for special tokens): token ids are matched to
    the cell's own expressed genes, so a vocabulary id shared by two store genes maps to the one present."""
    gene_index = np.asarray(gene_index, dtype=np.int64)
    tok = lookup[gene_index]
    first: dict[int, int] = {}
    for pos, t in zip(gene_index.tolist(), tok.tolist(), strict=True):
        if t >= 0 and t not in first:
            first[t] = pos
    return np.fromiter((first.get(int(t), -1) for t in ids), dtype=np.int64, count=len(ids))


def _pad_id(fm: FoundationModel, rows: dict[str, list[np.ndarray]], key: str) -> int:
    """The model's padding token id, read from its own collate (one cell padded by one position)."""
    one = {k: [v[0]] for k, v in rows.items()}
    batch = fm.collate(one, pad_to=len(rows[key][0]) + 1)
    return int(batch[key][0, -1])


def attribute_fm(
    fm: FoundationModel,
    module: Any,
    head: Any,
    tokenizer: Any,
    adapter: Adapter,
    cell_ids: np.ndarray,
    gene_index: list[np.ndarray],
    values: list[np.ndarray],
    n_genes: int,
    method: str = "ig",
    n_steps: int = 16,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gene attributions [cells, n_genes], completeness error per cell, score per cell) of one batch of
    cells, through the model's gene-token embedding layer."""
    import torch
    from captum.attr import LayerGradientXActivation, LayerIntegratedGradients

    rows = tokenizer(np.asarray(cell_ids), gene_index, values)
    key = adapter.ids_key
    batch = fm.collate(rows)
    keys = [k for k, v in batch.items() if k != key and isinstance(v, torch.Tensor)]
    score = head_score_fn(head)

    def forward(ids: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        b = {key: ids, **dict(zip(keys, rest, strict=True))}
        b.update({k: v for k, v in batch.items() if k not in b})
        return score(fm.embed(module, b).float())

    lookup = adapter.position_to_token(tokenizer)
    tok_gene = [token_genes(ids, gi, lookup) for ids, gi in zip(rows[key], gene_index, strict=True)]
    ids = batch[key]
    is_gene = torch.zeros_like(ids, dtype=torch.bool)
    for i, tg in enumerate(tok_gene):
        is_gene[i, : len(tg)] = torch.from_numpy(tg >= 0)
    pad = _pad_id(fm, rows, key)
    base_ids = torch.where(is_gene, torch.full_like(ids, pad), ids)
    extra = tuple(batch[k] for k in keys)
    layer = adapter.layer(module)
    with torch.no_grad():
        s = forward(ids, *extra)
    if method == "ig":
        lig = LayerIntegratedGradients(forward, layer)
        attr, delta = lig.attribute(ids, baselines=base_ids, additional_forward_args=extra, n_steps=n_steps,
                                    return_convergence_delta=True)
        delta = delta.detach().abs().numpy()
    elif method == "gxi":
        attr = LayerGradientXActivation(forward, layer).attribute(ids, additional_forward_args=extra)
        delta = np.full(len(cell_ids), np.nan)
    else:
        raise ValueError(f"unknown attribution method {method!r} (ig or gxi)")
    per_token = attr.detach().float().sum(dim=-1).numpy()  # [cells, tokens]
    out = np.zeros((len(cell_ids), n_genes), dtype=np.float64)
    for i, tg in enumerate(tok_gene):
        ok = tg >= 0
        np.add.at(out[i], tg[ok], per_token[i, : len(tg)][ok])
    return out, delta, s.numpy()
