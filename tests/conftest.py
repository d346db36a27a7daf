"""Shared fixtures. Ray starts once per test session (start-up costs seconds)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"../shared not found beside the repository ({SHARED}); the tests read real data from it")
    return SHARED


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A real local Ray, started once for the whole test session."""
    import ray

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def pc9(shared_dir: Path) -> dict:
    """Real GSE149383 cells and a store-like genes table, read once for every model's tests."""
    from realcells import load_pc9

    return load_pc9(shared_dir)
