"""The ``frozen`` strategy (scDrugMap's "layer freezing", EBD): features + a trained classifier head.

Features come either from a cached embedding of every cell (pretrained / precomputed models) or from
a featurizer fitted on the fold's training cells only (baselines). The head picks its epoch or its
regularisation on the validation cells; the test cells are only ever predicted.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from ..data.splits import Fold
from ..data.store import CellStore
from ..errors import UserError
from ..fsutil import atomic_dir, write_json
from ..models.base import EmbeddingModel, FittedFeatureModel, FoundationModel, Model
from ..pipeline.embed import EmbeddingSet, embed_store
from .heads import Head, make_head

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


#: cell metadata as the runner has it (pandas) or as fold tasks receive it (an Arrow table, zero-copy)
Obs = pd.DataFrame | pa.Table


def obs_columns(obs: Obs) -> list[str]:
    return list(obs.column_names if isinstance(obs, pa.Table) else obs.columns)


def obs_rows(obs: Obs, rows: np.ndarray, columns: list[str]) -> pd.DataFrame:
    """The given columns of the given store rows, as a fresh DataFrame (0..n-1 index)."""
    if isinstance(obs, pa.Table):
        return obs.select(columns).take(pa.array(np.asarray(rows, dtype=np.int64))).to_pandas()
    return obs.loc[rows, columns].reset_index(drop=True)


def _labels(obs: Obs, rows: np.ndarray) -> np.ndarray:
    col = obs.column("label") if isinstance(obs, pa.Table) else obs["label"]
    return np.asarray(col.to_numpy(), dtype=np.float64)[rows].astype(np.int64)


def store_embedding(model: EmbeddingModel, store: CellStore) -> np.ndarray:
    """float32 [n_cells, d] of every cell of the store: foundation models through the Ray Data pipeline,
    other embedding models (precomputed obsm, ...) by their own ``embed_store``."""
    if isinstance(model, FoundationModel):
        return embed_store(model, store)
    return model.embed_store(store)


def fold_features(
    model: Model, store: CellStore, fold: Fold, seed: int, embedding: np.ndarray | EmbeddingSet | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features of the train, validation and test cells of a fold (an ``EmbeddingSet`` is read for those
    rows only)."""
    if isinstance(model, EmbeddingModel):
        if isinstance(embedding, EmbeddingSet):
            return embedding.take(fold.train), embedding.take(fold.val), embedding.take(fold.test)
        if embedding is None:
            embedding = store_embedding(model, store)
        return embedding[fold.train], embedding[fold.val], embedding[fold.test]
    if isinstance(model, FittedFeatureModel):
        # Atlas-sized folds: the featurizer is fitted on at most `fit_cells` training cells (a seeded
        # subsample, logged), then every cell is transformed shard by shard: the task never holds the
        # expression of the whole fold, only its features.
        fit_rows = fit_subsample(fold.train, int(model.options.get("fit_cells") or len(fold.train)), seed)
        if len(fit_rows) < len(fold.train):
            log.info("%s: featurizer fitted on a seeded subsample of %d of the %d training cells", model.name,
                     len(fit_rows), len(fold.train))
        model.fit(store.read_csr(fit_rows), store.genes, seed)
        return tuple(transform_rows(model, store, rows) for rows in (fold.train, fold.val, fold.test))  # type: ignore[return-value]
    raise TypeError(f"model {model.name!r} is neither an EmbeddingModel nor a FittedFeatureModel")


def fit_subsample(rows: np.ndarray, most: int, seed: int) -> np.ndarray:
    """``rows`` itself when it has at most ``most`` cells, else a seeded random subset of ``most`` (sorted)."""
    if len(rows) <= most:
        return rows
    rng = np.random.default_rng([seed, len(rows), most])
    return np.sort(rng.choice(rows, size=most, replace=False))


def transform_rows(model: FittedFeatureModel, store: CellStore, rows: np.ndarray) -> np.ndarray:
    """float32 features of the given store rows, in that order, reading one shard's cells at a time."""
    rows = np.asarray(rows, dtype=np.int64)
    offsets = store.shard_offsets
    shard = np.searchsorted(offsets, rows, side="right") - 1
    out: np.ndarray | None = None
    for s in np.unique(shard):
        at = np.flatnonzero(shard == s)
        feats = model.transform(store.read_csr(rows[at]))
        if out is None:
            out = np.empty((len(rows), feats.shape[1]), dtype=np.float32)
        out[at] = feats
    if out is None:  # no rows: the width from an empty transform
        out = np.asarray(model.transform(store.read_csr(rows)), dtype=np.float32)
    return out


def run_frozen_fold(
    model: Model,
    store: CellStore,
    obs: Obs,
    fold: Fold,
    head_name: str,
    head_options: dict[str, Any],
    seed: int,
    embedding: np.ndarray | EmbeddingSet | None = None,
    save_dir: Path | None = None,
) -> FoldOutcome:
    """Train the fold's head (and the baseline's featurizer), predict its test cells; with ``save_dir``,
    also write the fitted head and featurizer there (``save_fold_model``), for the model registry."""
    t0 = time.perf_counter()
    x_train, x_val, x_test = fold_features(model, store, fold, seed, embedding)
    head = make_head(head_name, **head_options)
    info = head.fit(x_train, _labels(obs, fold.train), x_val, _labels(obs, fold.val), seed)
    if save_dir is not None:
        save_fold_model(save_dir, model, head, store.genes, dict(info or {}))
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


# ------------------------------------------------------------------------------ saved fold models
# A fold's fitted model, in safe formats only (safetensors + JSON + Parquet), for the model registry:
#   config.json          {"kind": "frozen", "model", "model_options", "head", "train_info"}
#   head.safetensors     the head's learned arrays (scaler, weights); head.json its name and options
#   featurizer.safetensors + featurizer.json   a baseline's fitted state (PCA axes, chosen genes, ...)
#   genes.parquet        the training store's genes (position, symbol, ensembl_id)

FOLD_CONFIG = "config.json"
HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "head.json"
FEATURIZER_ARRAYS = "featurizer.safetensors"
FEATURIZER_CONFIG = "featurizer.json"
GENES = "genes.parquet"


def save_fold_model(directory: Path, model: Model, head: Head, genes: Any, train_info: dict[str, Any]) -> Path:
    """Write a fold's fitted head (and a baseline's fitted featurizer) into ``directory``, atomically."""
    from safetensors.numpy import save_file

    with atomic_dir(Path(directory), overwrite=True) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in head._arrays().items()}, str(tmp / HEAD_WEIGHTS))
        write_json(tmp / HEAD_CONFIG, {"head": head.name, "options": head.options})
        if isinstance(model, FittedFeatureModel):
            state = model.state()  # type: ignore[attr-defined]
            arrays = {k: np.ascontiguousarray(v) for k, v in state.items() if isinstance(v, np.ndarray)}
            save_file(arrays, str(tmp / FEATURIZER_ARRAYS))
            write_json(tmp / FEATURIZER_CONFIG, {k: v for k, v in state.items() if k not in arrays})
        genes.to_parquet(tmp / GENES, index=False)
        write_json(tmp / FOLD_CONFIG, {"kind": "frozen", "model": model.name, "model_options": model.options,
                                       "head": head.name, "train_info": train_info})
    return Path(directory)


def load_fold_head(directory: Path) -> Head:
    """The head saved by ``save_fold_model``."""
    from safetensors.numpy import load_file

    directory = Path(directory)
    try:
        cfg = json.loads((directory / HEAD_CONFIG).read_text())
        arrays = load_file(str(directory / HEAD_WEIGHTS))
    except (OSError, ValueError) as exc:
        raise UserError(f"{directory} holds no saved classifier head ({exc})") from None
    head = make_head(cfg["head"], **cfg.get("options", {}))
    head._set_arrays(arrays)
    return head


def load_fold_featurizer(directory: Path, model: Model) -> Model:
    """Restore a baseline's fitted featurizer state saved by ``save_fold_model`` into ``model``."""
    from safetensors.numpy import load_file

    directory = Path(directory)
    if not isinstance(model, FittedFeatureModel):
        return model
    try:
        state = json.loads((directory / FEATURIZER_CONFIG).read_text())
        state.update(load_file(str(directory / FEATURIZER_ARRAYS)))
    except (OSError, ValueError) as exc:
        raise UserError(f"{directory} holds no fitted featurizer for {model.name!r} ({exc})") from None
    model.load_state(state)  # type: ignore[attr-defined]
    return model
