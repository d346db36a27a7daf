"""Classifier heads trained on cell features (embeddings or baseline features).

* ``mlp``: scDrugMap's classifier, Linear(d, 512) - ReLU - Linear(512, 512) - ReLU - Linear(512, 2).
  Where we follow and where we differ from scDrugMap's EBD scripts (``MLP_Classifier`` in
  code/*/benchmarking_main_EBD.py):
  - same layer sizes, ReLU, AdamW, two output logits (class 1 = sensitive);
  - we add Dropout after each hidden ReLU (default 0.1; ``dropout: 0`` gives the original network);
  - features are standardised with the training cells' mean and std (the original feeds raw
    embeddings; scales differ wildly between models and the baselines' features);
  - cross-entropy weighted by inverse class frequency (drug-response data are often imbalanced; the
    original uses unweighted BCEWithLogits on one-hot targets, which is the same loss for 2 classes);
  - lr 1e-3 and batch 256 (original: 1e-4, 128) with up to 50 epochs and early stopping on the
    validation loss (patience 5), restoring the best epoch's weights. The original trains a fixed 10
    epochs and reports the test set of the last epoch; we never look at the test set while training.
* ``logreg``: standardisation + L2 logistic regression (sklearn, lbfgs), C picked from a small grid
  by validation log-loss, class-weighted like the MLP.

When the validation set is empty or holds one class only, it cannot rank epochs or C fairly: the MLP
then trains a fixed number of epochs and logreg uses C = 1 (logged).

Heads save to a directory in safe formats only: ``config.json`` plus ``weights.npz`` written by numpy
without pickle and read with ``allow_pickle=False``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..errors import UserError
from ..fsutil import atomic_file, write_json

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.npz"


def _as_xy(x: np.ndarray, y: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"features must be 2-D [cells, dims], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise UserError("features contain NaN or inf values; check the embeddings or the input data")
    return x, None if y is None else np.asarray(y).astype(np.int64).ravel()


def _val_usable(y_val: np.ndarray) -> bool:
    return len(y_val) > 0 and len(np.unique(y_val)) == 2


def _class_weights(y: np.ndarray) -> np.ndarray:
    """Inverse class frequency, normalised so a balanced set gets weight 1 per class."""
    counts = np.bincount(y, minlength=2).astype(np.float64)
    if (counts == 0).any():
        raise UserError("the training cells hold one class only; the classifier needs sensitive and resistant cells")
    return len(y) / (2 * counts)


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Run with n torch CPU threads, then restore the previous number."""
    import torch

    if not n:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Head(ABC):
    """A binary classifier on features: fit with a validation set, predict p(sensitive)."""

    name: ClassVar[str]
    default_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.default_options))
        if unknown:
            raise UserError(f"head {self.name!r} has no option(s) {', '.join(unknown)}; allowed options: "
                            f"{', '.join(sorted(self.default_options))}")
        self.options: dict[str, Any] = {**self.default_options, **options}
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None

    def _fit_scaler(self, x: np.ndarray) -> None:
        self.mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
        std = x.std(axis=0, dtype=np.float64).astype(np.float32)
        self.std = np.where(std > 1e-6, std, 1.0).astype(np.float32)  # constant features stay at 0

    def _scale(self, x: np.ndarray) -> np.ndarray:
        if self.mean is None or self.std is None:
            raise RuntimeError(f"{self.name} head is not fitted")
        if x.shape[1] != self.mean.shape[0]:
            raise UserError(f"features have {x.shape[1]} dimensions but the head was trained on {self.mean.shape[0]}")
        return (x - self.mean) / self.std

    @abstractmethod
    def fit(self, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, seed: int) -> dict:
        """Train; return what training did (epochs, chosen C, validation loss, ...)."""

    @abstractmethod
    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """p(sensitive) per cell, float32 [n]."""

    @abstractmethod
    def _arrays(self) -> dict[str, np.ndarray]:
        """Everything learned, as named arrays."""

    @abstractmethod
    def _set_arrays(self, arrays: dict[str, np.ndarray]) -> None: ...

    def save(self, directory: str | Path) -> Path:
        """Write config.json and weights.npz into ``directory`` (each file atomically; wrap the call in
        ``atomic_dir`` to publish the directory as a whole)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_file(directory / WEIGHTS_FILE) as tmp, tmp.open("wb") as fh:
            np.savez(fh, **self._arrays())
        write_json(directory / CONFIG_FILE, {"head": self.name, "options": self.options})
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Head:
        directory = Path(directory)
        try:
            config = json.loads((directory / CONFIG_FILE).read_text())
            with np.load(directory / WEIGHTS_FILE, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as exc:
            raise UserError(f"{directory} is not a saved classifier head ({exc})") from exc
        name = config.get("head")
        head_cls = _HEADS.get(name)
        if head_cls is None or (cls is not Head and head_cls is not cls):
            raise UserError(f"{directory}: saved head {name!r} cannot be loaded as {getattr(cls, 'name', 'a head')!r}")
        head = head_cls(**config.get("options", {}))
        head._set_arrays(arrays)
        return head


class MLPHead(Head):
    name = "mlp"
    default_options: ClassVar[dict[str, Any]] = {
        "hidden": 512,
        "dropout": 0.1,
        "lr": 1e-3,
        "weight_decay": 0.01,
        "batch_size": 256,
        "max_epochs": 50,
        "patience": 5,
        "epochs_without_val": 10,  # fixed epochs when the validation set is empty or one-class
        "class_weight": "balanced",  # or null
        # torch CPU threads while training/predicting; null leaves torch's setting (in a Ray task:
        # the task's num_cpus). Restored afterwards: the process-wide setting is not changed for good.
        "num_threads": None,
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.module: Any = None
        self.d: int | None = None

    def _build(self, d: int) -> Any:
        from torch import nn

        h, p = int(self.options["hidden"]), float(self.options["dropout"])
        self.d = d
        return nn.Sequential(
            nn.Linear(d, h), nn.ReLU(), nn.Dropout(p),
            nn.Linear(h, h), nn.ReLU(), nn.Dropout(p),
            nn.Linear(h, 2),
        )

    def fit(self, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, seed: int) -> dict:
        import torch
        from torch import nn

        x_train, y_train = _as_xy(x_train, y_train)
        x_val, y_val = _as_xy(x_val, y_val) if len(y_val) else (np.empty((0, x_train.shape[1]), np.float32),
                                                                   np.empty(0, np.int64))
        assert y_train is not None and y_val is not None
        weights = _class_weights(y_train) if self.options["class_weight"] == "balanced" else np.ones(2)
        self._fit_scaler(x_train)
        use_val = _val_usable(y_val)
        max_epochs = int(self.options["max_epochs"]) if use_val else int(self.options["epochs_without_val"])
        if not use_val:
            log.warning("validation set is empty or has one class: MLP head trains %d epochs without early stopping",
                        max_epochs)
        bs, patience = int(self.options["batch_size"]), int(self.options["patience"])

        # fork_rng: seeding must not change the caller's global torch RNG (dropout uses it)
        with torch.random.fork_rng(devices=[]), _torch_threads(self.options["num_threads"]):
            torch.manual_seed(seed)
            model = self._build(x_train.shape[1])
            opt = torch.optim.AdamW(model.parameters(), lr=float(self.options["lr"]),
                                    weight_decay=float(self.options["weight_decay"]))
            loss_fn = nn.CrossEntropyLoss(weight=torch.as_tensor(weights, dtype=torch.float32))
            xt = torch.from_numpy(self._scale(x_train))
            yt = torch.from_numpy(y_train)
            xv = torch.from_numpy(self._scale(x_val))
            yv = torch.from_numpy(y_val)
            gen = torch.Generator().manual_seed(seed)
            best = (math.inf, 0, copy.deepcopy(model.state_dict()))
            history: list[float] = []
            epoch = 0
            for epoch in range(1, max_epochs + 1):
                model.train()
                for idx in torch.randperm(len(yt), generator=gen).split(bs):
                    opt.zero_grad(set_to_none=True)
                    loss_fn(model(xt[idx]), yt[idx]).backward()
                    opt.step()
                if not use_val:
                    continue
                val_loss = self._loss(model, loss_fn, xv, yv)
                history.append(val_loss)
                if val_loss < best[0]:
                    best = (val_loss, epoch, copy.deepcopy(model.state_dict()))
                elif epoch - best[1] >= patience:
                    break
            if use_val:
                model.load_state_dict(best[2])
            model.eval()
        self.module = model
        info: dict[str, Any] = {"head": "mlp", "epochs": epoch, "early_stopping": use_val,
                                "class_weights": weights.round(4).tolist()}
        if use_val:
            info.update(best_epoch=best[1], val_loss=best[0], val_loss_history=[round(v, 5) for v in history])
        return info

    @staticmethod
    def _loss(model: Any, loss_fn: Any, x: Any, y: Any) -> float:
        import torch

        model.eval()
        with torch.no_grad():
            total = 0.0
            weight_sum = 0.0
            w = loss_fn.weight
            for start in range(0, len(y), 8192):
                xb, yb = x[start:start + 8192], y[start:start + 8192]
                # sum of weighted losses over chunks / sum of weights = the full-set weighted mean
                total += float(torch.nn.functional.cross_entropy(model(xb), yb, weight=w, reduction="sum"))
                weight_sum += float(w[yb].sum())
        return total / weight_sum

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        import torch

        if self.module is None:
            raise RuntimeError("mlp head is not fitted")
        x, _ = _as_xy(x)
        xs = torch.from_numpy(self._scale(x))
        out = []
        self.module.eval()
        with torch.no_grad(), _torch_threads(self.options["num_threads"]):
            for start in range(0, len(xs), 8192):
                out.append(torch.softmax(self.module(xs[start:start + 8192]), dim=1)[:, 1])
        return (torch.cat(out).numpy() if out else np.empty(0)).astype(np.float32)

    def _arrays(self) -> dict[str, np.ndarray]:
        assert self.mean is not None and self.std is not None and self.module is not None
        arrays = {"scaler.mean": self.mean, "scaler.std": self.std}
        arrays.update({f"net.{k}": v.detach().cpu().numpy() for k, v in self.module.state_dict().items()})
        return arrays

    def _set_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        import torch

        self.mean, self.std = arrays["scaler.mean"], arrays["scaler.std"]
        self.module = self._build(int(self.mean.shape[0]))
        state = {k.removeprefix("net."): torch.from_numpy(v) for k, v in arrays.items() if k.startswith("net.")}
        self.module.load_state_dict(state, strict=True)  # any missing/unexpected key raises
        self.module.eval()


class LogRegHead(Head):
    name = "logreg"
    default_options: ClassVar[dict[str, Any]] = {
        "C": [0.01, 0.1, 1.0, 10.0],  # a grid (picked by validation log-loss) or one value
        "max_iter": 2000,
        "class_weight": "balanced",  # or null
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.coef: np.ndarray | None = None
        self.intercept: float = 0.0

    def fit(self, x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, seed: int) -> dict:
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import log_loss

        x_train, y_train = _as_xy(x_train, y_train)
        assert y_train is not None
        y_val = np.asarray(y_val).astype(np.int64).ravel()
        cw = "balanced" if self.options["class_weight"] == "balanced" else None
        _class_weights(y_train)  # one-class training data is an error
        self._fit_scaler(x_train)
        xs = self._scale(x_train)
        grid = self.options["C"]
        grid = [float(c) for c in (grid if isinstance(grid, list | tuple) else [grid])]
        use_val = _val_usable(y_val) and len(grid) > 1
        if not use_val and len(grid) > 1:
            log.warning("validation set is empty or has one class: logistic regression uses C = 1")
            grid = [1.0]

        def fit_one(c: float) -> Any:
            return LogisticRegression(C=c, max_iter=int(self.options["max_iter"]), class_weight=cw,
                                      random_state=seed).fit(xs, y_train)

        scores: dict[float, float] = {}
        best = None
        if use_val:
            xv = self._scale(_as_xy(x_val)[0])
            sw = _class_weights(y_val)[y_val] if cw else None  # same weighting as the training loss
            for c in grid:
                clf = fit_one(c)
                scores[c] = float(log_loss(y_val, clf.predict_proba(xv)[:, 1], labels=[0, 1], sample_weight=sw))
                if best is None or scores[c] < scores[best[0]]:
                    best = (c, clf)
        else:
            best = (grid[0], fit_one(grid[0]))
        assert best is not None
        c, clf = best
        self.coef = clf.coef_.ravel().astype(np.float64)
        self.intercept = float(clf.intercept_[0])
        info: dict[str, Any] = {"head": "logreg", "C": c, "n_iter": int(clf.n_iter_.max())}
        if scores:
            info.update(val_log_loss=scores[c], val_log_loss_by_C={str(k): v for k, v in scores.items()})
        return info

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        if self.coef is None:
            raise RuntimeError("logreg head is not fitted")
        x, _ = _as_xy(x)
        z = self._scale(x).astype(np.float64) @ self.coef + self.intercept
        # numerically stable logistic, computed here so fitted and loaded heads agree bit for bit
        return (0.5 * (1.0 + np.tanh(0.5 * z))).astype(np.float32)

    def _arrays(self) -> dict[str, np.ndarray]:
        assert self.mean is not None and self.std is not None and self.coef is not None
        return {"scaler.mean": self.mean, "scaler.std": self.std, "coef": self.coef,
                "intercept": np.asarray([self.intercept])}

    def _set_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        self.mean, self.std = arrays["scaler.mean"], arrays["scaler.std"]
        self.coef = arrays["coef"].astype(np.float64)
        self.intercept = float(arrays["intercept"][0])


_HEADS: dict[str, type[Head]] = {"mlp": MLPHead, "logreg": LogRegHead}


def make_head(name: str, **options: Any) -> Head:
    """A new, untrained head by name (``mlp`` or ``logreg``) with options from the benchmark YAML."""
    if name not in _HEADS:
        raise UserError(f"unknown head {name!r}; heads: {', '.join(_HEADS)}")
    return _HEADS[name](**options)


def load_head(directory: str | Path) -> Head:
    """A head saved with ``Head.save``, whichever kind it is."""
    return Head.load(directory)
