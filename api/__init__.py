"""scdrugmap-ray's Python API, in the scanpy style::

    import scdrugmap_ray as sdr

    sdr.tl.embed(adata, model="geneformer", checkpoint="ckpt/")   # -> adata.obsm["X_geneformer"]
    sdr.tl.predict(adata, "pc9-frozen@1")                          # -> adata.obs["scdrugmap_p_sensitive"]
    res = sdr.run("configs/quickstart.yaml")                       # -> res.results, res.report
    sdr.models.list(); sdr.registry.Registry(); sdr.datasets.list(cancer_type="lung")

These names are the project's stable surface (documented, typed, tested); the ``engine``, ``jobs``,
``serve`` and ``cli`` subpackages behind them are free to move. Importing this package is cheap: torch
and Ray load only when a function needs them.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version

from scdrugmap_ray.engine.errors import UserError

from . import datasets, models, registry, tl
from .runs import RunResult, run

try:
    __version__: str = _dist_version("scdrugmap-ray")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["RunResult", "UserError", "__version__", "datasets", "models", "registry", "run", "tl"]
