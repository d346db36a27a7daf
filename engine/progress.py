"""Progress bars of long steps (rich): one builder, so every command's bar looks and behaves the same."""

from __future__ import annotations

import time
from typing import Any


def progress_bar(enabled: bool, *, rate: bool = True) -> Any:
    """A rich Progress of items done (of a total) and elapsed time; with ``rate``, a column filled from each
    task's ``rate`` field (``rate_text``). ``enabled=False`` draws nothing (``--quiet``, jobs on a cluster)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns: list[Any] = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    if rate:
        columns.append(TextColumn("{task.fields[rate]}"))
    return Progress(*columns, TimeElapsedColumn(), disable=not enabled, transient=False)


def cells_progress(enabled: bool) -> Any:
    """A bar of cells done with cells/s, driven by the batches as they finish."""
    return progress_bar(enabled, rate=True)


def rate_text(done: int, since: float, unit: str = "cells", digits: int = 0) -> str:
    """``"1,234 cells/s"`` for ``done`` items since ``since`` (a ``time.perf_counter()``); ``digits`` after the
    point for slow items (``"0.42 steps/s"``)."""
    elapsed = time.perf_counter() - since
    return f"{done / elapsed:,.{digits}f} {unit}/s" if elapsed > 0 else ""
