"""Attributing the cells of one fold's trained model: the model as loaded or refitted (``FoldModel``), per-gene
attribution sums of batches of cells, in this process or across a pool of Ray actors (only per-gene sums
come back, so memory is bounded by the batch)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..data.splits import Fold
from ..data.store import CellStore
from ..runtime import init_ray
from ..train.frozen import load_fold_featurizer, load_fold_head
from .attribution import GeneSums, adapter_for, attribute_baseline, attribute_fm
from .options import ExplainOptions


@dataclass
class FoldModel:
    kind: str  # baseline | fm | lora | none
    model: Any
    head: Any
    reference: np.ndarray | None = None  # baselines: the mean prepared training cell
    module: Any = None
    p_test: np.ndarray | None = None


def labels_of(obs: pd.DataFrame, rows: np.ndarray) -> np.ndarray:
    return obs["label"].to_numpy()[rows].astype(np.int64)


def load_saved_fold(directory: Path, model: Any) -> tuple[Any, Any] | None:
    """(featurizer, head) saved by the runner for this fold, or None (older runs: refit instead)."""
    if not directory.is_dir():
        return None
    return load_fold_featurizer(directory, model), load_fold_head(directory)


def baseline_reference(model: Any, store: CellStore, fold: Fold, chunk: int = 2048) -> np.ndarray:
    """Mean prepared value per gene over the fold's training cells (streamed in chunks)."""
    total = np.zeros(store.n_genes)
    for start in range(0, len(fold.train), chunk):
        x = model.prepared(store.read_csr(fold.train[start:start + chunk]))
        total += np.asarray(x.sum(axis=0), dtype=np.float64).ravel()
    return (total / max(len(fold.train), 1)).astype(np.float32)


def cells_of(store: CellStore, rows: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray], Any]:
    x = store.read_csr(rows)
    gi = [x.indices[x.indptr[i]:x.indptr[i + 1]].astype(np.int32) for i in range(x.shape[0])]
    vals = [x.data[x.indptr[i]:x.indptr[i + 1]].astype(np.float32) for i in range(x.shape[0])]
    return gi, vals, x


def finetuned_p(fmod: FoldModel, store: CellStore, obs: pd.DataFrame, rows: np.ndarray, batch_cells: int) -> np.ndarray:
    """p(sensitive) of some cells by the loaded LoRA backbone + head, in this process (padding is masked,
    so a cell's value does not depend on its batch)."""
    import torch  # heavy: only LoRA folds need it here

    fm = fmod.model
    tokenizer = fm.make_tokenizer(store.genes)
    ids = obs["cell_id"].astype(str).to_numpy()
    out = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_cells):
            part = rows[start:start + batch_cells]
            gi, vals, _ = cells_of(store, part)
            batch = fm.collate(tokenizer(ids[part], gi, vals))
            logits = fmod.head(fm.embed(fmod.module, batch).float())
            out.append(torch.softmax(logits, dim=1)[:, 1].numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


def attribute_rows(fmod: FoldModel, store: CellStore, obs: pd.DataFrame, rows: np.ndarray,
                   opts: ExplainOptions, levels: dict[str, np.ndarray]) -> dict[str, GeneSums]:
    """Per-gene attribution sums of the given cells, by grouping level (``all``, ``dataset``, ...)."""
    sums = {lvl: GeneSums(store.n_genes) for lvl in levels}
    labels = labels_of(obs, rows)
    tokenizer = None
    if fmod.kind in ("fm", "lora"):
        fm = fmod.model
        adapter = adapter_for(fm.name)
        assert adapter is not None
        tokenizer = fm.make_tokenizer(store.genes)
        if fmod.module is None:
            fmod.module = fm.load()
    for start in range(0, len(rows), opts.batch_cells):
        part = rows[start:start + opts.batch_cells]
        if fmod.kind == "baseline":
            assert fmod.reference is not None
            attr, delta = attribute_baseline(fmod.model, fmod.head, store.read_csr(part), fmod.reference,
                                             n_steps=opts.n_steps)
            scale = np.abs(attr.sum(axis=1)) + 1e-12
        else:
            gi, vals, _ = cells_of(store, part)
            ids = obs["cell_id"].astype(str).to_numpy()[part]
            attr, delta, _ = attribute_fm(fmod.model, fmod.module, fmod.head, tokenizer, adapter,
                                          ids, gi, vals, store.n_genes, opts.method, max(4, opts.n_steps // 2))
            scale = np.abs(attr.sum(axis=1)) + 1e-12
        sl = slice(start, start + len(part))
        for lvl, groups in levels.items():
            sums[lvl].add(attr, groups[rows[sl]], labels[sl])
        sums["all"].deltas.extend((np.asarray(delta) / scale).tolist())
    return sums


class _Attributor:
    """A Ray actor holding one fold's model: attributes batches of cells, returns per-gene sums only."""

    def __init__(self, store_path: str, obs: pd.DataFrame, levels: dict[str, np.ndarray], opts: ExplainOptions) -> None:
        import torch  # heavy: loaded in the actor process only

        torch.set_num_threads(1)
        self.store = CellStore.open(store_path)
        self.obs, self.levels, self.opts = obs, levels, opts
        self.fmod: FoldModel | None = None

    def set_fold(self, fmod: FoldModel) -> None:
        self.fmod = fmod

    def attribute(self, rows: np.ndarray) -> dict[str, GeneSums]:
        assert self.fmod is not None
        return attribute_rows(self.fmod, self.store, self.obs, rows, self.opts, self.levels)


class AttributorPool:
    """``workers`` Ray actors (1 CPU each); a fold's cells are attributed batch by batch across them and
    the per-gene sums merged on the driver, so no actor or the driver holds more than a batch of cells."""

    def __init__(self, workers: int, store: CellStore, obs: pd.DataFrame, levels: dict[str, np.ndarray],
                 opts: ExplainOptions) -> None:
        import ray  # heavy: only a pool of workers starts Ray

        init_ray(None)
        cls = ray.remote(num_cpus=1)(_Attributor)
        obs_ref, levels_ref = ray.put(obs), ray.put(levels)
        self.actors = [cls.remote(str(store.path), obs_ref, levels_ref, opts) for _ in range(workers)]

    def run(self, fmod: FoldModel, rows: np.ndarray, batch_cells: int) -> dict[str, GeneSums]:
        import ray
        from ray.util import ActorPool

        ref = ray.put(fmod)
        ray.get([a.set_fold.remote(ref) for a in self.actors])
        batches = [rows[i:i + batch_cells] for i in range(0, len(rows), batch_cells)]
        merged: dict[str, GeneSums] = {}
        for part in ActorPool(self.actors).map_unordered(lambda a, r: a.attribute.remote(r), batches):
            for lvl, gs in part.items():
                merged.setdefault(lvl, GeneSums(gs.n_genes)).merge(gs)
        return merged

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
