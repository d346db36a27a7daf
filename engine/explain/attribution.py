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
* Foundation models (``ADAPTERS``, one mechanism with a few fields per model): captum's
  ``LayerIntegratedGradients`` (or ``LayerGradientXActivation``, method ``gxi``) on the layer whose output
  carries the cell's expression, through backbone (+ LoRA adapter, merged) + embedding rule + head; the
  per-token attribution is summed over the embedding dimension and mapped back to the store's genes through
  the tokenizer's own gene mapping, matched to the cell's own expressed genes (copies of a repeated gene add
  up; special tokens, and genes the model lacks, get nothing). The baseline changes only the attributed
  input at gene tokens (special tokens, positions, masks and other batch keys pass through unchanged):

  - scGPT: the gene-token embedding ``encoder.embedding``; baseline: ``<pad>`` at every gene token.
  - Geneformer: ``bert.embeddings.word_embeddings`` (gene tokens ranked by normalised expression);
    baseline: ``<pad>`` (token 0).
  - tGPT: GPT-2 ``wte`` (gene-symbol tokens ranked by expression); baseline: ``<pad>``. Genes whose symbol
    is several words or ``<unk>`` are not attributed (no one token is theirs).
  - UCE: ``pe_embedding`` (the protein-embedding row of each sampled gene; a gene drawn k times has k tokens,
    summed); CLS and chromosome start/end tokens are special by their place in the sentence (in the
    released token table their ids are also rows of the first species' genes). Baseline:
    ``pad_token_idx`` (0), the token the original pads with (masked there; here it stands at unmasked
    gene places: "a token with no gene of the cell").
  - scBERT: ``token_emb``, the expression-bin embedding (bins 0..5; every token position is a fixed Panglao
    gene, the gene2vec positional embedding is not attributed); baseline: bin 0 ("not expressed") at the
    cell's expressed genes, so genes the cell lacks (bin 0 already) get exactly 0.
  - CellLM: ``token_emb`` (expression tokens 0..5; gene identity is ``pos_emb``); baseline: token 0 (the
    value bin the original gives to values below 1) at every gene token; CLS and padding unchanged.
  - scFoundation: ``token_emb``, the auto-discretization value embedding of the encoder's (expressed) genes;
    baseline: value 0 at each gene token (the value the original gives non-expressed genes in its decoder),
    the gene's positional embedding and the T/S tokens unchanged.
  - CellPLM (a cell is one token: ``log1p(counts) @ gene embeddings``): captum's ``IntegratedGradients`` /
    ``InputXGradient`` on the float input ``values`` (log1p counts of the cell's genes), baseline 0 (nothing
    expressed). Its GMVAE cluster is an argmax, a step function: where a path crosses a cluster boundary,
    completeness misses that jump (the reported completeness error shows it).

  ``gxi`` is gradient x the same layer's activation (CellPLM: gradient x input), on the same gene tokens.
  Cells and integration steps go through the model in passes of at most ``FM_TOKENS_PER_PASS`` tokens, so
  memory stays bounded (scBERT: 16,907 tokens per cell).

  Method ``attention`` (geneformer and tgpt only; HF models run eagerly for it): per gene, the attention its
  token receives in the last layer that feeds the embedding, averaged over heads and over the real query
  tokens (padding masked); unsigned and class-blind. The other models' attention is fused (SDPA, Performer,
  flow attention) and exposes no weights: ``explain`` says so instead of attributing.
  Models without an adapter get DE and resistance analysis but no attributions (said in the output).

Per-cell attributions are reduced at once to per-gene sums by (dataset, class) (``GeneSums``), so memory
does not grow with the number of cells.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import UserError
from ..models.base import FoundationModel, Model, available_models, model_class
from ..models.baselines import HVGMLP, PCALogReg
from ..models.contract import AttributionAdapter
from ..train.heads import LogRegHead, MLPHead

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
    return np.asarray(model.prepared(cells).toarray(), dtype=np.float32)  # type: ignore[attr-defined]


def baseline_feature_fn(model: Model) -> Callable[[Any], Any]:
    """torch function prepared values [n, genes] -> the baseline's features, equal to ``model.transform``."""
    import torch

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


# The adapters live on the model classes (``attribution_adapter``); this table reads them from there.
Adapter = AttributionAdapter


class _AdapterTable(Mapping[str, AttributionAdapter]):
    """model name -> its class's ``attribution_adapter`` (registered foundation models that have one)."""

    def __getitem__(self, name: str) -> AttributionAdapter:
        adapter = adapter_for(name)
        if adapter is None:
            raise KeyError(name)
        return adapter

    def __iter__(self) -> Iterator[str]:
        return iter([n for n in available_models() if adapter_for(n) is not None])

    def __len__(self) -> int:
        return sum(1 for _ in self)


ADAPTERS: Mapping[str, AttributionAdapter] = _AdapterTable()

METHODS = ("ig", "gxi", "attention")
#: tokens (cells x sequence length, all integration steps together) in one forward/backward pass; bounds
#: the memory of integrated gradients (the cells of a batch are split, the steps chunked, to fit)
FM_TOKENS_PER_PASS = 1 << 16


def adapter_for(model_name: str) -> AttributionAdapter | None:
    """The model's attribution adapter, None for models without one (and for names that are no model)."""
    try:
        cls = model_class(model_name)
    except (UserError, KeyError):  # no model, or a parametric name (obsm:KEY): no adapter
        return None
    return getattr(cls, "attribution_adapter", None)


def supports(model_name: str, method: str) -> bool:
    """Whether ``method`` can attribute ``model_name`` (``attention``: only models exposing attention)."""
    adapter = adapter_for(model_name)
    return adapter is not None and (method != "attention" or adapter.attention is not None)


def token_genes(ids: np.ndarray, gene_index: np.ndarray, lookup: np.ndarray,
                special: np.ndarray | None = None) -> np.ndarray:
    """Store gene position of each token of one cell (-1 for special tokens): token ids are matched to
    the cell's own expressed genes, so a vocabulary id shared by two store genes maps to the one present
    (and every copy of a repeated gene maps to it)."""
    gene_index = np.asarray(gene_index, dtype=np.int64)
    tok = lookup[gene_index]
    first: dict[int, int] = {}
    for pos, t in zip(gene_index.tolist(), tok.tolist(), strict=True):
        if t >= 0 and t not in first:
            first[t] = pos
    out = np.fromiter((first.get(int(t), -1) for t in ids), dtype=np.int64, count=len(ids))
    if special is not None:
        out[np.asarray(special, dtype=bool)] = -1
    return out


def _pad_value(fm: FoundationModel, rows: dict[str, list[np.ndarray]], key: str) -> float:
    """The model's padding value of ``key``, read from its own collate (one cell padded by one position)."""
    one = {k: [v[0]] for k, v in rows.items()}
    batch = fm.collate(one, pad_to=len(rows[key][0]) + 1)
    return batch[key][0, -1].item()


@dataclass
class FmInputs:
    """One batch of cells as a foundation model sees it, with its attribution baseline."""

    batch: dict[str, Any]  # the collated batch
    baseline: dict[str, Any]  # the same batch with ``adapter.key`` set to the baseline at every gene token
    token_gene: list[np.ndarray]  # per cell: store gene position of each token (-1: not a gene of the cell)


def fm_inputs(fm: FoundationModel, tokenizer: Any, adapter: Adapter, cell_ids: np.ndarray,
              gene_index: list[np.ndarray], values: list[np.ndarray]) -> FmInputs:
    """Tokenize and collate cells, map their tokens to store genes, and build the baseline batch."""
    import torch

    rows = tokenizer(np.asarray(cell_ids), gene_index, values)
    key = adapter.key
    batch = fm.collate(rows)
    lookup = adapter.lookup(fm, tokenizer)
    tok_gene = []
    for i, gi in enumerate(gene_index):
        row = rows[key][i] if adapter.gene_key is None else rows[adapter.gene_key][i]
        ident = np.arange(len(row)) if adapter.gene_key is None else row
        special = adapter.special(tokenizer, ident) if adapter.special is not None else None
        tok_gene.append(token_genes(ident, gi, lookup, special))
    x = batch[key]
    is_gene = torch.zeros(x.shape[:2], dtype=torch.bool)
    for i, tg in enumerate(tok_gene):
        is_gene[i, : len(tg)] = torch.from_numpy(tg >= 0)
    fill = _pad_value(fm, rows, key) if adapter.baseline is None else adapter.baseline
    base = {**batch, key: torch.where(is_gene, torch.full_like(x, fill), x)}
    return FmInputs(batch, base, tok_gene)


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
    cells (see the module docstring for what each model is attributed with respect to)."""
    import torch
    from captum.attr import (
        InputXGradient,
        IntegratedGradients,
        LayerGradientXActivation,
        LayerIntegratedGradients,
    )

    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r} ({', '.join(METHODS)})")
    inp = fm_inputs(fm, tokenizer, adapter, cell_ids, gene_index, values)
    key, batch, tok_gene = adapter.key, inp.batch, inp.token_gene
    # memory: at most FM_TOKENS_PER_PASS tokens through the model per pass (scBERT: 16,907 per cell)
    per_pass = max(1, FM_TOKENS_PER_PASS // max(1, batch[key].shape[1]))
    if len(cell_ids) > per_pass:
        parts = [attribute_fm(fm, module, head, tokenizer, adapter, cell_ids[a:a + per_pass],
                              gene_index[a:a + per_pass], values[a:a + per_pass], n_genes, method, n_steps)
                 for a in range(0, len(cell_ids), per_pass)]
        return tuple(np.concatenate(p) for p in zip(*parts, strict=True))  # type: ignore[return-value]
    keys = [k for k, v in batch.items() if k != key and isinstance(v, torch.Tensor)]
    score = head_score_fn(head)

    def forward(x: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        b = {key: x, **dict(zip(keys, rest, strict=True))}
        b.update({k: v for k, v in batch.items() if k not in b})
        return score(fm.embed(module, b).float())

    x, base = batch[key], inp.baseline[key]
    extra = tuple(batch[k] for k in keys)
    with torch.no_grad():
        s = forward(x, *extra)
    delta = np.full(len(cell_ids), np.nan)
    if method == "attention":
        if adapter.attention is None:
            raise ValueError(f"model {fm.name!r} exposes no attention weights (method attention)")
        with torch.no_grad():
            attr = adapter.attention(fm, module, batch)
    elif method == "ig":
        if adapter.layer is None:
            ig: Any = IntegratedGradients(forward)
        else:
            ig = LayerIntegratedGradients(forward, adapter.layer(module))
        attr, d = ig.attribute(x, baselines=base, additional_forward_args=extra, n_steps=n_steps,
                               internal_batch_size=per_pass, return_convergence_delta=True)
        delta = d.detach().abs().numpy()
    elif adapter.layer is None:
        # gradient x (input - baseline 0)
        attr = InputXGradient(forward).attribute(x.clone().requires_grad_(), additional_forward_args=extra)
    else:
        attr = LayerGradientXActivation(forward, adapter.layer(module)).attribute(x, additional_forward_args=extra)
    attr = attr.detach().float()
    per_token = (attr.sum(dim=-1) if attr.dim() == 3 else attr).numpy()  # [cells, tokens]
    out = np.zeros((len(cell_ids), n_genes), dtype=np.float64)
    for i, tg in enumerate(tok_gene):
        ok = tg >= 0
        np.add.at(out[i], tg[ok], per_token[i, : len(tg)][ok])
    return out, delta, s.numpy()
