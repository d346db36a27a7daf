"""``scdrugmap-ray datasets list|show``: the scDrugMap collection's catalog (engine/data/catalog.py)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from scdrugmap_ray.engine.errors import UserError

_LIST_COLUMNS = ["id", "geo", "subgroup", "cancer_type", "tissue", "therapy", "regimen", "n_samples", "cells"]


def register(app: Any) -> None:
    datasets_app = type(app)(help="The scDrugMap collection: 60 curated datasets (36 primary, 24 external).",
                        no_args_is_help=True)
    app.add_typer(datasets_app, name="datasets")

    @datasets_app.command("list")
    def datasets_list(
        cancer_type: Annotated[str | None, typer.Option(help="Substring of the cancer type (either level).")] = None,
        tissue: Annotated[str | None, typer.Option(help="Substring of the tissue (e.g. 'cell line').")] = None,
        therapy: Annotated[str | None, typer.Option(help="targeted, immunotherapy or chemotherapy.")] = None,
        regimen: Annotated[str | None, typer.Option(help="Substring of the drug regimen.")] = None,
        collection: Annotated[str | None, typer.Option(help="primary or external.")] = None,
        format: Annotated[str, typer.Option(help="table, tsv or json.")] = "table",
    ) -> None:
        """List the catalog's datasets (filters are case-insensitive substrings)."""
        import pandas as pd
        from scdrugmap_ray.engine.data import catalog

        if format not in ("table", "tsv", "json"):
            raise UserError(f"--format {format!r}: expected table, tsv or json")
        df = catalog.datasets(cancer_type=cancer_type, tissue=tissue, therapy=therapy, regimen=regimen,
                              collection=collection)
        if format == "json":
            typer.echo(json.dumps(json.loads(df.to_json(orient="records")), indent=1))
            return
        if format == "tsv":
            typer.echo(df.to_csv(sep="\t", index=False).rstrip("\n"))
            return
        view = df[_LIST_COLUMNS].copy()
        view["regimen"] = view["regimen"].fillna("-").map(lambda s: s if len(s) <= 40 else s[:39] + "…")
        view["cells"] = view["cells"].map(lambda n: "shared" if pd.isna(n) else f"{int(n):,}")
        view["n_samples"] = view["n_samples"].map(lambda n: "" if pd.isna(n) else str(int(n)))
        typer.echo(view.to_string(index=False))
        cells, unknown = catalog.cells_of(df["id"].tolist())
        total = f"{cells:,} cells" if cells is not None else f"cells of {len(unknown)} dataset(s) published jointly"
        typer.echo(f"{len(df)} dataset(s); {total}; `scdrugmap-ray datasets show ID` for one")

    @datasets_app.command("show")
    def datasets_show(
        name: Annotated[str, typer.Argument(help="Data12, ext:Data5 (external collection) or a GEO name.")],
        collection: Annotated[str, typer.Option(help="Collection of a bare DataN id: primary or external.")]
        = "primary",
        format: Annotated[str, typer.Option(help="text or json.")] = "text",
    ) -> None:
        """Everything the catalog knows about one dataset, and the subgroups it belongs to."""
        from scdrugmap_ray.engine.data import catalog

        d = catalog.dataset(name, collection)
        groups = catalog.subgroups_of(d.id)
        if format == "json":
            out = {**d.to_dict(), "subgroups": [{"kind": g.kind, "value": g.value, "datasets": list(g.datasets),
                                                 "cells": g.cells, "sensitive": g.sensitive,
                                                 "resistant": g.resistant} for g in groups]}
            typer.echo(json.dumps(out, indent=1))
            return
        if format != "text":
            raise UserError(f"--format {format!r}: expected text or json")
        for key, value in d.to_dict().items():
            if key in ("cells", "sensitive_cells", "resistant_cells") and value is not None:
                value = f"{value:,}"
            typer.echo(f"{key:>16}: {'-' if value in (None, '') else value}")
        typer.echo("subgroups (cells: all / sensitive / resistant):")
        for g in groups:
            typer.echo(f"  {g.kind:>11}  {g.value}: {g.cells:,} / {g.sensitive:,} / {g.resistant:,} "
                       f"({len(g.datasets)} dataset(s))")
