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
from pathlib import Path

import pandas as pd
from scdrugmap_ray.engine.data.splits import Fold, cross_data_folds, pooled_folds
from scdrugmap_ray.engine.errors import UserError
from scdrugmap_ray.engine.models.base import get_model

from .spec import PROMPT_STRATEGIES, BenchmarkSpec, DataSpec, ModelSpec, can_run

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


# ------------------------------------------------------------------------------------ plan + estimate

#: assumed cells per second of one model forward pass on one GPU when the user gives no --throughput: a
#: stated round figure, not a measurement (measure yours with `scdrugmap-ray bench embed`)
DEFAULT_CELLS_PER_S = 500.0
#: a LoRA training step costs about three forward passes (forward + backward through the adapted layers)
TRAIN_STEP_PASSES = 3.0


@dataclass
class DataSize:
    """What the planner knows of a data entry without running anything."""

    name: str
    cells: int | None  # None: unknown until the file exists
    datasets: dict[str, int | None]  # dataset -> cells (None: unknown); empty: unknown
    source: str  # how it was found out (one line)


@dataclass
class PlannedUnit:
    unit_id: str
    data: str
    model: str
    strategy: str
    scheme: str
    split: str
    seed: int
    folds: int | None  # None: one per dataset, unknown until the file exists
    forward_passes: float | None  # cell forward passes on an accelerator (shared embeddings counted once)
    requests: float | None  # chat requests (zero/few-shot prompting through an API)
    gpu_hours: float | None
    note: str = ""


@dataclass
class PlanEstimate:
    spec_name: str
    data: list[DataSize]
    units: list[PlannedUnit]
    throughput: dict[str, float]  # model name -> cells/s used
    default_cells_per_s: float

    @property
    def folds(self) -> int | None:
        return None if any(u.folds is None for u in self.units) else sum(u.folds or 0 for u in self.units)

    def total(self, key: str) -> float | None:
        values = [getattr(u, key) for u in self.units]
        return None if any(v is None for v in values) else float(sum(values))


def data_size(d: DataSpec) -> DataSize:
    """Cells and datasets of a data entry from what exists: a simulation's settings, a cell store's meta,
    an .h5ad's obs, or (file not there yet, ``catalog:`` set) the scDrugMap catalog's collection."""
    name = d.display_name
    if d.simulate is not None:
        s = d.simulate
        per = s.cells // s.datasets
        names = [f"sim{i + 1:02d}" for i in range(s.datasets)] if not d.dataset else [d.dataset]
        return DataSize(name, s.cells, {n: per for n in names}, "simulated")
    path = Path(str(d.path))
    if path.is_dir() and (path / "meta.json").is_file():
        meta = json.loads((path / "meta.json").read_text())
        return DataSize(name, int(meta["n_cells"]), dict(meta.get("datasets", {})), f"cell store {path}")
    if path.is_file():
        import anndata

        obs = anndata.read_h5ad(path, backed="r").obs
        if d.dataset_key and d.dataset_key in obs.columns:
            counts = obs[d.dataset_key].astype(str).value_counts(sort=False)
            datasets: dict[str, int | None] = {str(k): int(v) for k, v in counts.items()}
        else:
            datasets = {d.dataset or name: len(obs)}
        return DataSize(name, len(obs), datasets, f"{path} (obs read)")
    if d.catalog_collection:
        from scdrugmap_ray.engine.data import catalog

        ids = catalog.ids(d.catalog_collection)
        total, _ = catalog.cells_of(ids)
        per = {i: catalog.dataset(i).cells for i in ids}
        return DataSize(name, total, per, f"the catalog's {d.catalog_collection} collection ({path} not found yet)")
    return DataSize(name, None, {}, f"{path} not found: cells unknown")


def _scheme_folds(spec: BenchmarkSpec, size: DataSize) -> list[tuple[str, str, int | None, list[tuple[float, float]]]]:
    """(scheme, split, number of folds, per fold (train cells, test cells) or [] when unknown)."""
    ev = spec.evaluation
    out: list[tuple[str, str, int | None, list[tuple[float, float]]]] = []
    n = size.cells
    if ev.pooled is not None:
        k = ev.pooled.folds
        for split in ev.pooled.splits:
            shape = [(n * (k - 1) / k, n / k)] * k if n is not None else []
            out.append(("pooled", split, k, shape))
    if ev.cross_data is not None:
        cd = ev.cross_data
        ks = 1 + len(cd.few_shot)
        held = list(size.datasets) if cd.holdout == "each" else list(cd.holdout)
        known = bool(size.datasets) and n is not None
        shape: list[tuple[float, float]] = []
        if known:
            avg = n / max(len(size.datasets), 1)
            for ds in held:
                nd = size.datasets.get(ds)
                nd = float(nd) if nd is not None else avg  # a dataset whose cells the catalog only has jointly
                shape += [(n - nd, nd)] * ks
        folds = len(held) * ks if (held or cd.holdout != "each") else None
        out.append(("cross_data", "dataset", folds, shape))
    return out


def estimate(spec: BenchmarkSpec, throughput: dict[str, float] | None = None,
             cells_per_s: float = DEFAULT_CELLS_PER_S) -> PlanEstimate:
    """The units of a benchmark, their folds and a cost estimate, without running or converting anything.

    Cost: cell forward passes on an accelerator. A frozen unit's embedding is computed once per
    (data, model) and shared by every frozen unit of it (counted on the first); a LoRA fold trains at most
    ``epochs`` passes over its training cells (x3: forward + backward) and predicts its test cells; a
    prompted fold asks one chat request per test cell (``prompting.max_test_cells`` caps it). Baselines
    run on CPU and cost no accelerator time.
    """
    from scdrugmap_ray.engine.models.base import FoundationModel, model_class
    from scdrugmap_ray.engine.train.lora import LoraSettings

    throughput = dict(throughput or {})
    unknown = sorted(set(throughput) - {m.name for m in spec.models})
    if unknown:
        raise UserError(f"--throughput names model(s) {', '.join(unknown)} that the benchmark does not have; models: "
                        f"{', '.join(dict.fromkeys(m.name for m in spec.models))}")
    max_test = spec.prompting.get("max_test_cells")
    sizes = [data_size(d) for d in spec.data]
    units: list[PlannedUnit] = []
    embedded: set[tuple[str, str]] = set()
    for size in sizes:
        schemes = _scheme_folds(spec, size)
        for seed in spec.seeds:
            for m in spec.models:
                cls = model_class(m.name) if ":" not in m.name else None
                on_gpu = cls is not None and issubclass(cls, FoundationModel)
                rate = throughput.get(m.name, cells_per_s)
                head = m.head or get_model(m.name, m.options).default_head
                for strategy in m.strategies or spec.strategies:
                    if not can_run(m.name, strategy):
                        continue
                    h = "prompt" if strategy in PROMPT_STRATEGIES else head
                    for scheme, split, nfolds, shape in schemes:
                        unit_id = ".".join([slug(size.name), model_key(m), h, strategy, f"{scheme}-{split}",
                                            f"seed{seed}"])
                        passes: float | None = 0.0
                        requests: float | None = 0.0
                        note = ""
                        if strategy == "frozen":
                            key = (size.name, model_key(m))
                            if on_gpu and key not in embedded:
                                passes = float(size.cells) if size.cells is not None else None
                                embedded.add(key)
                                note = "embeds every cell (shared by the other frozen units)"
                            elif on_gpu:
                                note = "reuses the embedding"
                            else:
                                note = "CPU"
                        elif strategy == "lora":
                            epochs = LoraSettings.from_options({**spec.lora, **m.lora}).epochs
                            passes = (sum(tr * epochs * TRAIN_STEP_PASSES + te for tr, te in shape)
                                      if shape else None)
                            note = f"at most {epochs} epochs"
                        else:  # prompting: one chat request per (capped) test cell
                            tests = [min(te, max_test) if max_test else te for _, te in shape]
                            count = float(sum(tests)) if shape else None
                            if on_gpu:  # llama prompted through vLLM on our own accelerator
                                passes, requests = count, 0.0
                            else:
                                passes, requests = 0.0, count
                        gpu_h = passes / rate / 3600 if passes is not None else None
                        units.append(PlannedUnit(unit_id, size.name, m.name, strategy, scheme, split, seed, nfolds,
                                                 passes, requests, gpu_h, note))
    used = {m.name: throughput.get(m.name, cells_per_s) for m in spec.models}
    return PlanEstimate(spec.name, sizes, units, used, cells_per_s)
