"""A registry model in memory (``LoadedModel``) and the per-request helpers around it: gene tables of a
request, column remapping onto the model's genes, labels and summaries of predicted probabilities."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..data.gene_ids import ensembl_to_symbols, looks_like_ensembl, symbols_to_ensembl
from ..defaults import batch_tokens_for
from ..errors import UserError
from ..models.base import EmbeddingModel, FittedFeatureModel, FoundationModel, get_model
from ..models.lora_adapter import load_adapter
from ..pipeline.embed import embed_block
from ..train.frozen import load_fold_featurizer, load_fold_head
from .store import BACKBONE_DIR, GENES, LORA_DIR, MODEL_JSON

THRESHOLD = 0.5  # p_sensitive >= 0.5 -> "sensitive"


def label_of(p: np.ndarray) -> np.ndarray:
    """Labels of p_sensitive: "sensitive" at or above THRESHOLD, else "resistant" (an object array)."""
    return np.where(np.asarray(p) >= THRESHOLD, "sensitive", "resistant").astype(object)


def genes_frame(symbols: Sequence[str]) -> pd.DataFrame:
    """A store-like genes table (position, symbol, ensembl_id) for gene names given by a request."""
    names = [str(s) for s in symbols]
    if looks_like_ensembl(names):
        ens = [n.split(".")[0] for n in names]
        sym = [s or e for s, e in zip(ensembl_to_symbols(ens), ens, strict=True)]
    else:
        sym, ens = names, symbols_to_ensembl(names)
    return pd.DataFrame({"position": np.arange(len(names), dtype=np.int32), "symbol": sym,
                         "ensembl_id": pd.array(ens, dtype="string")})


@dataclass
class Prepared:
    """One request's cells made ready for the model (CPU work): remapped expression or tokens."""

    cell_ids: np.ndarray
    csr: sp.csr_matrix | None = None  # baselines: cells x model genes
    tokens: dict[str, Any] | None = None  # foundation models: ragged token fields + n_tokens


class LoadedModel:
    """A registry model in memory: featurizer or foundation model (with LoRA merged), and its head."""

    def __init__(self, version_dir: str | Path, device: str = "cpu", dtype: Any = None,
                 batch_tokens: int | None = None) -> None:
        self.dir = Path(version_dir)
        try:
            self.info: dict[str, Any] = json.loads((self.dir / MODEL_JSON).read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{self.dir} is not a registry model ({exc})") from None
        self.kind = self.info["kind"]
        self.device, self.batch_tokens = device, batch_tokens_for(device, batch_tokens)
        self.train_genes = pd.read_parquet(self.dir / GENES)
        options = dict(self.info.get("model_options") or {})
        if self.info.get("backbone", {}).get("copied"):
            options.update(checkpoint=str(self.dir / BACKBONE_DIR), preset=None)
        self.model = get_model(self.info["model"], options)
        self.module: Any = None
        self.torch_head: Any = None
        self.head: Any = None
        self._tokenizers: dict[int, Any] = {}
        if self.kind == "frozen":
            self.head = load_fold_head(self.dir)
            load_fold_featurizer(self.dir, self.model)
            if isinstance(self.model, FoundationModel):
                self.module = self.model.load(device=device, dtype=dtype)
        elif self.kind == "lora":
            self.module, self.torch_head = load_adapter(self.model, self.dir / LORA_DIR, device, dtype)  # type: ignore[arg-type]
        else:
            raise UserError(f"{self.dir}: unknown model kind {self.kind!r}")
        self.is_foundation = isinstance(self.model, FoundationModel)
        self.is_fitted = isinstance(self.model, FittedFeatureModel)
        self.is_obsm = isinstance(self.model, EmbeddingModel) and not self.is_foundation

    @property
    def vocabulary(self) -> list[str]:
        """Gene symbols the model was trained with."""
        if self.is_fitted:
            return list(self.model.gene_symbols)  # type: ignore[attr-defined]
        return self.train_genes["symbol"].astype(str).tolist()

    # ------------------------------------------------------------------------------ per request

    def prepare(self, cell_ids: Sequence[str], csr: sp.csr_matrix, genes: pd.DataFrame) -> Prepared:
        """Map cells (rows of ``csr`` over ``genes``: position, symbol[, ensembl_id]) to what the model reads."""
        ids = np.asarray([str(c) for c in cell_ids], dtype=object)
        csr = sp.csr_matrix(csr, dtype=np.float32)
        if self.is_obsm:
            raise UserError(f"model {self.info['name']!r} was trained on precomputed obsm embeddings; it cannot "
                            "predict from expression (use `scdrugmap-ray predict` on data holding that obsm key)")
        if self.is_fitted:
            return Prepared(ids, csr=remap_columns(csr, genes["symbol"].astype(str).tolist(), self.vocabulary))
        if self.model.requires_counts and csr.nnz and not (
            np.all(csr.data >= 0) and np.all(csr.data == np.rint(csr.data))
        ):
            raise UserError(f"model {self.model.name!r} needs raw counts (non-negative whole numbers)")
        tok = self._tokenizer(genes)
        gi = [csr.indices[csr.indptr[i]:csr.indptr[i + 1]].astype(np.int32) for i in range(csr.shape[0])]
        vals = [csr.data[csr.indptr[i]:csr.indptr[i + 1]].astype(np.float32) for i in range(csr.shape[0])]
        rows = tok(ids, gi, vals)
        rows = {k: list(v) for k, v in rows.items()}
        rows["n_tokens"] = np.array([len(x) for x in rows["input_ids"]], dtype=np.int64)
        return Prepared(ids, tokens=rows)

    def _tokenizer(self, genes: pd.DataFrame) -> Any:
        key = hash(tuple(genes["symbol"].astype(str)))
        tok = self._tokenizers.get(key)
        if tok is None:
            tok = self.model.make_tokenizer(genes)  # type: ignore[attr-defined]
            if len(self._tokenizers) > 16:
                self._tokenizers.clear()
            self._tokenizers[key] = tok
        return tok

    def run(self, batch: Sequence[Prepared]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(p_sensitive, features) per prepared request, computed together (one batch of cells)."""
        sizes = [len(b.cell_ids) for b in batch]
        if self.is_fitted:
            feats = self.model.transform(sp.vstack([b.csr for b in batch], format="csr"))  # type: ignore[attr-defined]
        else:
            fields = list(batch[0].tokens or {})
            block: dict[str, Any] = {k: [x for b in batch for x in (b.tokens or {})[k]] for k in fields}
            block["n_tokens"] = np.concatenate([(b.tokens or {})["n_tokens"] for b in batch])
            block["cell_id"] = np.concatenate([b.cell_ids for b in batch])
            feats = self.embed_tokens(block)
        p = self.head_proba(feats)
        out, start = [], 0
        for n in sizes:
            out.append((p[start:start + n], feats[start:start + n]))
            start += n
        return out

    def embed_tokens(self, block: dict[str, Any]) -> np.ndarray:
        if len(block["n_tokens"]) == 0:
            return np.zeros((0, 0), dtype=np.float32)
        return embed_block(self.model, self.module, block, self.batch_tokens, self.device)["embedding"]  # type: ignore[arg-type]

    def head_proba(self, feats: np.ndarray) -> np.ndarray:
        if len(feats) == 0:
            return np.zeros(0, dtype=np.float32)
        if self.torch_head is not None:
            import torch  # heavy: only LoRA heads are torch modules

            with torch.no_grad():
                logits = self.torch_head(torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32)))
                return torch.softmax(logits, dim=1)[:, 1].numpy().astype(np.float32)
        return np.asarray(self.head.predict_proba(feats), dtype=np.float32)

    def predict(
        self, cell_ids: Sequence[str], csr: sp.csr_matrix, genes: pd.DataFrame
    ) -> tuple[np.ndarray, np.ndarray]:
        return self.run([self.prepare(cell_ids, csr, genes)])[0]


def column_map(from_symbols: Sequence[str], to_symbols: Sequence[str]) -> np.ndarray:
    """int64 [len(from_symbols)]: each source column's position among ``to_symbols`` (-1: not there). A
    symbol that occurs twice in the target keeps its first column."""
    target = pd.Index([str(s) for s in to_symbols])
    first = ~target.duplicated()
    return pd.Index(target[first]).get_indexer([str(s) for s in from_symbols]).astype(np.int64) if len(target) else (
        np.full(len(from_symbols), -1, dtype=np.int64))


def remap_columns(csr: sp.csr_matrix, from_symbols: Sequence[str], to_symbols: Sequence[str]) -> sp.csr_matrix:
    """Cells over ``from_symbols`` columns -> cells over ``to_symbols`` columns (missing genes are zero)."""
    return remap_with(csr, column_map(from_symbols, to_symbols), len(to_symbols))


def remap_with(csr: sp.csr_matrix, col_map: np.ndarray, n_to: int) -> sp.csr_matrix:
    """``remap_columns`` with the column map computed once (``column_map``)."""
    csr = sp.csr_matrix(csr)
    new_idx = col_map[csr.indices]
    keep = new_idx >= 0
    counts = np.add.reduceat(keep.astype(np.int64), csr.indptr[:-1]) if csr.nnz else np.zeros(csr.shape[0], np.int64)
    counts[np.diff(csr.indptr) == 0] = 0  # reduceat repeats the next value for empty rows
    indptr = np.concatenate([[0], np.cumsum(counts)])
    out = sp.csr_matrix((csr.data[keep], new_idx[keep], indptr), shape=(csr.shape[0], n_to))
    out.sum_duplicates()
    return out


def gene_overlap(request_symbols: Sequence[str], vocabulary: Sequence[str]) -> tuple[int, list[str]]:
    """(number of request genes the model knows, the unknown ones)."""
    vocab = set(map(str, vocabulary))
    unknown = [str(s) for s in request_symbols if str(s) not in vocab]
    return len(request_symbols) - len(unknown), unknown


def summarize(p: np.ndarray, bins: int = 10) -> dict[str, Any]:
    p = np.asarray(p, dtype=np.float64)
    counts, edges = np.histogram(p, bins=bins, range=(0.0, 1.0))
    n_sens = int((p >= THRESHOLD).sum())
    return {
        "n_cells": len(p),
        "n_sensitive": n_sens,
        "n_resistant": len(p) - n_sens,
        "fraction_sensitive": round(n_sens / len(p), 6) if len(p) else 0.0,
        "mean_p_sensitive": round(float(p.mean()), 6) if len(p) else None,
        "threshold": THRESHOLD,
        "histogram": {"edges": [round(float(e), 4) for e in edges], "counts": counts.astype(int).tolist()},
    }
