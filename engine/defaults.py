"""Defaults shared by the engine and the in-process API, in a module that imports nothing (no torch, no Ray,
no pyarrow): ``scdrugmap_ray.tl`` reads them without loading the engine."""

from __future__ import annotations

#: tokens per model batch (cells x longest cell) on a GPU: large batches keep it busy
DEFAULT_BATCH_TOKENS = 16_384
#: on CPU a small budget is cheaper: the attention of a long batch streams through memory instead of the
#: caches (Geneformer V1 10M, 300 GSE149383 cells, one thread: 10.7 s of CPU at 2,048 vs 16.4 s at 16,384;
#: ``benchmarks/batch_tokens_cpu.py``)
CPU_BATCH_TOKENS = 2_048


def batch_tokens_for(device: str, batch_tokens: int | None = None) -> int:
    """The token budget a batch gets: the one asked for, else the device's default (GPU 16,384, CPU 2,048)."""
    if batch_tokens:
        return batch_tokens
    return DEFAULT_BATCH_TOKENS if device.startswith("cuda") else CPU_BATCH_TOKENS
