"""Classifier heads: learning, early stopping, determinism, safe save/load, edge cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scdrugmap_ray.engine.errors import UserError
from scdrugmap_ray.engine.train.heads import LogRegHead, MLPHead, load_head, make_head
from sklearn.metrics import roc_auc_score


def blobs(n: int, d: int = 16, shift: float = 1.5, seed: int = 0, imbalance: float = 0.5):
    """Two Gaussian classes apart along a random direction, features on a large, uneven scale."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < imbalance).astype(np.int64)
    direction = rng.normal(size=d)
    direction /= np.linalg.norm(direction)
    x = rng.normal(size=(n, d)) + shift * np.outer(y, direction)
    x = x * rng.uniform(1, 100, size=d) + rng.uniform(-50, 50, size=d)  # standardisation must fix this
    return x.astype(np.float32), y


def split(x: np.ndarray, y: np.ndarray, n_train: int, n_val: int):
    return (x[:n_train], y[:n_train], x[n_train:n_train + n_val], y[n_train:n_train + n_val],
            x[n_train + n_val:], y[n_train + n_val:])


@pytest.mark.parametrize("name", ["mlp", "logreg"])
def test_learns_separable_problem(name: str) -> None:
    x, y = blobs(3000, shift=3.0, imbalance=0.25)
    xtr, ytr, xva, yva, xte, yte = split(x, y, 2000, 400)
    head = make_head(name, max_epochs=15, num_threads=1) if name == "mlp" else make_head(name)
    info = head.fit(xtr, ytr, xva, yva, seed=0)
    p = head.predict_proba(xte)
    assert p.dtype == np.float32 and p.shape == (len(yte),) and ((p >= 0) & (p <= 1)).all()
    assert roc_auc_score(yte, p) > 0.95
    # class weighting keeps the minority class recalled at threshold 0.5
    assert ((p >= 0.5) == yte)[yte == 1].mean() > 0.85
    assert info["head"] == name
    if name == "logreg":
        assert info["C"] in (0.01, 0.1, 1.0, 10.0) and len(info["val_log_loss_by_C"]) == 4


def test_mlp_early_stopping_restores_best_epoch() -> None:
    # noisy labels, few training cells, wide network: validation loss turns up after a few epochs
    rng = np.random.default_rng(1)
    x, y = blobs(900, d=40, shift=0.8, seed=1)
    flip = rng.random(len(y)) < 0.2
    y = np.where(flip, 1 - y, y)
    xtr, ytr, xva, yva, _, _ = split(x, y, 300, 600)
    head = MLPHead(max_epochs=200, patience=4, dropout=0.0, num_threads=1)
    info = head.fit(xtr, ytr, xva, yva, seed=0)
    assert info["early_stopping"]
    assert info["epochs"] < 200 and info["epochs"] == info["best_epoch"] + 4
    assert info["val_loss"] == pytest.approx(min(info["val_loss_history"]), abs=1e-5)
    # the head now IS the best epoch's network: its validation loss is the best one, not the last one
    w = np.asarray(info["class_weights"])[yva]
    p = head.predict_proba(xva).astype(np.float64)
    nll = -np.log(np.where(yva == 1, p, 1 - p))
    assert (w * nll).sum() / w.sum() == pytest.approx(info["val_loss"], rel=1e-4)
    assert info["val_loss_history"][-1] > info["val_loss"]


@pytest.mark.parametrize("name", ["mlp", "logreg"])
def test_deterministic_and_global_rng_untouched(name: str) -> None:
    x, y = blobs(800, seed=2)
    xtr, ytr, xva, yva, xte, _ = split(x, y, 500, 150)
    opts = {"max_epochs": 5, "num_threads": 1} if name == "mlp" else {}
    torch.manual_seed(123)
    before = torch.get_rng_state()
    threads = torch.get_num_threads()
    p1 = make_head(name, **opts)
    p1.fit(xtr, ytr, xva, yva, seed=4)
    assert torch.equal(torch.get_rng_state(), before)  # training does not reseed the caller's RNG
    assert torch.get_num_threads() == threads  # nor change the process's thread count
    p2 = make_head(name, **opts)
    p2.fit(xtr, ytr, xva, yva, seed=4)
    assert np.array_equal(p1.predict_proba(xte), p2.predict_proba(xte))
    if name == "mlp":
        p3 = make_head(name, **opts)
        p3.fit(xtr, ytr, xva, yva, seed=5)
        assert not np.array_equal(p1.predict_proba(xte), p3.predict_proba(xte))


@pytest.mark.parametrize("name", ["mlp", "logreg"])
def test_save_load_round_trip(name: str, tmp_path: Path) -> None:
    x, y = blobs(600, seed=3)
    xtr, ytr, xva, yva, xte, _ = split(x, y, 400, 100)
    opts = {"max_epochs": 3, "hidden": 64, "num_threads": 1} if name == "mlp" else {"C": 0.5}
    head = make_head(name, **opts)
    head.fit(xtr, ytr, xva, yva, seed=0)
    head.save(tmp_path / "head")
    assert sorted(p.name for p in (tmp_path / "head").iterdir()) == ["config.json", "weights.npz"]
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    assert config["head"] == name and config["options"] == head.options
    for loaded in (load_head(tmp_path / "head"), type(head).load(tmp_path / "head")):
        assert type(loaded) is type(head)
        assert np.array_equal(loaded.predict_proba(xte), head.predict_proba(xte))
    other = LogRegHead if name == "mlp" else MLPHead
    with pytest.raises(UserError, match="cannot be loaded"):
        other.load(tmp_path / "head")
    with pytest.raises(UserError, match="not a saved classifier head"):
        load_head(tmp_path)


def test_unusable_validation_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    x, y = blobs(500, shift=3.0, seed=4)
    xtr, ytr = x[:400], y[:400]
    mlp = MLPHead(epochs_without_val=3, num_threads=1)
    info = mlp.fit(xtr, ytr, x[:0], y[:0], seed=0)
    assert info["epochs"] == 3 and not info["early_stopping"]
    one_class = y[400:] == 1
    info = mlp.fit(xtr, ytr, x[400:][one_class], y[400:][one_class], seed=0)
    assert info["epochs"] == 3 and not info["early_stopping"]
    lr = LogRegHead()
    info = lr.fit(xtr, ytr, x[400:][one_class], y[400:][one_class], seed=0)
    assert info["C"] == 1.0 and "val_log_loss" not in info
    assert "logistic regression uses C = 1" in caplog.text
    assert roc_auc_score(y[400:], lr.predict_proba(x[400:])) > 0.95


def test_errors() -> None:
    x, y = blobs(100)
    with pytest.raises(UserError, match="unknown head 'svm'; heads: mlp, logreg"):
        make_head("svm")
    with pytest.raises(UserError, match=r"head 'mlp' has no option\(s\) lr_decay"):
        make_head("mlp", lr_decay=0.1)
    for name in ("mlp", "logreg"):
        with pytest.raises(UserError, match="one class only"):
            make_head(name).fit(x, np.zeros(100), x[:0], y[:0], seed=0)
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(UserError, match="NaN or inf"):
        make_head("logreg").fit(bad, y, x[:0], y[:0], seed=0)
    head = make_head("logreg", C=1.0)
    head.fit(x, y, x[:0], y[:0], seed=0)
    with pytest.raises(UserError, match="features have 3 dimensions but the head was trained on 16"):
        head.predict_proba(x[:, :3])
