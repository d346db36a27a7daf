"""Model architectures a benchmark can name, and random-weight checkpoints for tests and demos.

``sdr.models.list()`` names them; ``sdr.models.init_random("geneformer", "ckpt/", preset="tiny")`` writes a
RANDOM-WEIGHT checkpoint in the model's official format (its embeddings carry no biology); trained models
live in ``sdr.registry.Registry``."""

from __future__ import annotations

import builtins
from pathlib import Path
from typing import Any

from scdrugmap_ray.engine.errors import UserError


def list() -> builtins.list[str]:
    """The model names a benchmark or ``sdr.tl.embed`` can use (``obsm:<key>``: precomputed embeddings)."""
    from scdrugmap_ray.engine.models.base import available_models

    return available_models()


def presets(name: str) -> builtins.list[str]:
    """The size presets of a foundation model (``tiny`` for tests, then the real sizes)."""
    return builtins.list(foundation_class(name).presets)


def foundation_class(name: str) -> Any:
    """The registered class of a foundation model; other names are a UserError."""
    from scdrugmap_ray.engine.models.base import FoundationModel, model_class

    cls = model_class(name)
    if not issubclass(cls, FoundationModel):
        raise UserError(f"{name!r} is not a foundation model (it has no checkpoint)")
    return cls


def init_random(name: str, out_dir: str | Path, preset: str = "tiny",
                config: dict[str, Any] | None = None) -> Path:
    """Write a RANDOM-WEIGHT checkpoint of ``name`` (size ``preset``, fields overridden by ``config``) into the
    new directory ``out_dir``, atomically; returns it."""
    from scdrugmap_ray.engine.fsutil import atomic_dir

    cls = foundation_class(name)
    if preset not in cls.presets:
        raise UserError(f"model {name!r} has no preset {preset!r}; presets: {', '.join(cls.presets)}")
    out = Path(out_dir)
    if out.exists():
        raise UserError(f"{out} already exists; choose a new directory")
    with atomic_dir(out) as tmp:
        cls.init_random(tmp, preset, config)
    return out


__all__ = ["foundation_class", "init_random", "list", "presets"]
