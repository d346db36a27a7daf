"""The trained-model registry and prediction with its models (atlas-scale and per request).

One job a module:

* ``store``: the registry folder (``Registry``: names, versions, ``model.json``; ``check_name``, ``parse_ref``);
* ``loaded``: a registry model in memory (``LoadedModel``) and per-request helpers (``genes_frame``,
  ``remap_columns``, ``gene_overlap``, ``label_of``, ``summarize``);
* ``predict``: atlas-scale prediction of a whole cell store through Ray Data (``predict_store``,
  ``iter_predictions``);
* ``writers``: the Parquet and .h5ad writers of those predictions.

The names below are the package's public seams; import them from here.
"""

from __future__ import annotations

from .loaded import (
    THRESHOLD,
    LoadedModel,
    Prepared,
    column_map,
    gene_overlap,
    genes_frame,
    label_of,
    remap_columns,
    remap_with,
    summarize,
)
from .predict import iter_predictions, predict_store
from .store import (
    BACKBONE_DIR,
    FORMAT_VERSION,
    GENES,
    LORA_DIR,
    MODEL_JSON,
    REGISTRY_ENV,
    Registry,
    check_name,
    default_registry,
    parse_ref,
)
from .writers import PredictStats, write_h5ad, write_parquet

__all__ = [
    "BACKBONE_DIR", "FORMAT_VERSION", "GENES", "LORA_DIR", "MODEL_JSON", "REGISTRY_ENV", "THRESHOLD",
    "LoadedModel", "PredictStats", "Prepared", "Registry", "check_name", "column_map", "default_registry",
    "gene_overlap", "genes_frame", "iter_predictions", "label_of", "parse_ref", "predict_store", "remap_columns",
    "remap_with", "summarize", "write_h5ad", "write_parquet",
]
