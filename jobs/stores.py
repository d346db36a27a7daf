"""A benchmark's data as the runner and ``explain`` both read it: data entries made cell stores (converted
or simulated once, cached), their labelled obs, and the cached embedding of (store x model)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pandas as pd
from scdrugmap_ray.engine.data.convert import ConvertOptions, ensure_store
from scdrugmap_ray.engine.data.simulate import simulate_h5ad
from scdrugmap_ray.engine.data.store import CellStore
from scdrugmap_ray.engine.errors import UserError
from scdrugmap_ray.engine.models.base import EmbeddingModel, FoundationModel
from scdrugmap_ray.engine.models.baselines import ObsmEmbedding
from scdrugmap_ray.engine.pipeline.embed import embed_to_dir, obsm_to_dir

from .spec import DataSpec


def digest(obj: Any) -> str:
    """16 hex digits of the SHA-256 of ``obj`` as sorted JSON: the cache key of a spec entry."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def simulated_h5ad(sim: Any, cache: Path) -> Path:
    """Where the simulator's .h5ad of a ``simulate:`` data entry is cached."""
    return cache / "simulated" / f"sim-{digest(sim.model_dump())}.h5ad"


def prepare_store(d: DataSpec, cache: Path, progress: bool = True) -> CellStore:
    """The cell store of a data entry: a store directory as is, an .h5ad converted once (cached)."""
    label_key, dataset_key, sample_key = d.label_key, d.dataset_key, d.sample_key
    if d.simulate is not None:
        sim = d.simulate
        src = simulated_h5ad(sim, cache)
        if not src.exists():
            simulate_h5ad(
                src,
                n_cells=sim.cells,
                n_datasets=sim.datasets,
                samples_per_dataset=sim.samples_per_dataset,
                effect=sim.effect,
                seed=sim.seed,
                n_genes=sim.genes,
                progress=progress,
            )
        # The simulator's own obs columns, unless the entry names others.
        label_key = label_key or "response"
        dataset_key = dataset_key or (None if d.dataset else "dataset")
        sample_key = sample_key or "sample"
    else:
        assert d.path is not None
        src = Path(d.path)
        if not src.exists():
            raise UserError(f"data path {src} not found (relative paths are taken from {Path.cwd()})")
    opts = ConvertOptions(
        label_key=label_key,
        sensitive=tuple(d.sensitive),
        resistant=tuple(d.resistant),
        dataset_key=dataset_key,
        dataset=d.dataset if d.dataset else (None if dataset_key else d.display_name),
        sample_key=sample_key,
        layer=d.layer,
        gene_key=d.gene_key,
        obs_map=dict(d.obs_map),
        catalog=d.catalog_collection,
    )
    return ensure_store(src, opts, cache / "stores")


def labelled_obs(store: CellStore, data_name: str) -> pd.DataFrame:
    """The store's obs table; a UserError when no cell is labelled."""
    obs = store.obs()
    if store.meta.get("label_key") is None or obs["label"].notna().sum() == 0:
        raise UserError(
            f"data {data_name!r} has no labelled cells; set label_key in the benchmark to the obs column "
            "holding sensitive/resistant labels"
        )
    return obs


# ---------------------------------------------------------------------------------------- embeddings


def embedding_path(cache: Path, store: CellStore, model_identity: dict[str, Any]) -> Path:
    """The embedding folder of (store content x model identity) in the cache (``embed_to_dir``'s layout)."""
    return cache / "embeddings" / f"{store.content_hash[:16]}-{digest(model_identity)}"


def ensure_embedding(model: EmbeddingModel, store: CellStore, cache: Path, progress: bool = False) -> Path | None:
    """Embed every cell of the store once (cached by store content x model identity); precomputed (obsm)
    embeddings are copied from the store into the same layout, shard by shard.

    Foundation models stream through ``embed_to_dir``: their actors write the parts, the driver holds
    none of it, and an interrupted run resumes at the shards not yet written. It runs from the driver: the
    embedding is itself a Ray Data job (CPU tokenize tasks and an actor pool), which must not sit inside a
    task holding the resources it needs.
    """
    path = embedding_path(cache, store, model.identity())
    if isinstance(model, FoundationModel):
        embed_to_dir(model, store, path, progress=progress)
        return path
    if isinstance(model, ObsmEmbedding):  # precomputed: the store's column, in the same layout
        model.check_store(store)
        return obsm_to_dir(store, model.key, path)
    return None
