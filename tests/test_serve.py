"""The Ray Serve app over real HTTP: routes, API key, limits, validation errors (4xx, never 500), batching
and multiplexing under concurrent load."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest
from serving import API_KEY, MAX_UPLOAD, served

pytestmark = pytest.mark.slow
H = {"X-API-Key": API_KEY}


@pytest.fixture(scope="module")
def app(ray_session: None) -> dict[str, Any]:
    return served()


@pytest.fixture(scope="module")
def client(app: dict[str, Any]) -> httpx.Client:
    with httpx.Client(base_url=app["url"], timeout=120) as c:
        yield c  # type: ignore[misc]


def _upload(client: httpx.Client, path: Any, model: str = "pca-sim", name: str = "cells.h5ad",
            **data: str) -> httpx.Response:
    with open(path, "rb") as fh:
        return client.post("/v1/predict", headers=H, data={"model": model, **data}, files={"file": (name, fh)})


def _expected(app: dict[str, Any]) -> tuple[list[str], np.ndarray]:
    from scdrugmap_ray.engine.registry import LoadedModel, Registry

    store = app["store"]
    model = LoadedModel(Registry(app["registry"]).resolve("pca-sim"))
    ids = store.obs(["cell_id"])["cell_id"].astype(str).tolist()
    p, _ = model.predict(ids, store.read_csr(), store.genes)
    return ids, p


def test_health_models_docs(client: httpx.Client) -> None:
    assert client.get("/healthz").json()["status"] == "ok"
    r = client.get("/v1/models", headers=H)
    assert r.status_code == 200
    (m,) = r.json()["models"]
    assert (m["name"], m["version"], m["kind"], m["model"]) == ("pca-sim", 1, "frozen", "pca-logreg")
    assert "/v1/predict" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200


def test_api_key_required(client: httpx.Client) -> None:
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"X-API-Key": "wrong"}).status_code == 401
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    r = client.post("/v1/predict", json={"model": "pca-sim", "cells": []})
    assert r.status_code == 401 and "API key" in r.json()["detail"]


def test_predict_h5ad_upload_matches_the_model(client: httpx.Client, app: dict[str, Any]) -> None:
    r = _upload(client, app["h5ad"], embedding_2d="true")
    assert r.status_code == 200, r.text
    body = r.json()
    ids, p = _expected(app)
    assert [c["cell_id"] for c in body["cells"]] == ids
    got = np.array([c["p_sensitive"] for c in body["cells"]])
    np.testing.assert_allclose(got, p, atol=1e-5)
    assert [c["label"] for c in body["cells"]] == ["sensitive" if v >= 0.5 else "resistant" for v in got]
    s = body["summary"]
    assert s["n_cells"] == len(ids) and s["n_sensitive"] == int((got >= 0.5).sum())
    assert sum(s["histogram"]["counts"]) == len(ids)
    assert len(body["embedding_2d"]) == len(ids) and len(body["embedding_2d"][0]) == 2
    assert body["genes_known_to_model"] == body["genes_in_request"] == 400


def test_predict_json_cells_and_embed(client: httpx.Client, app: dict[str, Any]) -> None:
    store = app["store"]
    genes = store.genes["symbol"].astype(str).tolist()
    x = store.read_csr(np.arange(3))
    cells = [{"cell_id": f"c{i}", "expression": {genes[j]: float(v) for j, v in zip(x[i].indices, x[i].data,
                                                                                   strict=True)}}
             for i in range(3)]
    r = client.post("/v1/predict", headers=H, json={"model": "pca-sim@1", "cells": cells})
    assert r.status_code == 200, r.text
    _, p = _expected(app)
    np.testing.assert_allclose([c["p_sensitive"] for c in r.json()["cells"]], p[:3], atol=1e-5)
    r = client.post("/v1/embed", headers=H, json={"model": "pca-sim", "cells": cells})
    assert r.status_code == 200 and r.json()["dim"] == 8 and len(r.json()["cells"][0]["embedding"]) == 8


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"model": "pca-sim", "cells": [{"cell_id": "a", "expression": {"NOT_A_GENE": 3}}]}, 422, "none of the"),
        ({"model": "pca-sim", "cells": [{"cell_id": "a", "expression": {"NOT_A_GENE": 3, "@G0": 1}}]}, 422,
         "none of the"),
        ({"model": "pca-sim", "cells": []}, 422, "non-empty list"),
        ({"model": "pca-sim", "cells": [{"cell_id": "a", "expression": {"X": -1}}]}, 422, "non-negative"),
        ({"model": "pca-sim", "cells": [{"cell_id": "a"}]}, 422, "expression"),
        ({"model": "nope", "cells": [{"cell_id": "a", "expression": {"X": 1}}]}, 404, "no model 'nope'"),
        ({"model": "pca-sim@7", "cells": [{"cell_id": "a", "expression": {"X": 1}}]}, 404, "no version 7"),
        ({"model": "../../etc/passwd", "cells": [{"cell_id": "a", "expression": {"X": 1}}]}, 422, "invalid model name"),
        ({"cells": [{"cell_id": "a", "expression": {"X": 1}}]}, 422, "'model' is required"),
        ([1, 2], 422, "object"),
    ],
)
def test_json_validation_errors(client: httpx.Client, body: Any, status: int, needle: str) -> None:
    r = client.post("/v1/predict", headers=H, json=body)
    assert r.status_code == status, r.text
    assert needle in r.json()["detail"]


def test_unknown_genes_named_unless_ignored(client: httpx.Client, app: dict[str, Any]) -> None:
    gene = app["store"].genes["symbol"].iloc[0]
    cells = [{"cell_id": "a", "expression": {gene: 5, "NOT_A_GENE": 2}}]
    r = client.post("/v1/predict", headers=H, json={"model": "pca-sim", "cells": cells})
    assert r.status_code == 422 and "NOT_A_GENE" in r.json()["detail"]
    r = client.post("/v1/predict", headers=H, json={"model": "pca-sim", "cells": cells, "ignore_unknown_genes": True})
    assert r.status_code == 200 and len(r.json()["cells"]) == 1


def test_upload_errors(client: httpx.Client, app: dict[str, Any], tmp_path: Any) -> None:
    txt = tmp_path / "cells.txt"
    txt.write_text("gene,count\n")
    assert _upload(client, txt, name="cells.txt").status_code == 415
    fake = tmp_path / "fake.h5ad"
    fake.write_text("not hdf5")
    r = _upload(client, fake, name="fake.h5ad")
    assert r.status_code == 415 and "not HDF5" in r.json()["detail"]
    truncated = tmp_path / "trunc.h5ad"
    truncated.write_bytes(app["h5ad"].read_bytes()[:5000])
    r = _upload(client, truncated, name="trunc.h5ad")
    assert r.status_code == 422 and "trunc.h5ad" in r.json()["detail"] and "/tmp" not in r.json()["detail"]
    r = client.post("/v1/predict", headers=H, data={"model": "pca-sim"})
    assert r.status_code == 422 and "'file'" in r.json()["detail"]
    r = client.post("/v1/predict", headers=H, content=b"text")
    assert r.status_code == 415


def test_body_limit_413(client: httpx.Client) -> None:
    r = client.post("/v1/predict", headers={**H, "content-type": "application/json"}, content=b"x" * (MAX_UPLOAD + 1))
    assert r.status_code == 413 and "limit" in r.json()["detail"]

    def chunks() -> Any:  # no Content-Length: counted as it streams
        for _ in range(MAX_UPLOAD // 100_000 + 2):
            yield b"y" * 100_000

    r = client.post("/v1/predict", headers={**H, "content-type": "application/json"}, content=chunks())
    assert r.status_code == 413


def test_load_no_errors_nothing_lost(app: dict[str, Any]) -> None:
    from scdrugmap_ray.serve.bench import load_test

    res = load_test(app["url"], "pca-sim", app["h5ad"], clients=6, n_requests=36, cells_per_request=8,
                    timeout_s=120, api_key=API_KEY)
    assert res.errors == 0 and res.missing == 0 and res.not_sent == 0, res.line()
    assert res.ok == 36
