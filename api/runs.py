"""``sdr.run``: a benchmark from a YAML file or a dict, on an embedded local Ray (or a cluster)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

#: columns that identify a unit's condition in ``RunResult.summary``
CONDITION = ["model", "head", "strategy", "scheme", "split", "few_shot_k"]


@dataclass
class RunResult:
    """A finished run: its directory, results (one row per unit x fold, every metric), report and manifest."""

    run_dir: Path
    results: pd.DataFrame
    report: Path
    manifest: dict[str, Any] = field(repr=False)

    @property
    def random_weight_models(self) -> list[str]:
        """Models that ran on RANDOM weights: their scores mean nothing."""
        return [m["name"] for m in self.manifest.get("models", []) if m.get("random_weights")]

    def summary(self, metrics: tuple[str, ...] = ("f1", "auroc", "auprc")) -> pd.DataFrame:
        """Mean of ``metrics`` over folds, one row per condition (model, head, strategy, scheme, split, k)."""
        keys = [c for c in CONDITION if c in self.results.columns]
        return self.results.groupby(keys, dropna=False)[list(metrics)].mean().reset_index()

    @classmethod
    def load(cls, run_dir: str | Path) -> RunResult:
        """The RunResult of an existing run directory."""
        from scdrugmap_ray.engine.errors import UserError

        d = Path(run_dir)
        if not (d / "results.parquet").is_file():
            raise UserError(f"{d} has no results.parquet; is it the output directory of a run?")
        manifest = json.loads((d / "manifest.json").read_text()) if (d / "manifest.json").is_file() else {}
        return cls(d, pd.read_parquet(d / "results.parquet"), d / "report.html", manifest)


def load_benchmark(spec: Any) -> Any:
    """A validated ``BenchmarkSpec`` from a YAML path, a dict (the YAML's contents) or a spec; every error is
    one UserError line, found before Ray starts."""
    from scdrugmap_ray.jobs.spec import BenchmarkSpec, load_spec, parse_spec

    if isinstance(spec, BenchmarkSpec):
        return spec
    if isinstance(spec, dict):
        return parse_spec(spec, "benchmark")
    return load_spec(Path(spec))


def run(spec: str | Path | dict[str, Any] | Any, *, out: str | Path | None = None, resume: bool = False,
        address: str | None = None, progress: bool = True) -> RunResult:
    """Run a benchmark (a YAML path, its contents as a dict, or a ``BenchmarkSpec``): every unit of data x
    model x strategy x split x seed on Ray, results written atomically into the run directory (``out``, else
    the spec's ``output``, else ``runs/<name>``). ``resume`` continues a killed run; ``address`` joins a
    cluster. Same code path as ``scdrugmap-ray run``."""
    from scdrugmap_ray.jobs.runner import run_benchmark

    bench = load_benchmark(spec)
    run_dir = run_benchmark(bench, out=str(out) if out is not None else None, resume=resume, address=address,
                            progress=progress)
    return RunResult.load(run_dir)


__all__ = ["RunResult", "load_benchmark", "run"]
