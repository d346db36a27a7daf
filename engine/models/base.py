"""The model protocol and the registry.

Two kinds of model produce the features a classifier head is trained on:

* ``EmbeddingModel``: features that do not depend on the fold (pretrained foundation models,
  precomputed ``obsm`` embeddings). The runner computes them once per (data, model), caches them,
  and every frozen unit of a benchmark reuses them.
* ``FittedFeatureModel``: features fitted on the training cells of each fold (baselines such as
  PCA or highly variable genes). Fitting on all cells would leak the test fold into the features.

Models are looked up by name in a registry; ``obsm:<key>`` names precomputed embeddings, and
third-party models plug in through the ``scdrugmap_ray.models`` entry point group.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import UserError

if TYPE_CHECKING:
    from ..data.store import CellStore

HEADS = ("mlp", "logreg")


class Model(ABC):
    """Base of every model. Options come from the benchmark YAML (``models: [{name, ...options}]``)."""

    name: ClassVar[str]
    #: head trained on the features unless the YAML names another (``head: mlp | logreg``)
    default_head: ClassVar[str] = "mlp"
    #: True when the model's input must be raw counts (non-negative integers)
    requires_counts: ClassVar[bool] = False
    #: option names the model accepts, with defaults; anything else in the YAML is an error
    default_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.default_options))
        if unknown:
            allowed = ", ".join(sorted(self.default_options)) or "none"
            raise UserError(
                f"model {self.name!r} has no option(s) {', '.join(unknown)}; allowed options: {allowed}"
            )
        self.options: dict[str, Any] = {**self.default_options, **options}

    @property
    def random_weights(self) -> bool:
        """True when the model runs on random (not pretrained) weights; reports say so loudly."""
        return False

    def identity(self) -> dict[str, Any]:
        """What determines this model's features (name, options, checkpoint hash): used in cache keys."""
        return {"name": self.name, "options": self.options}

    def check_store(self, store: CellStore) -> None:
        """Refuse data the model cannot use, with one clear line."""
        if self.requires_counts and not store.is_counts:
            raise UserError(
                f"model {self.name!r} needs raw counts (non-negative integers) but {store.path} holds "
                f"{store.meta.get('value_type', 'non-count')} values; convert the raw-count layer instead "
                "(scdrugmap-ray convert ... --layer counts)"
            )


class EmbeddingModel(Model):
    """Fold-independent features: one embedding per cell, computed once and cached."""

    @abstractmethod
    def embed_store(self, store: CellStore) -> np.ndarray:
        """float32 [n_cells, d] in the store's row order."""


class FittedFeatureModel(Model):
    """Features fitted on the training cells of a fold (never on validation or test cells)."""

    @abstractmethod
    def fit(self, train: sp.csr_matrix, genes: pd.DataFrame, seed: int) -> None:
        """Fit the featurizer on the training cells' expression (cells x genes, store values)."""

    @abstractmethod
    def transform(self, cells: sp.csr_matrix) -> np.ndarray:
        """float32 [n, d] features of any cells, using what ``fit`` learned."""


_REGISTRY: dict[str, type[Model]] = {}
_PARAMETRIC: dict[str, Callable[[str, dict[str, Any]], Model]] = {}
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def register(cls: type[Model]) -> type[Model]:
    """Class decorator: make a model available by its ``name``."""
    if not _NAME_RE.match(cls.name):
        raise ValueError(f"invalid model name {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def register_prefix(prefix: str, factory: Callable[[str, dict[str, Any]], Model]) -> None:
    """Names of the form ``prefix:ARG`` (e.g. ``obsm:X_scFoundation``) are built by ``factory``."""
    _PARAMETRIC[prefix] = factory


def _load_builtin_and_plugins() -> None:
    # Importing the model modules registers them; entry points add third-party models.
    from . import baselines  # noqa: F401

    for ep in entry_points(group="scdrugmap_ray.models"):
        ep.load()


def available_models() -> list[str]:
    _load_builtin_and_plugins()
    return sorted(_REGISTRY) + [f"{p}:<key>" for p in sorted(_PARAMETRIC)]


def get_model(name: str, options: dict[str, Any] | None = None) -> Model:
    """Build a model from its registry name and YAML options; unknown names are a UserError."""
    _load_builtin_and_plugins()
    options = dict(options or {})
    prefix, sep, arg = name.partition(":")
    if sep:
        if prefix not in _PARAMETRIC or not arg:
            raise UserError(f"unknown model {name!r}; available: {', '.join(available_models())}")
        return _PARAMETRIC[prefix](arg, options)
    if name not in _REGISTRY:
        import difflib

        hint = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise UserError(
            f"unknown model {name!r}{did_you_mean}; available: {', '.join(available_models())}"
        )
    return _REGISTRY[name](**options)
