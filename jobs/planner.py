"""Expand a benchmark spec into units of work.

A unit is one (data, model, head, strategy, scheme, split, seed); it has one or more folds, and each
fold is one task on Ray and one row of ``results.parquet``. Folds are computed here, in the driver,
from the cell metadata alone, so a bad split (one class only, too few samples) is reported before any
work starts.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

import pandas as pd
from scdrugmap_ray.engine.data.splits import Fold, cross_data_folds, pooled_folds
from scdrugmap_ray.engine.models.base import get_model

from .spec import PROMPT_STRATEGIES, BenchmarkSpec, ModelSpec, can_run

_SLUG = re.compile(r"[^A-Za-z0-9._-]+")


def slug(text: str) -> str:
    return _SLUG.sub("-", text).strip("-")


def model_key(m: ModelSpec) -> str:
    """A readable, unique name for a model entry (options change the features, so they enter it)."""
    key = slug(m.name.replace(":", "-"))
    if m.options:
        digest = hashlib.sha256(json.dumps(m.options, sort_keys=True).encode()).hexdigest()[:8]
        key = f"{key}-{digest}"
    return key


@dataclass(frozen=True)
class Unit:
    unit_id: str
    data: str
    model: ModelSpec
    head: str
    strategy: str
    scheme: str
    split: str
    seed: int
    folds: list[Fold] = field(default_factory=list, compare=False, hash=False)

    def fold_id(self, fold: Fold) -> str:
        return slug(fold.name.replace("/", "-").replace("=", "-"))


def plan_folds(spec: BenchmarkSpec, obs: pd.DataFrame, seed: int) -> list[tuple[str, str, list[Fold]]]:
    """(scheme, split, folds) for one data entry and one seed."""
    ev = spec.evaluation
    out: list[tuple[str, str, list[Fold]]] = []
    if ev.pooled is not None:
        for split in ev.pooled.splits:
            folds = pooled_folds(obs, ev.pooled.folds, split, seed=seed, val_fraction=ev.val_fraction)
            out.append(("pooled", split, folds))
    if ev.cross_data is not None:
        cd = ev.cross_data
        folds = cross_data_folds(
            obs,
            holdout=cd.holdout,
            train_datasets=cd.train,
            few_shot=cd.few_shot,
            seed=seed,
            val_fraction=ev.val_fraction,
        )
        out.append(("cross_data", "dataset", folds))
    return out


def plan_units(spec: BenchmarkSpec, obs_by_data: dict[str, pd.DataFrame]) -> list[Unit]:
    units: list[Unit] = []
    for data_name, obs in obs_by_data.items():
        for seed in spec.seeds:
            schemes = plan_folds(spec, obs, seed)
            for m in spec.models:
                head = m.head or get_model(m.name, m.options).default_head
                for strategy in m.strategies or spec.strategies:
                    if not can_run(m.name, strategy):
                        continue  # e.g. an embedding model in a prompted strategy: the other strategies run
                    h = "prompt" if strategy in PROMPT_STRATEGIES else head
                    for scheme, split, folds in schemes:
                        unit_id = ".".join(
                            [slug(data_name), model_key(m), h, strategy, f"{scheme}-{split}", f"seed{seed}"]
                        )
                        units.append(Unit(unit_id, data_name, m, h, strategy, scheme, split, seed, folds))
    ids = [u.unit_id for u in units]
    assert len(ids) == len(set(ids)), "unit ids must be unique"
    return units
