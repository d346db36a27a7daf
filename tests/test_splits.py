"""Splits: no leakage (rows or samples), stratification, validation from training, few-shot, errors."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from scdrugmap_ray.engine.data.splits import Fold, cross_data_folds, pooled_folds
from scdrugmap_ray.engine.errors import UserError


def make_obs(
    datasets: dict[str, list[int]] | None = None, cells_per_sample: tuple[int, int] = (20, 60), seed: int = 0,
    unlabelled: int = 30,
) -> pd.DataFrame:
    """Cells of samples whose label is sample-level; ``datasets`` maps name -> label of each sample."""
    datasets = datasets or {"DS1": [1, 1, 1, 0, 0, 0], "DS2": [1, 1, 1, 1, 0, 0, 0], "DS3": [1, 1, 0, 0, 0, 0]}
    rng = np.random.default_rng(seed)
    parts = []
    for ds, labels in datasets.items():
        for i, lab in enumerate(labels):
            n = int(rng.integers(*cells_per_sample))
            # "P{i}" repeats across datasets on purpose: samples are identified within their dataset
            parts.append(pd.DataFrame({"label": float(lab), "dataset": ds, "sample": f"P{i}"}, index=range(n)))
    obs = pd.concat(parts, ignore_index=True)
    if unlabelled:
        extra = obs.sample(unlabelled, random_state=seed).assign(label=np.nan)
        obs = pd.concat([obs, extra], ignore_index=True)
    obs = obs.sample(frac=1.0, random_state=seed).reset_index(drop=True)  # rows in no particular order
    return obs


def check_disjoint(fold: Fold, obs: pd.DataFrame) -> None:
    tr, va, te = set(fold.train.tolist()), set(fold.val.tolist()), set(fold.test.tolist())
    assert not (tr & va) and not (tr & te) and not (va & te), fold.name
    for part in (fold.train, fold.val, fold.test):
        assert part.dtype == np.int64
        assert np.all(np.diff(part) > 0)  # sorted, unique
        assert obs.loc[part, "label"].notna().all()  # unlabelled cells never used


def sample_ids(obs: pd.DataFrame, rows: np.ndarray) -> set[str]:
    return set((obs.loc[rows, "dataset"] + "/" + obs.loc[rows, "sample"]).tolist())


# --------------------------------------------------------------------------------------------- pooled


def test_pooled_sample_holds_out_sensitive_resistant_pairs_of_a_dataset() -> None:
    """Each test fold takes a sensitive and a resistant sample of the same dataset together, so no
    dataset's training labels tilt towards one class (which anti-correlates a dataset-identity classifier
    with the test labels: AUROC 0.20 instead of 0.5 on the quickstart's null data before this rule)."""
    obs = make_obs({f"DS{d}": [1, 1, 0, 0] for d in range(4)}, unlabelled=0)
    for seed in range(3):
        folds = pooled_folds(obs, n_folds=4, split="sample", seed=seed)
        tested = sorted(s for f in folds for s in sample_ids(obs, f.test))
        assert len(tested) == len(set(tested)) == 16
        for f in folds:
            test_samples = obs.loc[f.test].drop_duplicates(["dataset", "sample"])
            per_dataset = test_samples.groupby("dataset")["label"].agg(["sum", "count"])
            assert (per_dataset["sum"] * 2 == per_dataset["count"]).all(), f.name  # as many sensitive as resistant
    # fewer pairs than folds: label-stratified samples, still both classes in every test fold
    obs = make_obs({"DS1": [1, 1, 1, 0], "DS2": [1, 0, 0, 0]}, unlabelled=0)
    for f in pooled_folds(obs, n_folds=3, split="sample", seed=0):
        assert set(obs.loc[f.test, "label"]) == {0.0, 1.0}


def test_pooled_sample_keeps_samples_whole_and_stratifies() -> None:
    obs = make_obs()
    labelled = obs.index[obs["label"].notna()]
    folds = pooled_folds(obs, n_folds=3, split="sample", seed=1)
    assert [f.name for f in folds] == [f"pooled/sample/fold{k}" for k in range(3)]
    test_union = np.concatenate([f.test for f in folds])
    assert sorted(test_union.tolist()) == sorted(labelled.tolist())  # every labelled cell tested exactly once
    for f in folds:
        check_disjoint(f, obs)
        assert f.scheme == "pooled" and f.test_dataset is None and f.few_shot_k == 0
        tr, va, te = sample_ids(obs, f.train), sample_ids(obs, f.val), sample_ids(obs, f.test)
        assert not (tr & te) and not (tr & va) and not (va & te)
        # stratified over samples: each test fold holds both classes, and so does validation
        assert set(obs.loc[f.test, "label"]) == {0.0, 1.0}
        assert set(obs.loc[f.val, "label"]) == {0.0, 1.0}
        # train + val = all labelled cells outside the test fold
        assert sorted([*f.train, *f.val]) == sorted(set(labelled) - set(f.test))


def test_pooled_same_sample_name_in_two_datasets_is_two_samples() -> None:
    obs = make_obs()
    f = pooled_folds(obs, n_folds=3, seed=0)[0]
    test_p0 = {d for d, s in zip(obs.loc[f.test, "dataset"], obs.loc[f.test, "sample"], strict=True) if s == "P0"}
    train_p0 = {d for d, s in zip(obs.loc[f.train, "dataset"], obs.loc[f.train, "sample"], strict=True) if s == "P0"}
    assert test_p0.isdisjoint(train_p0)
    # 19 samples in total are spread over folds, not 7 names
    assert sum(len(sample_ids(obs, x.test)) for x in pooled_folds(obs, n_folds=3, seed=0)) == 19


def test_pooled_cell_split_stratified_and_covers_all() -> None:
    obs = make_obs()
    y = obs["label"].dropna()
    folds = pooled_folds(obs, n_folds=5, split="cell", seed=3, val_fraction=0.2)
    assert sorted(np.concatenate([f.test for f in folds]).tolist()) == sorted(y.index.tolist())
    rate = y.mean()
    for f in folds:
        check_disjoint(f, obs)
        assert f.name.startswith("pooled/cell/")
        assert abs(obs.loc[f.test, "label"].mean() - rate) < 0.02  # stratified
        assert abs(len(f.val) / (len(f.val) + len(f.train)) - 0.2) < 0.01
        assert abs(obs.loc[f.val, "label"].mean() - rate) < 0.03


def test_pooled_deterministic_and_seed_dependent() -> None:
    obs = make_obs()
    a = pooled_folds(obs, 3, "sample", seed=7)
    b = pooled_folds(obs, 3, "sample", seed=7)
    c = pooled_folds(obs, 3, "sample", seed=8)
    for fa, fb in zip(a, b, strict=True):
        assert np.array_equal(fa.train, fb.train) and np.array_equal(fa.val, fb.val)
        assert np.array_equal(fa.test, fb.test)
    assert any(not np.array_equal(fa.test, fc.test) for fa, fc in zip(a, c, strict=True))


def test_pooled_val_fraction_zero_gives_no_val() -> None:
    folds = pooled_folds(make_obs(), 3, "sample", val_fraction=0.0)
    assert all(len(f.val) == 0 for f in folds)


def test_pooled_errors() -> None:
    obs = make_obs()
    with pytest.raises(UserError, match=r"sample_key.*split: cell"):
        pooled_folds(obs.assign(sample=None), 3, "sample")
    with pytest.raises(UserError, match=r"sample_key.*split: cell"):
        pooled_folds(obs.drop(columns="sample"), 3, "sample")
    partial = obs.copy()
    partial.loc[partial.index[:5], "sample"] = None
    with pytest.raises(UserError, match="5 labelled cells have no sample"):
        pooled_folds(partial, 3, "sample")
    with pytest.raises(UserError, match=r"labelled data \(datasets DS1, DS2, DS3\) has one class only \(resistant\)"):
        pooled_folds(obs.assign(label=obs["label"].where(obs["label"].isna(), 0.0)), 3, "cell")
    with pytest.raises(UserError, match=r"at least 8 sensitive samples .* has 7; use fewer folds .* or split: cell"):
        pooled_folds(make_obs({"A": [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0], "B": [1, 1, 1, 0]}), 8, "sample")
    with pytest.raises(UserError, match="unknown split 'donor'"):
        pooled_folds(obs, 3, "donor")
    with pytest.raises(UserError, match="at least 2 folds"):
        pooled_folds(obs, 1)
    with pytest.raises(UserError, match="no labelled cells"):
        pooled_folds(obs.assign(label=np.nan), 3)
    tiny = make_obs({"A": [1, 0]}, cells_per_sample=(2, 3), unlabelled=0)
    with pytest.raises(UserError, match="split: cell needs at least 5"):
        pooled_folds(tiny, 5, "cell")


# ----------------------------------------------------------------------------------------- cross-data


def test_cross_data_leave_one_out_zero_and_few_shot() -> None:
    obs = make_obs()
    folds = cross_data_folds(obs, holdout="each", few_shot=[5, 20], seed=2)
    assert [f.name for f in folds] == [f"cross_data/holdout={d}/k={k}" for d in ("DS1", "DS2", "DS3")
                                       for k in (0, 5, 20)]
    assert [f.fold for f in folds] == list(range(9))
    by_name = {f.name: f for f in folds}
    for f in folds:
        check_disjoint(f, obs)
        ds = f.test_dataset
        assert f.scheme == "cross_data"
        test_ds = obs.loc[f.test, "dataset"]
        assert (test_ds == ds).all()
        # validation only from the source datasets
        assert (obs.loc[f.val, "dataset"] != ds).all()
        zero = by_name[f"cross_data/holdout={ds}/k=0"]
        held_out = set(obs.index[(obs["dataset"] == ds) & obs["label"].notna()])
        assert set(zero.test) == held_out
        shots = set(f.train) - set(zero.train)
        assert shots == set(f.train[obs.loc[f.train, "dataset"].to_numpy() == ds])
        assert len(shots) == 2 * f.few_shot_k
        assert obs.loc[sorted(shots), "label"].value_counts().to_dict() == (
            {1.0: f.few_shot_k, 0.0: f.few_shot_k} if f.few_shot_k else {})
        assert set(f.test) == held_out - shots  # few-shot cells leave the test set
        assert np.array_equal(f.val, zero.val)  # few-shot cells never go to validation
    # the k=5 cells are among the k=20 cells
    s5 = set(by_name["cross_data/holdout=DS1/k=5"].train) - set(by_name["cross_data/holdout=DS1/k=0"].train)
    s20 = set(by_name["cross_data/holdout=DS1/k=20"].train) - set(by_name["cross_data/holdout=DS1/k=0"].train)
    assert s5 < s20


def test_cross_data_val_grouped_by_sample() -> None:
    obs = make_obs()
    for f in cross_data_folds(obs, seed=0, val_fraction=0.2):
        assert not (sample_ids(obs, f.train) & sample_ids(obs, f.val))
        assert set(obs.loc[f.val, "label"]) == {0.0, 1.0}
    # without samples, validation is a cell-level stratified fraction
    no_samples = obs.assign(sample=None)
    for f in cross_data_folds(no_samples, seed=0, val_fraction=0.2):
        check_disjoint(f, no_samples)
        assert abs(len(f.val) / (len(f.val) + len(f.train)) - 0.2) < 0.02


def test_cross_data_named_train_and_holdout_deterministic() -> None:
    obs = make_obs()
    folds = cross_data_folds(obs, holdout=["DS3"], train_datasets=["DS1"], few_shot=[3], seed=5)
    assert [f.name for f in folds] == ["cross_data/holdout=DS3/k=0", "cross_data/holdout=DS3/k=3"]
    assert set(obs.loc[folds[0].train, "dataset"]) == {"DS1"}
    assert set(obs.loc[folds[1].train, "dataset"]) == {"DS1", "DS3"}
    again = cross_data_folds(obs, holdout="DS3", train_datasets=["DS1"], few_shot=[3], seed=5)
    for a, b in zip(folds, again, strict=True):
        assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val) and np.array_equal(a.test, b.test)
    other = cross_data_folds(obs, holdout="DS3", train_datasets=["DS1"], few_shot=[3], seed=6)
    assert not np.array_equal(folds[1].train, other[1].train)


def test_cross_data_one_class_test_dataset_allowed_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    obs = make_obs({"A": [1, 1, 0, 0], "B": [1, 0, 0], "C": [0, 0]})
    with caplog.at_level(logging.WARNING):
        folds = cross_data_folds(obs, holdout="C")
    assert folds[0].test_dataset == "C" and len(folds[0].test) > 0
    assert "'C' has one class only" in caplog.text


def test_cross_data_errors() -> None:
    obs = make_obs({"A": [1, 1, 0, 0], "B": [1, 0, 0], "C": [0, 0]})
    with pytest.raises(UserError, match=r"unknown dataset\(s\) 'D'.*datasets with labelled cells: A, B, C"):
        cross_data_folds(obs, holdout=["D"])
    with pytest.raises(UserError, match=r"cross_data train: unknown dataset\(s\) 'X'"):
        cross_data_folds(obs, holdout="A", train_datasets=["X"])
    with pytest.raises(UserError, match=r"training data \(datasets C, 'A' held out\) has one class only"):
        cross_data_folds(obs, holdout="A", train_datasets=["C"])
    with pytest.raises(UserError, match=r"few_shot 10000: held-out dataset 'A' has only \d+ labelled"):
        cross_data_folds(obs, holdout="A", few_shot=[10000])
    with pytest.raises(UserError, match="at least two datasets"):
        cross_data_folds(obs.assign(dataset="A"))
    with pytest.raises(UserError, match="no training dataset left"):
        cross_data_folds(obs, holdout="A", train_datasets=["A"])
