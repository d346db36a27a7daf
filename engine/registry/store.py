"""Registry storage: the folder of trained models, its names, versions and ``model.json``.

A registry is a directory: ``<registry>/<name>/<version>/`` (versions 1, 2, ...), each holding

* ``model.json``: kind (``frozen`` or ``lora``), the model name and options, head, metrics of the fold
  it came from and the unit's cross-validated metrics, the training data summary, where it came from;
* ``genes.parquet``: the training store's genes (the model's gene vocabulary for validation);
* ``frozen``: ``head.safetensors`` + ``head.json`` and, for baselines, ``featurizer.safetensors`` +
  ``featurizer.json`` (PCA axes, chosen genes, ...);
* ``lora``: ``lora/`` (the PEFT adapter, ``head.safetensors``, ``head.json``, its config);
* ``backbone/``: the foundation model's checkpoint when it was copied (always for random-weight
  presets, on request for a user checkpoint; otherwise ``model.json`` names its path and digest).

Safe formats only: safetensors, JSON, Parquet. Names and versions are validated before they become
paths.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..fsutil import atomic_dir, write_json
from ..models.base import get_model

REGISTRY_ENV = "SCDRUGMAP_RAY_REGISTRY"
MODEL_JSON = "model.json"
GENES = "genes.parquet"
LORA_DIR = "lora"
BACKBONE_DIR = "backbone"
FORMAT_VERSION = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def default_registry() -> Path:
    """``$SCDRUGMAP_RAY_REGISTRY``, else the user's data directory (``~/.local/share/scdrugmap-ray/models``)."""
    env = os.environ.get(REGISTRY_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "scdrugmap-ray" / "models"


def check_name(name: str) -> str:
    """A model name safe to use as one path component (letters, digits, . _ -; no slashes, no '..')."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise UserError(f"invalid model name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a "
                        "letter or digit")
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``NAME`` or ``NAME@VERSION`` (``@latest`` = newest) -> (name, version or None)."""
    name, sep, ver = str(ref).partition("@")
    check_name(name)
    if not sep or ver in ("", "latest"):
        return name, None
    if not ver.isdigit() or len(ver) > 9:
        raise UserError(f"invalid model version {ver!r} in {ref!r}: a positive whole number or 'latest'")
    return name, int(ver)


class Registry:
    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root else default_registry()

    def versions(self, name: str) -> list[int]:
        d = self.root / check_name(name)
        if not d.is_dir():
            return []
        return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / MODEL_JSON).is_file())

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if _NAME_RE.match(p.name) and self.versions(p.name))

    def list(self) -> list[dict[str, Any]]:
        """model.json of every version of every model, newest version last."""
        out = []
        for name in self.names():
            for v in self.versions(name):
                out.append(json.loads((self.root / name / str(v) / MODEL_JSON).read_text()))
        return out

    def resolve(self, ref: str) -> Path:
        """The version directory of ``NAME[@VERSION]``; unknown models are a UserError listing the known."""
        name, version = parse_ref(ref)
        versions = self.versions(name)
        if not versions:
            known = ", ".join(self.names()) or "none"
            raise UserError(f"no model {name!r} in the registry {self.root}; registered models: {known}")
        if version is None:
            version = versions[-1]
        elif version not in versions:
            raise UserError(f"model {name!r} has no version {version}; versions: {', '.join(map(str, versions))}")
        return self.root / name / str(version)

    def info(self, ref: str) -> dict[str, Any]:
        return json.loads((self.resolve(ref) / MODEL_JSON).read_text())

    def add(self, name: str, source: Path, kind: str, info: dict[str, Any], copy_checkpoint: bool = False) -> Path:
        """A new version of ``name`` from a fold's saved model directory (``<fold>.model`` of a frozen unit,
        ``<fold>.lora/model`` of a lora unit). Written atomically; returns the version directory."""
        check_name(name)
        source = Path(source)
        if not source.is_dir():
            raise UserError(f"{source} not found: the unit's fold has no saved model (was it run with this version "
                            "of scdrugmap-ray? frozen units save their heads since the model registry exists)")
        version = (self.versions(name) or [0])[-1] + 1
        final = self.root / name / str(version)
        options = dict(info.get("model_options") or {})
        backbone: dict[str, Any] = {"copied": False}
        with atomic_dir(final) as tmp:
            if kind == "frozen":
                for f in source.iterdir():
                    if f.is_file():
                        shutil.copy2(f, tmp / ("fold_config.json" if f.name == "config.json" else f.name))
            elif kind == "lora":
                shutil.copytree(source, tmp / LORA_DIR)
                shutil.copy2(source / GENES, tmp / GENES)
            else:
                raise UserError(f"cannot register a unit of strategy {kind!r}; only frozen and lora units")
            if options.get("checkpoint") or options.get("preset"):
                fm = get_model(info["model"], options)
                ckpt = fm.checkpoint_dir()  # type: ignore[attr-defined]
                backbone = {"copied": False, "path": str(Path(ckpt).resolve()),
                            "random_weights": bool(fm.random_weights)}
                if options.get("preset") or copy_checkpoint:
                    # a random-weight preset is only reproducible bit for bit from its own files
                    shutil.copytree(ckpt, tmp / BACKBONE_DIR)
                    backbone["copied"] = True
            meta = {
                **info,
                "name": name,
                "version": version,
                "kind": kind,
                "format_version": FORMAT_VERSION,
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "backbone": backbone,
            }
            write_json(tmp / MODEL_JSON, meta)
        return final

