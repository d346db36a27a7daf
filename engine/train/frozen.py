"""The ``frozen`` strategy (scDrugMap's "layer freezing", EBD): features + a trained classifier head.

Features come either from a cached embedding of every cell (pretrained / precomputed models) or from
a featurizer fitted on the fold's training cells only (baselines). The head picks its epoch or its
regularisation on the validation cells; the test cells are only ever predicted.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..data.splits import Fold
from ..data.store import CellStore
from ..models.base import EmbeddingModel, FittedFeatureModel, Model
from .heads import make_head

log = logging.getLogger(__name__)


@dataclass
class FoldOutcome:
    """Predictions on the test cells of one fold, with what training did and how long it took."""

    test_rows: np.ndarray
    y_true: np.ndarray
    p_sensitive: np.ndarray
    train_info: dict[str, Any] = field(default_factory=dict)
    fit_seconds: float = 0.0
    predict_seconds: float = 0.0


def _labels(obs: pd.DataFrame, rows: np.ndarray) -> np.ndarray:
    return obs["label"].to_numpy()[rows].astype(np.int64)


def fold_features(
    model: Model, store: CellStore, fold: Fold, seed: int, embedding: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features of the train, validation and test cells of a fold."""
    if isinstance(model, EmbeddingModel):
        if embedding is None:
            embedding = model.embed_store(store)
        return embedding[fold.train], embedding[fold.val], embedding[fold.test]
    if isinstance(model, FittedFeatureModel):
        rows = np.concatenate([fold.train, fold.val, fold.test])
        cells = store.read_csr(rows)
        n_tr, n_va = len(fold.train), len(fold.val)
        model.fit(cells[:n_tr], store.genes, seed)
        feats = model.transform(cells)
        return feats[:n_tr], feats[n_tr : n_tr + n_va], feats[n_tr + n_va :]
    raise TypeError(f"model {model.name!r} is neither an EmbeddingModel nor a FittedFeatureModel")


def run_frozen_fold(
    model: Model,
    store: CellStore,
    obs: pd.DataFrame,
    fold: Fold,
    head_name: str,
    head_options: dict[str, Any],
    seed: int,
    embedding: np.ndarray | None = None,
) -> FoldOutcome:
    t0 = time.perf_counter()
    x_train, x_val, x_test = fold_features(model, store, fold, seed, embedding)
    head = make_head(head_name, **head_options)
    info = head.fit(x_train, _labels(obs, fold.train), x_val, _labels(obs, fold.val), seed)
    t1 = time.perf_counter()
    p = np.asarray(head.predict_proba(x_test), dtype=np.float32)
    t2 = time.perf_counter()
    log.debug("fold %s: trained %s head on %d cells (%s)", fold.name, head_name, len(fold.train), info)
    return FoldOutcome(
        test_rows=fold.test,
        y_true=_labels(obs, fold.test),
        p_sensitive=p,
        train_info=dict(info or {}),
        fit_seconds=t1 - t0,
        predict_seconds=t2 - t1,
    )
