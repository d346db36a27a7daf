"""The scDrugMap collection's catalog (60 curated datasets: 36 primary, 24 external), as tables.

``sdr.datasets.list(cancer_type="lung", therapy="targeted")`` filters it (case-insensitive substrings);
``sdr.datasets.show("Data12")`` is one dataset's record. The expression data itself lives on Zenodo/GEO:
point a benchmark's ``data: [{path: ...}]`` at a downloaded .h5ad."""

from __future__ import annotations

import builtins
from typing import Any

import pandas as pd


def list(cancer_type: str | None = None, tissue: str | None = None, therapy: str | None = None,
         regimen: str | None = None, collection: str | None = None) -> pd.DataFrame:
    """The catalog as a DataFrame, filtered; a filter matching nothing is a UserError naming the values."""
    from scdrugmap_ray.engine.data import catalog

    return catalog.datasets(cancer_type=cancer_type, tissue=tissue, therapy=therapy, regimen=regimen,
                            collection=collection)


def show(name: str, collection: str = "primary") -> dict[str, Any]:
    """One dataset (``Data12``, ``ext:Data5`` or a GEO name) as a dict, with its ``subgroups``."""
    from scdrugmap_ray.engine.data import catalog

    d = catalog.dataset(name, collection)
    groups: builtins.list[dict[str, Any]] = [
        {"kind": g.kind, "value": g.value, "datasets": builtins.list(g.datasets), "cells": g.cells,
         "sensitive": g.sensitive, "resistant": g.resistant} for g in catalog.subgroups_of(d.id)]
    return {**d.to_dict(), "subgroups": groups}


__all__ = ["list", "show"]
