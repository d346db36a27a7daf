"""The Serve application builder for Serve config files: KubeRay's RayService (``serveConfigV2``) and
``serve deploy`` / ``serve run config.yaml`` name it as ``import_path: scdrugmap_ray.serve.deploy:build``.

``args`` are the fields of :class:`~scdrugmap_ray.serve.app.ServeConfig` (``registry`` at least), plus
``api_key_env``: the environment variable holding the API key (a Kubernetes Secret), never the key itself.
"""

from __future__ import annotations

import os
from dataclasses import fields
from typing import Any

from scdrugmap_ray.engine.errors import UserError


def config_from_args(args: dict[str, Any]) -> Any:
    from .app import ServeConfig

    args = dict(args or {})
    env = args.pop("api_key_env", None)
    allowed = {f.name for f in fields(ServeConfig)} - {"api_key"}
    unknown = sorted(set(args) - allowed)
    if unknown:
        raise UserError(f"serve config args: unknown key(s) {', '.join(unknown)}; allowed: api_key_env, "
                        f"{', '.join(sorted(allowed))}")
    if "registry" not in args:
        raise UserError("serve config args: 'registry' (the registry directory) is required")
    api_key = None
    if env:
        api_key = os.environ.get(str(env))
        if not api_key:
            raise UserError(f"serve config args: api_key_env {env}: the environment variable is not set or empty")
    return ServeConfig(**args, api_key=api_key)


def build(args: dict[str, Any]) -> Any:
    """The scdrugmap-ray Serve application (ingress, predictors) from a Serve config file's ``args``."""
    from .app import build_app

    return build_app(config_from_args(args))
