"""Train / validation / test splits of a cell store's labelled cells.

Two schemes:

* ``pooled``: k-fold cross-validation over all datasets together. ``split="sample"`` (the default)
  keeps every sample whole on one side of a fold: drug-response labels are given per sample, so a
  cell-level split puts cells of the same sample (same patient, same label) in train and test and
  the classifier can score well by recognising the sample instead of the response. ``split="cell"``
  is scDrugMap's cell-level stratified split, kept to compare with the paper.
* ``cross_data``: train on some datasets, test on a held-out one (leave-one-dataset-out by default).
  Zero-shot (k = 0) always; few-shot k adds k labelled cells per class of the held-out dataset to
  training, and the rest of that dataset is the test set.

A validation set is always carved from the training side (never from the test fold): it picks the
epoch or the regularisation of the head. Unlabelled cells (label NaN) are never used. Every split is
a deterministic function of (obs, options, seed).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import UserError

log = logging.getLogger(__name__)

SPLITS = ("sample", "cell")


@dataclass(frozen=True)
class Fold:
    scheme: str  # "pooled" | "cross_data"
    fold: int  # index within the scheme
    name: str  # e.g. "pooled/sample/fold0", "cross_data/holdout=DS1/k=5"
    train: np.ndarray  # int64 row indices (global store rows)
    val: np.ndarray  # carved from training data, used only for model selection / early stopping
    test: np.ndarray
    test_dataset: str | None
    few_shot_k: int  # 0 = none


# ------------------------------------------------------------------------------------------ helpers


def _labelled(obs: pd.DataFrame) -> pd.DataFrame:
    """The labelled cells, indexed by global row number, with an integer ``y`` column."""
    for col in ("label", "dataset"):
        if col not in obs.columns:
            raise UserError(f"cell metadata has no {col!r} column; convert the data with scdrugmap-ray convert")
    lab = obs.loc[obs["label"].notna(), [c for c in ("label", "dataset", "sample") if c in obs.columns]].copy()
    if lab.empty:
        raise UserError("no labelled cells (every label is unknown); convert the data with --label-key and check "
                        "the --sensitive/--resistant values")
    lab["y"] = lab["label"].to_numpy().astype(np.int64)
    lab["dataset"] = lab["dataset"].astype("string").fillna("<none>")
    return lab


def _rows(index: pd.Index | np.ndarray) -> np.ndarray:
    return np.sort(np.asarray(index, dtype=np.int64))


def _require_two_classes(y: np.ndarray, where: str, fix: str) -> None:
    present = set(np.unique(y).tolist())
    if present != {0, 1}:
        only = "sensitive" if present == {1} else "resistant"
        raise UserError(f"{where} has one class only ({only}) but this split needs both sensitive and resistant "
                        f"cells; {fix}")


def _sample_groups(lab: pd.DataFrame, what: str) -> pd.Series:
    """Sample identity per labelled cell; names are qualified by dataset (two datasets may both have 'P1')."""
    if "sample" not in lab.columns or lab["sample"].isna().all():
        raise UserError(f"{what} groups cells by sample but the data has no sample column; set sample_key in the "
                        "data entry (or convert with --sample-key), or use split: cell")
    missing = int(lab["sample"].isna().sum())
    if missing:
        raise UserError(f"{what} groups cells by sample but {missing} labelled cells have no sample; fill the "
                        "sample column for every cell, or use split: cell")
    return lab["dataset"].astype(str) + "/" + lab["sample"].astype(str)


def _sample_labels(y: pd.Series, groups: pd.Series) -> pd.Series:
    """One label per sample (the majority; labels are sample-level in practice)."""
    return y.groupby(groups.to_numpy()).mean().ge(0.5).astype(np.int64)


def _n_val(fraction: float, n: int) -> int:
    """How many of n members (cells or samples of one class) go to validation: at least one when the
    class has two or more, and never all of them (training keeps at least one of each class)."""
    if fraction <= 0 or n < 2:
        return 0
    return min(max(round(fraction * n), 1), n - 1)


def _carve_val_cells(rows: np.ndarray, y: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A stratified random fraction of cells (at least one per class when a class has two or more)."""
    picked = []
    for c in (0, 1):
        members = rows[y == c]
        picked.append(rng.permutation(members)[: _n_val(fraction, len(members))])
    return np.concatenate(picked)


def _carve_val_samples(
    rows: np.ndarray, groups: np.ndarray, y: np.ndarray, fraction: float, rng: np.random.Generator
) -> np.ndarray:
    """Whole samples for validation, stratified by sample label: both classes when each has 2+ samples."""
    sample_y = _sample_labels(pd.Series(y), pd.Series(groups))
    chosen: list[str] = []
    for c in (0, 1):
        members = np.sort(sample_y.index[sample_y.to_numpy() == c].to_numpy().astype(str))
        chosen.extend(rng.permutation(members)[: _n_val(fraction, len(members))].tolist())
    if fraction > 0 and not chosen:
        log.warning("too few training samples to carve a sample-level validation set; the head trains without one")
    return rows[np.isin(groups.astype(str), np.asarray(chosen, dtype=str))]


def _rng(seed: int, *parts: str | int) -> np.random.Generator:
    """A generator seeded by the user seed and a stable hash of what it is for (fold, dataset, ...)."""
    key = [seed & 0xFFFFFFFF, *(zlib.crc32(str(p).encode()) for p in parts)]
    return np.random.default_rng(key)


# ------------------------------------------------------------------------------------------- pooled


def pooled_folds(
    obs: pd.DataFrame, n_folds: int = 5, split: str = "sample", seed: int = 0, val_fraction: float = 0.1
) -> list[Fold]:
    """k-fold cross-validation over all labelled cells of all datasets."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use one of: {', '.join(SPLITS)}")
    if n_folds < 2:
        raise UserError(f"pooled evaluation needs at least 2 folds, got {n_folds}")
    lab = _labelled(obs)
    names = ", ".join(sorted(lab["dataset"].unique().tolist()))
    _require_two_classes(lab["y"].to_numpy(), f"the labelled data (datasets {names})",
                         "add data with the other class, or check the --sensitive/--resistant values of convert")
    rows_all = lab.index.to_numpy(dtype=np.int64)
    y_all = lab["y"].to_numpy()
    folds: list[Fold] = []

    if split == "cell":
        from sklearn.model_selection import StratifiedKFold

        counts = np.bincount(y_all, minlength=2)
        if counts.min() < n_folds:
            cls = "sensitive" if counts[1] < n_folds else "resistant"
            raise UserError(f"pooled split: cell needs at least {n_folds} {cls} cells (one per fold), found "
                            f"{counts.min()}; use fewer folds")
        skf = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed & 0xFFFFFFFF)
        for k, (tr, te) in enumerate(skf.split(np.zeros(len(y_all)), y_all)):
            val = _carve_val_cells(rows_all[tr], y_all[tr], val_fraction, _rng(seed, "pooled-cell-val", k))
            train = np.setdiff1d(rows_all[tr], val)
            folds.append(Fold("pooled", k, f"pooled/cell/fold{k}", _rows(train), _rows(val), _rows(rows_all[te]),
                              None, 0))
        return folds

    # split == "sample": stratified k-fold over SAMPLES, so every test fold gets whole samples of both
    # classes. (sklearn's StratifiedGroupKFold balances cell counts instead, and with sample-level labels
    # and uneven sample sizes it can leave a test fold with one class only.)
    groups = _sample_groups(lab, "pooled split: sample")
    sample_y = _sample_labels(lab["y"], groups)
    for c, cls in ((1, "sensitive"), (0, "resistant")):
        n = int((sample_y == c).sum())
        if n < n_folds:
            raise UserError(f"pooled split: sample needs at least {n_folds} {cls} samples (one per fold) but the "
                            f"data has {n}; use fewer folds (folds: {max(n, 2)}) or split: cell")
    names = sample_y.index.to_numpy().astype(str)
    order = np.argsort(names)  # fold assignment must not depend on the order samples appear in
    names, sy = names[order], sample_y.to_numpy()[order]
    g_all = groups.to_numpy().astype(str)
    for k, te_s in enumerate(_sample_fold_tests(names, sy, n_folds, seed)):
        is_test = np.isin(g_all, names[te_s])
        tr_rows, tr_groups, tr_y = rows_all[~is_test], g_all[~is_test], y_all[~is_test]
        val = _carve_val_samples(tr_rows, tr_groups, tr_y, val_fraction, _rng(seed, "pooled-sample-val", k))
        train = np.setdiff1d(tr_rows, val)
        folds.append(Fold("pooled", k, f"pooled/sample/fold{k}", _rows(train), _rows(val),
                          _rows(rows_all[is_test]), None, 0))
    return folds


def _sample_fold_tests(names: np.ndarray, sample_y: np.ndarray, n_folds: int, seed: int) -> list[np.ndarray]:
    """Test samples of each fold (indices into ``names``, which are "dataset/sample").

    Samples are held out in pairs: within each dataset a sensitive sample is paired with a resistant one
    (seeded), and the pairs (then the unpaired rest) are dealt round-robin to the folds. The training
    side thus keeps each dataset's label balance. Holding out samples stratified by label alone can take
    one class of a dataset out and tilt its training labels the other way; a classifier that has learnt
    dataset identity is then anti-correlated with the test labels (AUROC far below 0.5 on data with no
    signal). When there are fewer pairs than folds, falls back to stratifying samples by label."""
    from sklearn.model_selection import StratifiedKFold

    rng = _rng(seed, "pooled-sample-pairs")
    dataset = np.array([n.split("/", 1)[0] for n in names])
    pairs: list[list[int]] = []
    singles: list[list[int]] = []
    for ds in np.unique(dataset):
        sens = rng.permutation(np.flatnonzero((dataset == ds) & (sample_y == 1))).tolist()
        res = rng.permutation(np.flatnonzero((dataset == ds) & (sample_y == 0))).tolist()
        n = min(len(sens), len(res))
        pairs += [[a, b] for a, b in zip(sens[:n], res[:n], strict=True)]
        singles += [[x] for x in sens[n:] + res[n:]]
    if len(pairs) >= n_folds:
        blocks = [pairs[i] for i in rng.permutation(len(pairs))] + [singles[i] for i in rng.permutation(len(singles))]
        tests: list[list[int]] = [[] for _ in range(n_folds)]
        for i, block in enumerate(blocks):
            tests[i % n_folds] += block
        return [np.sort(np.asarray(t, dtype=np.int64)) for t in tests]
    skf = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed & 0xFFFFFFFF)
    return [te for _, te in skf.split(np.zeros(len(names)), sample_y)]


# --------------------------------------------------------------------------------------- cross-data


def cross_data_folds(
    obs: pd.DataFrame,
    holdout: str | list[str] = "each",
    train_datasets: list[str] | None = None,
    few_shot: Sequence[int] = (),
    seed: int = 0,
    val_fraction: float = 0.1,
) -> list[Fold]:
    """One fold per (held-out dataset, k): train on the other datasets (or ``train_datasets``), test on
    the held-out one. k = 0 (zero-shot) always runs; each k in ``few_shot`` adds k labelled cells per
    class of the held-out dataset to training (not to validation), and the rest of it is the test set.

    The training side must hold both classes. A held-out dataset with one class only is allowed (its
    accuracy, F1, precision and recall are defined) but its AUROC, AUPRC and macro-F1 will be NaN.
    """
    lab = _labelled(obs)
    available = sorted(lab["dataset"].unique().tolist())
    if len(available) < 2:
        raise UserError(f"cross_data needs at least two datasets with labelled cells, found {available}; set "
                        "dataset_key in the data entry (or convert with --dataset-key), or use only pooled")

    def check(names: list[str], what: str) -> None:
        unknown = [n for n in names if n not in available]
        if unknown:
            raise UserError(f"cross_data {what}: unknown dataset(s) {', '.join(map(repr, unknown))}; datasets with "
                            f"labelled cells: {', '.join(available)}")

    held = list(dict.fromkeys([holdout] if isinstance(holdout, str) else holdout))
    if held == ["each"]:
        held = available
    if not held:
        raise UserError("cross_data holdout is empty; name datasets to hold out, or use holdout: each")
    check(held, "holdout")
    if train_datasets is not None:
        check(list(train_datasets), "train")
    ks = sorted({0, *(int(k) for k in few_shot)})
    if ks[0] < 0:
        raise UserError(f"few_shot values are cells per class and must be positive, got {list(few_shot)}")

    rows_all = lab.index.to_numpy(dtype=np.int64)
    ds_all = lab["dataset"].to_numpy().astype(str)
    y_all = lab["y"].to_numpy()
    has_samples = "sample" in lab.columns and lab["sample"].notna().all()
    g_all = (lab["dataset"].astype(str) + "/" + lab["sample"].astype(str)).to_numpy() if has_samples else None

    folds: list[Fold] = []
    for ds in held:
        sources = [d for d in (train_datasets if train_datasets is not None else available) if d != ds]
        if not sources:
            raise UserError(f"cross_data: no training dataset left when holding out {ds!r}; name other datasets in "
                            "train")
        in_train = np.isin(ds_all, sources)
        _require_two_classes(
            y_all[in_train], f"cross_data training data (datasets {', '.join(sources)}, {ds!r} held out)",
            "add a dataset with the other class to training, or hold out another dataset",
        )
        in_test = ds_all == ds
        test_rows, test_y = rows_all[in_test], y_all[in_test]
        present = sorted(set(test_y.tolist()))
        if len(present) < 2:
            log.warning("held-out dataset %r has one class only: its AUROC, AUPRC and macro-F1 will be NaN", ds)

        # Validation comes from the source datasets only: whole samples when every cell has one.
        tr_rows, tr_y = rows_all[in_train], y_all[in_train]
        vrng = _rng(seed, "cross-val", ds)
        if g_all is not None:
            val = _carve_val_samples(tr_rows, g_all[in_train], tr_y, val_fraction, vrng)
        else:
            val = _carve_val_cells(tr_rows, tr_y, val_fraction, vrng)
        base_train = np.setdiff1d(tr_rows, val)

        # Few-shot cells: the first k of one seeded permutation per class, so the k=5 cells are among
        # the k=20 cells (curves over k compare like with like).
        srng = _rng(seed, "few-shot", ds)
        perms = {c: srng.permutation(test_rows[test_y == c]) for c in (0, 1)}
        for k in ks:
            shots = np.empty(0, dtype=np.int64)
            if k:
                for c in present:
                    if len(perms[c]) < k:
                        cls = "sensitive" if c == 1 else "resistant"
                        raise UserError(f"cross_data few_shot {k}: held-out dataset {ds!r} has only {len(perms[c])} "
                                        f"labelled {cls} cells; use smaller few_shot values or hold out other datasets")
                    shots = np.concatenate([shots, perms[c][:k]])
                if len(present) < 2:
                    log.warning("few-shot k=%d on %r samples the one class it has only", k, ds)
            folds.append(Fold(
                "cross_data", len(folds), f"cross_data/holdout={ds}/k={k}",
                _rows(np.concatenate([base_train, shots])), _rows(val), _rows(np.setdiff1d(test_rows, shots)),
                ds, k,
            ))
    return folds


# ------------------------------------------------------------------------------------ train / val


def train_val_split(
    obs: pd.DataFrame, val_fraction: float = 0.1, seed: int = 0, by: str = "sample"
) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, validation rows) of all labelled cells, for a single training run (``finetune``):
    whole samples go to validation when the data has samples (``by="sample"``), else cells."""
    lab = _labelled(obs)
    rows, y = _rows(lab.index), lab.loc[_rows(lab.index), "y"].to_numpy()
    _require_two_classes(y, "the labelled cells", "label both classes")
    rng = _rng(seed, "train_val")
    if by == "sample" and "sample" in lab.columns and lab["sample"].notna().all():
        groups = _sample_groups(lab, "the validation split").loc[rows].to_numpy()
        val = _carve_val_samples(rows, groups, y, val_fraction, rng)
    else:
        val = _carve_val_cells(rows, y, val_fraction, rng)
    train = np.setdiff1d(rows, val)
    return train, np.sort(val)
