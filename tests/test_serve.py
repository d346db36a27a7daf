"""The Ray Serve app over real HTTP: routes, API key, limits, validation errors (4xx, never 500), batching
and multiplexing under concurrent load."""

from __future__ import annotations

from pathlib import Path
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


def test_health_ready_models_docs(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["default_model"] == "pca-sim"
    assert set(ready.json()["deployments"].values()) == {"HEALTHY"}
    r = client.get("/v1/models", headers=H)
    assert r.status_code == 200
    (m,) = r.json()["models"]
    assert (m["name"], m["version"], m["kind"], m["model"]) == ("pca-sim", 1, "frozen", "pca-logreg")
    spec = client.get("/openapi.json").json()
    assert "/v1/predict" in spec["paths"] and "/readyz" in spec["paths"]
    body = spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert body["application/json"]["schema"]["$ref"].endswith("/PredictRequest")
    assert spec["components"]["schemas"]["PredictRequest"]["properties"]["ignore_unknown_genes"]["type"] == "boolean"
    assert {"APIKeyHeader", "HTTPBearer"} <= set(spec["components"]["securitySchemes"])


def test_docs_and_page_offline_with_csp(client: httpx.Client) -> None:
    import re

    docs = client.get("/docs")
    assert docs.status_code == 200
    assets = re.findall(r'(?:src|href)="([^"]+)"', docs.text)
    assert assets and all(a.startswith("/static/") for a in assets), assets  # nothing from a CDN
    for a in assets:
        assert client.get(a).status_code == 200, a
    page = client.get("/")
    assert all(a.startswith("/") for a in re.findall(r'(?:src|href)="([^"]+)"', page.text))
    for r in (page, docs, client.get("/v1/models", headers=H)):
        assert r.headers["x-frame-options"] == "DENY"
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-eval" not in csp
    assert "unsafe-inline" not in page.headers["content-security-policy"]


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


def _cells(expr: Any) -> list[dict[str, Any]]:
    return [{"cell_id": "a", "expression": expr}]


_DEEP = b'{"model": "pca-sim", "cells": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


MALFORMED: list[tuple[Any, int, str]] = [
        ({"model": "pca-sim", "cells": _cells({"NOT_A_GENE": 3})}, 422, "none of the"),
        ({"model": "pca-sim", "cells": _cells({"NOT_A_GENE": 3, "@G0": 1})}, 422, "none of the"),
        ({"model": "pca-sim", "cells": []}, 422, "non-empty list"),
        ({"model": "pca-sim", "cells": _cells({"X": -1})}, 422, "not a number in [0, 2**53)"),
        ({"model": "pca-sim", "cells": _cells({"X": 2**64})}, 422, "not a number in [0, 2**53)"),  # was a 500
        ({"model": "pca-sim", "cells": _cells({"X": "3"})}, 422, "expression.X: Input should be a number"),
        ({"model": "pca-sim", "cells": _cells({"X": True})}, 422, "Input should be a number"),
        ({"model": "pca-sim", "cells": [{"cell_id": "a"}]}, 422, "cells[0].expression: Field required"),
        ({"model": "pca-sim", "cells": [{"cell_id": 7, "expression": {"X": 1}}]}, 422, "cells[0].cell_id"),
        ({"model": "pca-sim", "cells": _cells({"X": 1}), "ignore_unknown_genes": "false"}, 422,
         "ignore_unknown_genes: Input should be a valid boolean"),  # a string boolean was read as true
        ({"model": "pca-sim", "cells": _cells({"X": 1}), "embedding_2d": 1}, 422, "embedding_2d"),
        ({"model": "pca-sim", "cells": _cells({"X": 1}), "cellz": []}, 422, "cellz: Extra inputs are not permitted"),
        ({"model": "nope", "cells": _cells({"X": 1})}, 404, "no model 'nope'"),
        ({"model": "pca-sim@7", "cells": _cells({"X": 1})}, 404, "no version 7"),
        ({"model": "../../etc/passwd", "cells": _cells({"X": 1})}, 422, "invalid model name"),
        ({"cells": _cells({"X": 1})}, 422, "model: Field required"),
        ([1, 2], 422, "object"),
        (b'{"model": "pca-sim", "cells": [{"cell_id": "a", "expression": {"G0": 1, "G0": 2}}]}', 422,
         "'G0' appears twice"),  # the last value was kept silently
        (b'{"model": "pca-sim", "model": "x", "cells": []}', 422, "'model' appears twice"),
        (b'{"model": "pca-sim", "cells": [{"cell_id": "a", "expression": {"G0": NaN}}]}', 422, "NaN"),
        (b'{"model": "pca-sim", "cells": [{"cell_id": "a", "expression": {"G0": Infinity}}]}', 422, "Infinity"),
        (_DEEP, 400, "nested too deeply"),  # was a RecursionError, a plain-text 500
        (b'{"model": "pca-sim", "cells": [', 400, "not valid JSON"),
        (b"\xff\xfe\x00", 400, "not valid JSON"),
]


@pytest.mark.parametrize(("body", "status", "needle"), MALFORMED,
                         ids=[f"{i}-{status}-{needle[:28]}" for i, (_, status, needle) in enumerate(MALFORMED)])
def test_malformed_json_is_one_line_json_4xx(client: httpx.Client, body: Any, status: int, needle: str) -> None:
    import json

    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = client.post("/v1/predict", headers={**H, "content-type": "application/json"}, content=raw)
    assert r.status_code == status, r.text[:300]
    assert r.headers["content-type"] == "application/json"
    assert "\n" not in r.text.strip() and list(r.json()) == ["detail"]
    assert needle in r.json()["detail"], r.json()["detail"]
    assert "/tmp" not in r.text and str(Path.home()) not in r.text  # no server path
    if needle == "no model 'nope'":
        assert "pca-sim" not in r.json()["detail"]  # models are listed only by the authenticated /v1/models


def test_large_answers_stream_as_ndjson(client: httpx.Client, app: dict[str, Any]) -> None:
    import json

    from serving import MAX_JSON_CELLS

    gene = app["store"].genes["symbol"].iloc[0]
    n = MAX_JSON_CELLS + 1
    body = {"model": "pca-sim", "cells": [{"cell_id": f"c{i}", "expression": {gene: i % 7 + 1}} for i in range(n)]}
    r = client.post("/v1/embed", headers=H, json=body)
    assert r.status_code == 413 and "application/x-ndjson" in r.json()["detail"]
    with client.stream("POST", "/v1/embed", headers={**H, "Accept": "application/x-ndjson"}, json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    head, rows = lines[0], lines[1:]
    assert head["model"] == "pca-sim" and head["dim"] == 8 and "cells" not in head
    assert [c["cell_id"] for c in rows] == [f"c{i}" for i in range(n)] and len(rows[0]["embedding"]) == 8
    with client.stream("POST", "/v1/predict", headers={**H, "Accept": "application/x-ndjson"}, json=body) as r:
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert lines[0]["summary"]["n_cells"] == n and len(lines) == n + 1
    assert sum(c["label"] == "sensitive" for c in lines[1:]) == lines[0]["summary"]["n_sensitive"]


def test_embeddings_as_arrow_ipc_stream(client: httpx.Client, app: dict[str, Any]) -> None:
    """/v1/embed with Accept: Arrow IPC stream: pyarrow reads it (several record batches, float32 fixed-size
    lists), and its numbers are the JSON and NDJSON answers' numbers."""
    import json

    import pyarrow as pa
    from scdrugmap_ray.serve.app import ARROW, NDJSON_CHUNK

    store = app["store"]
    genes = store.genes["symbol"].astype(str).tolist()
    x = store.read_csr()
    n = 2 * NDJSON_CHUNK + 500  # three record batches; above the JSON cap (1000)
    cells = [{"cell_id": f"c{i}", "expression": {genes[j]: float(v) for j, v in
                                                 list(zip(x[i % 300].indices, x[i % 300].data, strict=True))[:20]}}
             for i in range(n)]
    body = {"model": "pca-sim", "cells": cells}
    with client.stream("POST", "/v1/embed", headers={**H, "Accept": ARROW}, json=body) as r:
        assert r.status_code == 200, r.read()[:300]
        assert r.headers["content-type"] == ARROW
        raw = r.read()
    reader = pa.ipc.open_stream(raw)
    batches = list(reader)
    assert [b.num_rows for b in batches] == [NDJSON_CHUNK, NDJSON_CHUNK, 500]
    table = pa.Table.from_batches(batches)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 8)
    head = json.loads(reader.schema.metadata[b"scdrugmap"])
    assert head["model"] == "pca-sim" and head["dim"] == 8 and head["genes_known_to_model"] > 0
    ids = table.column("cell_id").to_pylist()
    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    assert ids == [f"c{i}" for i in range(n)] and emb.shape == (n, 8) and emb.dtype == np.float32
    with client.stream("POST", "/v1/embed", headers={**H, "Accept": "application/x-ndjson"}, json=body) as r:
        rows = [json.loads(line) for line in r.iter_lines() if line][1:]
    np.testing.assert_allclose(emb, np.array([c["embedding"] for c in rows]), rtol=1e-6, atol=1e-6)
    small = client.post("/v1/embed", headers=H, json={"model": "pca-sim", "cells": cells[:300]})
    assert small.status_code == 200, small.text[:300]
    np.testing.assert_allclose(emb[:300], np.array([c["embedding"] for c in small.json()["cells"]]),
                               rtol=1e-6, atol=1e-6)
    assert np.ptp(emb[:300], axis=0).min() > 0  # real, varying embeddings, not a constant
    # Arrow is offered for embeddings only: /v1/predict says so (one-line JSON 406)
    r = client.post("/v1/predict", headers={**H, "Accept": ARROW}, json={"model": "pca-sim", "cells": cells[:3]})
    assert r.status_code == 406 and "/v1/embed" in r.json()["detail"]
    doc = client.get("/openapi.json").json()["paths"]["/v1/embed"]["post"]["responses"]
    assert ARROW in doc["200"]["content"] and "fixed_size_list<float32>" in doc["200"]["description"]


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
    r = client.post("/v1/predict", headers=H, data={"model": "pca-sim"}, files={"other": ("a.txt", b"x")})
    assert r.status_code == 422 and "'file'" in r.json()["detail"]
    r = client.post("/v1/predict", headers=H, content=b"text")
    assert r.status_code == 415
    r = _upload(client, app["h5ad"], embedding_2d="yes")
    assert r.status_code == 422 and "'true' or 'false'" in r.json()["detail"]
    r = _upload(client, app["h5ad"], model="nope")
    assert r.status_code == 404 and r.json()["detail"].startswith("no model 'nope'")


def test_negative_values_in_an_upload_named_as_such(client: httpx.Client, tmp_path: Any) -> None:
    import anndata as ad
    import scipy.sparse as sp

    x = sp.csr_matrix(np.array([[1.0, 0.0, 2.0], [0.0, -3.0, 1.0]], dtype=np.float32))
    a = ad.AnnData(x)
    a.obs_names = ["ok", "bad"]
    a.var_names = ["G0", "G1", "G2"]
    path = tmp_path / "neg.h5ad"
    a.write_h5ad(path)
    r = _upload(client, path, name="neg.h5ad")
    assert r.status_code == 422 and "negative values" in r.json()["detail"] and "'bad'" in r.json()["detail"]


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

    # as many clients as the server holds without shedding (more: 503 + Retry-After, tests/test_serve_faults.py)
    res = load_test(app["url"], "pca-sim", app["h5ad"], clients=app["holds"], n_requests=36, cells_per_request=8,
                    timeout_s=120, api_key=API_KEY)
    assert res.errors == 0 and res.missing == 0 and res.not_sent == 0, res.line()
    assert res.ok == 36
