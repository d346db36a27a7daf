"""scdrugmap-ray's Python API, in the scanpy style::

    import scdrugmap_ray as sdr

    sdr.tl.embed(adata, model="geneformer", checkpoint="ckpt/")   # -> adata.obsm["X_geneformer"]
    sdr.tl.predict(adata, "pc9-frozen@1")                          # -> adata.obs["scdrugmap_p_sensitive"]
    res = sdr.run("configs/quickstart.yaml")                       # -> res.results, res.report
    sdr.models.list(); sdr.registry.Registry(); sdr.datasets.list(cancer_type="lung")

These names are the project's stable surface (documented, typed, tested); the ``engine``, ``jobs``,
``serve`` and ``cli`` subpackages behind them are free to move. Importing this package is cheap (every
``scdrugmap_ray.engine`` import, on the CLI and in Ray workers, goes through it): its submodules load on
first use, torch and Ray only when a function needs them.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version
from typing import TYPE_CHECKING, Any

from scdrugmap_ray.engine.errors import UserError

if TYPE_CHECKING:
    from . import datasets, models, registry, tl
    from .runs import RunResult, run

try:
    __version__: str = dist_version("scdrugmap-ray")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

SUBMODULES = ("datasets", "models", "registry", "tl", "runs")


def __getattr__(name: str) -> Any:
    if name in SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in ("run", "RunResult"):
        return getattr(importlib.import_module(f"{__name__}.runs"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = ["RunResult", "UserError", "__version__", "datasets", "models", "registry", "run", "tl"]
