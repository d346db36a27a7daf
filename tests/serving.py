"""Shared by test_serve.py and test_web.py: a small registry and ONE real Ray Serve app per test process
(Serve takes tens of seconds to start on a 2-core machine, so both modules use the same one)."""

from __future__ import annotations

import atexit
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from scdrugmap_ray.serve.proxy import free_port, haproxy_enabled, stop_haproxy, use_haproxy

API_KEY = "test-key-123"
MAX_UPLOAD = 3_000_000
MAX_JSON_CELLS = 1000
_STATE: dict[str, Any] = {}

# The serve tests run Serve as `scdrugmap-ray serve` does in production: in HAProxy mode (serve/proxy.py).
# Ray reads it at start, and this module is imported (collection) before the session's Ray starts.
# SCDRUGMAP_TEST_PROXY=default runs them against Ray's default Python proxy instead.
if os.environ.get("SCDRUGMAP_TEST_PROXY", "haproxy") == "haproxy":
    use_haproxy()
    # the session's Ray is shut down without serve.shutdown(): its HAProxy would keep running (serve/proxy.py)
    atexit.register(stop_haproxy)
HAPROXY = haproxy_enabled()


def build_registry(root: Path) -> dict[str, Any]:
    """A simulated .h5ad, its cell store, and a registry with a pca-logreg model fitted on it (in process,
    without a benchmark run: the serve tests are about serving)."""
    import numpy as np
    from scdrugmap_ray.engine.data.convert import ConvertOptions, convert_h5ad
    from scdrugmap_ray.engine.data.simulate import simulate_h5ad
    from scdrugmap_ray.engine.data.store import CellStore
    from scdrugmap_ray.engine.models.base import get_model
    from scdrugmap_ray.engine.registry import Registry
    from scdrugmap_ray.engine.train.frozen import save_fold_model
    from scdrugmap_ray.engine.train.heads import make_head

    h5ad = root / "cells.h5ad"
    simulate_h5ad(h5ad, n_cells=300, n_datasets=2, samples_per_dataset=2, effect=1.5, seed=1, n_genes=400,
                  progress=False)
    convert_h5ad(h5ad, root / "store", ConvertOptions(label_key="response", dataset_key="dataset",
                                                      sample_key="sample"), progress=False)
    store = CellStore.open(root / "store")
    y = store.obs()["label"].to_numpy().astype(int)
    x = store.read_csr()
    model = get_model("pca-logreg", {"n_components": 8})
    rows = np.arange(len(y))
    train, val = rows[rows % 4 != 0], rows[rows % 4 == 0]
    model.fit(x[train], store.genes, 0)  # type: ignore[attr-defined]
    feats = model.transform(x)  # type: ignore[attr-defined]
    head = make_head("logreg")
    head.fit(feats[train], y[train], feats[val], y[val], 0)
    fold_dir = save_fold_model(root / "fold.model", model, head, store.genes, {})
    reg = Registry(root / "registry")
    info = {"model": "pca-logreg", "model_options": model.options, "head": "logreg", "random_weights": False,
            "metrics": {"auroc": 0.9}, "cv_metrics": {}, "training_data": {"data": "sim", "n_cells": len(y)},
            "source": {"unit_id": "test"}}
    reg.add("pca-sim", fold_dir, "frozen", info)
    return {"h5ad": h5ad, "store": store, "registry": reg.root}


def served() -> dict[str, Any]:
    """Start the app once (after the session's ray_session fixture); return url, registry, data."""
    if "url" in _STATE:
        return _STATE
    import httpx
    from scdrugmap_ray.serve.app import ServeConfig, run_app

    root = Path(tempfile.mkdtemp(prefix="scdrugmap-serve-test-"))
    data = build_registry(root)
    port = free_port()
    # two predictor and two ingress replicas: the fault tests kill one of each (0.5 CPU in all: the LLM
    # tests deploy their engines beside this app in the session's 2 CPUs)
    cfg = ServeConfig(registry=str(data["registry"]), api_key=API_KEY, max_upload_bytes=MAX_UPLOAD, max_cells=5000,
                      max_json_cells=MAX_JSON_CELLS, replica_cpus=0.25, min_replicas=2, max_replicas=2,
                      ingress_replicas=2, max_batch_size=4, batch_wait_timeout_s=0.005)
    run_app(cfg, host="127.0.0.1", port=port)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:  # the proxy answers once the app is routed
        try:
            if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the Serve app did not come up within 120 s")
        time.sleep(0.5)
    while httpx.get(url + "/readyz", timeout=30).status_code != 200:  # both predictors up, model loadable
        if time.monotonic() > deadline:
            raise RuntimeError("the Serve app was not ready within 120 s")
        time.sleep(0.5)
    # slots: requests the predictors work on at once; holds: what the ingress replicas take without refusing
    # (closed-loop load up to that many clients is never shed)
    _STATE.update(data, url=url, slots=cfg.predictor_slots, holds=cfg.ingress_holds)
    return _STATE
