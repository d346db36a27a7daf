"""``scdrugmap-ray plan BENCHMARK.yaml``: the units, folds and an estimated cost before anything runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from scdrugmap_ray.engine.errors import UserError


def _fmt(x: float | None, unit: str = "") -> str:
    if x is None:
        return "?"
    if unit == "h":
        return f"{x:,.2f}"
    return f"{x:,.0f}"


def register(app: Any) -> None:
    @app.command()
    def plan(
        benchmark: Annotated[Path, typer.Argument(help="The benchmark YAML.")],
        cells_per_s: Annotated[float | None, typer.Option(
            help="Cells/s of one model forward pass on one GPU, for every model (default: an assumed 500).")] = None,
        throughput: Annotated[list[str] | None, typer.Option(
            help="MODEL=CELLS_PER_S for one model (repeatable; measure with `scdrugmap-ray bench embed`).")] = None,
        units: Annotated[bool, typer.Option(help="List every unit (else one line per model and strategy).")] = True,
    ) -> None:
        """List a benchmark's units and folds, with cells x forward passes and GPU-hours, running nothing."""
        from scdrugmap_ray.jobs.planner import DEFAULT_CELLS_PER_S, estimate
        from scdrugmap_ray.jobs.spec import load_spec

        rates: dict[str, float] = {}
        for item in throughput or []:
            name, sep, value = item.partition("=")
            try:
                rate = float(value)
            except ValueError:
                rate = -1.0
            if not sep or not name or rate <= 0:
                raise UserError(f"--throughput {item!r}: expected MODEL=CELLS_PER_S with a positive number")
            rates[name] = rate
        if cells_per_s is not None and not cells_per_s > 0:
            raise UserError(f"--cells-per-s {cells_per_s}: must be a positive number of cells per second")
        spec = load_spec(benchmark)
        est = estimate(spec, rates, cells_per_s or DEFAULT_CELLS_PER_S)
        say = typer.echo
        say(f"plan of {est.spec_name} ({benchmark}): nothing runs, nothing is converted")
        for d in est.data:
            ds = f"{len(d.datasets)} dataset(s)" if d.datasets else "datasets unknown"
            say(f"data {d.name}: {_fmt(d.cells)} cells, {ds}; from {d.source}")
        if units:
            say(f"{'unit':<72} {'folds':>6} {'fwd passes':>14} {'requests':>10} {'GPU-h':>9}")
            for u in est.units:
                say(f"{u.unit_id:<72} {_fmt(u.folds):>6} {_fmt(u.forward_passes):>14} {_fmt(u.requests):>10} "
                    f"{_fmt(u.gpu_hours, 'h'):>9}  {u.note}")
        say("per model and strategy:")
        groups: dict[tuple[str, str], list[Any]] = {}
        for u in est.units:
            groups.setdefault((u.model, u.strategy), []).append(u)
        for (model, strategy), us in groups.items():
            folds = None if any(u.folds is None for u in us) else sum(u.folds for u in us)
            passes = None if any(u.forward_passes is None for u in us) else sum(u.forward_passes for u in us)
            hours = None if any(u.gpu_hours is None for u in us) else sum(u.gpu_hours for u in us)
            say(f"  {model:<14} {strategy:<10} {len(us):>4} units {_fmt(folds):>6} folds "
                f"{_fmt(passes):>14} forward passes {_fmt(hours, 'h'):>9} GPU-h")
        rates_used = sorted(set(est.throughput.values()))
        rate_text = (f"{rates_used[0]:,.0f} cells/s per GPU" if len(rates_used) == 1 else
                     ", ".join(f"{k} {v:,.0f}" for k, v in est.throughput.items()) + " cells/s per GPU")
        assumed = "" if rates or cells_per_s else " (an assumed round figure, not a measurement: pass your own)"
        say(f"total: {len(est.units)} units, {_fmt(est.folds)} folds, {_fmt(est.total('forward_passes'))} cell "
            f"forward passes = {_fmt(est.total('gpu_hours'), 'h')} GPU-hours at {rate_text}{assumed}; "
            f"{_fmt(est.total('requests'))} chat requests")
        if est.folds is None or est.total("forward_passes") is None:
            say("'?': cells or datasets unknown until the data files exist (or set `catalog:` on the data entry)")
