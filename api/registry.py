"""The trained-model registry: ``sdr.registry.Registry(root)`` lists, resolves and versions trained models
(``<root>/<name>/<version>/``; default root ``$SCDRUGMAP_RAY_REGISTRY`` or
``~/.local/share/scdrugmap-ray/models``). ``register`` turns a trained unit of a run into a new version."""

from __future__ import annotations

from pathlib import Path

from scdrugmap_ray.engine.registry import Registry, default_registry


def register(run_dir: str | Path, name: str, *, unit: str | None = None, best: str | None = None,
             fold: str | None = None, metric: str = "auroc", registry: str | Path | None = None,
             copy_checkpoint: bool = False) -> Path:
    """A trained unit of a finished run (``unit`` id, or the ``best`` one by a metric) as a new version of
    ``name`` in the registry; returns the version directory (same as ``scdrugmap-ray models register``)."""
    from scdrugmap_ray.jobs.register import register_from_run

    return register_from_run(Path(run_dir), name, unit=unit, best=best, fold=fold, metric=metric,
                             registry=registry, copy_checkpoint=copy_checkpoint)


__all__ = ["Registry", "default_registry", "register"]
