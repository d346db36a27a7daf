"""``scdrugmap-ray explain RUN_DIR``: gene attributions, DE, biomarkers and resistance analysis of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer


def explain(
    run_dir: Annotated[Path, typer.Argument(help="A finished benchmark run directory.")],
    unit: Annotated[str | None, typer.Option(help="Unit id (default: the best unit by mean AUROC).")] = None,
    out: Annotated[Path | None, typer.Option(help="Output directory (default: RUN_DIR/explain/UNIT).")] = None,
    method: Annotated[str, typer.Option(help="Foundation-model attribution: ig (integrated gradients), gxi "
                                             "(gradient x input) or attention (last-layer attention each gene "
                                             "receives; geneformer and tgpt only).")] = "ig",
    max_cells: Annotated[int, typer.Option(help="Test cells attributed per fold (baselines).")] = 1000,
    fm_max_cells: Annotated[int, typer.Option(help="Test cells attributed per fold (foundation models).")] = 64,
    de_max_cells: Annotated[int, typer.Option(help="Cells per class and group in differential expression.")] = 2000,
    top: Annotated[int, typer.Option(help="Genes per group in the biomarker table.")] = 20,
    workers: Annotated[int, typer.Option(help="Ray actors attributing batches in parallel (1: in process).")] = 1,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Explain one unit: attributions, DE (true and predicted classes), biomarkers, resistance analysis."""
    import json

    from scdrugmap_ray.engine.errors import UserError
    from scdrugmap_ray.jobs.explain import ExplainOptions, explain_run

    if method not in ("ig", "gxi", "attention"):
        raise UserError(f"--method must be ig, gxi or attention, got {method!r}")
    for name, value in (("--max-cells", max_cells), ("--fm-max-cells", fm_max_cells), ("--de-max-cells", de_max_cells),
                        ("--top", top), ("--workers", workers)):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    opts = ExplainOptions(unit=unit, method=method, max_cells=max_cells, fm_max_cells=fm_max_cells,
                          de_max_cells=de_max_cells, top=top, workers=workers)
    out_dir = explain_run(run_dir, out, opts, progress=not quiet)
    summary = json.loads((out_dir / "summary.json").read_text())
    typer.echo(f"explained {summary['unit_id']} -> {out_dir / 'explain.html'}")
    rec = summary.get(f"precision_at_{top}") or {}
    if rec:
        typer.echo(f"planted genes recovered, precision@{top}: " + ", ".join(f"{k} {v:.2f}" for k, v in rec.items()))


def register(app: Any) -> None:
    app.command("explain")(explain)
