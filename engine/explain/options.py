"""The settings of one ``explain`` (CLI flags and the benchmark's ``explain:`` block)."""

from __future__ import annotations

from dataclasses import dataclass

LEVELS = ("dataset", "cancer_type", "regimen")  # biomarker groupings besides "all" ("regimen" = the drug)


@dataclass
class ExplainOptions:
    unit: str | None = None
    method: str = "ig"  # ig | gxi | attention (foundation models; attention: geneformer and tgpt only)
    max_cells: int = 1000  # attributed test cells per fold
    fm_max_cells: int = 64  # attributed test cells per fold for foundation models (expensive on CPU)
    n_steps: int = 32  # integrated-gradients steps (baselines); foundation models use half
    de_max_cells: int = 2000  # cells per class per group in DE
    top: int = 20
    batch_cells: int = 256
    seed: int = 0
    workers: int = 1  # > 1: attribution batches go to a pool of this many Ray actors
