"""Defaults shared by the engine and the in-process API, in a module that imports nothing (no torch, no Ray,
no pyarrow): ``scdrugmap_ray.tl`` reads them without loading the engine."""

from __future__ import annotations

#: tokens per model batch (cells x longest cell), the CLI's ``--batch-tokens`` and ``sdr.tl.embed``'s default
DEFAULT_BATCH_TOKENS = 16_384
