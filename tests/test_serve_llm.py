"""The LLM deployment of the Serve app (serve/llm.py) over real HTTP with real Ray Serve and vLLM (CPU), on
the tiny random Llama: OpenAI routes (models, embeddings, completions, chat), the cell-sentence route,
errors (4xx, never 500), the API key, and our own OpenAI client (``scdrugmap-ray prompt``) against it.
Random weights answer noise: the tests check numbers against an independent reference and the protocol.

The app runs as a second Serve application (``/llm`` prefix) on the proxy that tests/serving.py starts
for test_serve.py and test_web.py: Serve has one HTTP proxy per Ray cluster, and the session has one Ray."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from serving import API_KEY, served

pytestmark = pytest.mark.slow
H = {"X-API-Key": API_KEY}
NAME = "tiny-llama"


@pytest.fixture(scope="module")
def tiny() -> Path:
    from scdrugmap_ray.engine.models.llama import Llama

    return Llama(preset="tiny").checkpoint_dir()


@pytest.fixture(scope="module")
def app(ray_session: None, tiny: Path) -> Iterator[dict[str, Any]]:
    from scdrugmap_ray.serve.app import ServeConfig, run_app

    base = served()
    port = int(base["url"].rsplit(":", 1)[1])
    cfg = ServeConfig(registry=str(base["registry"]), api_key=API_KEY, max_upload_bytes=3_000_000, max_cells=5000,
                      replica_cpus=0.25, llm=str(tiny), llm_name=NAME, llm_cpus=0.5, llm_kv_cache_gb=1)
    t0 = time.monotonic()
    run_app(cfg, host="127.0.0.1", port=port, name="scdrugmap-llm", route_prefix="/llm")  # waits for the engines
    yield {**base, "llm_url": base["url"] + "/llm", "start_s": time.monotonic() - t0}
    from ray import serve

    serve.delete("scdrugmap-llm")  # give its CPUs and memory back to the session's later tests


@pytest.fixture(scope="module")
def client(app: dict[str, Any]) -> httpx.Client:
    with httpx.Client(base_url=app["llm_url"], timeout=120) as c:
        yield c  # type: ignore[misc]


@pytest.fixture(scope="module")
def reference(tiny: Path) -> Any:
    """Independent reference: transformers' LlamaModel, mean of the last hidden state over the tokens."""
    import torch
    from scdrugmap_ray.engine.llm.hf import hf_tokenizer as _hf_tokenizer
    from scdrugmap_ray.engine.models.llama import load_transformers

    body = load_transformers(tiny)
    tok = _hf_tokenizer(str(tiny))

    def embed_ids(token_lists: list[list[int]]) -> np.ndarray:
        with torch.no_grad():
            return np.stack([body(input_ids=torch.tensor([t])).last_hidden_state[0].mean(0).numpy()
                             for t in token_lists])

    def embed_texts(texts: list[str]) -> np.ndarray:
        return embed_ids([tok(t)["input_ids"] for t in texts])

    return embed_ids, embed_texts


def test_models_list_registry_and_llms(client: httpx.Client, app: dict[str, Any]) -> None:
    r = client.get("/v1/models", headers=H)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [m["name"] for m in body["models"]] == ["pca-sim"]  # the registry part is unchanged
    assert body["object"] == "list" and {m["id"] for m in body["data"]} == {NAME, NAME + "-embed"}
    assert client.get("/healthz").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/embeddings", "/v1/chat/completions", "/v1/completions", "/v1/llm/embed-cells"} <= set(paths)
    # the base app (no --llm) lists no LLM and has no LLM route that works
    base = httpx.get(app["url"] + "/v1/models", headers=H).json()
    assert base["data"] == [] and [m["name"] for m in base["models"]] == ["pca-sim"]
    r = httpx.post(app["url"] + "/v1/llm/embed-cells", headers=H, json={"cells": []})
    assert r.status_code == 404 and "--llm" in r.json()["detail"]


def test_api_key_on_llm_routes(client: httpx.Client) -> None:
    for path, body in [("/v1/embeddings", {"model": NAME, "input": "EGFR"}),
                       ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}]}),
                       ("/v1/completions", {"model": NAME, "prompt": "hi"}),
                       ("/v1/llm/embed-cells", {"cells": [{"cell_id": "a", "expression": {"EGFR": 1}}]})]:
        r = client.post(path, json=body)
        assert r.status_code == 401 and "API key" in r.json()["detail"], (path, r.text)


def test_embeddings_equal_the_reference(client: httpx.Client, reference: Any) -> None:
    texts = ["EGFR KRT18 ACTB MALAT1", "VIM CD44", "TP53"]
    r = client.post("/v1/embeddings", headers=H, json={"model": NAME, "input": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == NAME + "-embed"
    assert [d["index"] for d in body["data"]] == [0, 1, 2] and body["usage"]["prompt_tokens"] > 3
    got = np.array([d["embedding"] for d in body["data"]])
    assert got.shape == (3, 128)
    np.testing.assert_allclose(got, reference[1](texts), atol=2e-4, rtol=1e-3)
    one = client.post("/v1/embeddings", headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"model": NAME + "-embed", "input": texts[1]})
    assert one.status_code == 200
    np.testing.assert_allclose(one.json()["data"][0]["embedding"], got[1], atol=1e-5)


def _json_cells(store: Any, rows: list[int]) -> list[dict[str, Any]]:
    genes = store.genes["symbol"].astype(str).tolist()
    x = store.read_csr(np.asarray(rows))
    return [{"cell_id": f"c{r}", "expression": {genes[j]: float(v) for j, v in zip(x[i].indices, x[i].data,
                                                                                  strict=True)}}
            for i, r in enumerate(rows)]


def test_embed_cells_equal_the_llama_model(client: httpx.Client, app: dict[str, Any], tiny: Path,
                                           reference: Any) -> None:
    from scdrugmap_ray.engine.models.llama import Llama

    store = app["store"]
    rows = [0, 5, 17]
    r = client.post("/v1/llm/embed-cells", headers=H, json={"cells": _json_cells(store, rows), "top_k": 30})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == NAME + "-embed" and body["dim"] == 128 and body["top_k"] == 30
    assert [c["cell_id"] for c in body["cells"]] == [f"c{i}" for i in rows]
    assert all(c["n_genes"] == 30 and c["genes_dropped"] == 0 for c in body["cells"])
    # the llama model's own tokenizer on the store's cells, embedded by transformers
    tok = Llama(checkpoint=str(tiny), top_k=30).make_tokenizer(store.genes)
    x = store.read_csr(np.asarray(rows))
    ids = tok(np.asarray(rows), [x[i].indices for i in range(3)], [x[i].data for i in range(3)])["input_ids"]
    want = reference[0]([t.tolist() for t in ids])
    np.testing.assert_allclose(np.array([c["embedding"] for c in body["cells"]]), want, atol=2e-4, rtol=1e-3)
    # the same cells as an .h5ad upload
    with open(app["h5ad"], "rb") as fh:
        up = client.post("/v1/llm/embed-cells", headers=H, data={"model": NAME, "top_k": "30"},
                         files={"file": ("cells.h5ad", fh)})
    assert up.status_code == 200, up.text
    cells = up.json()["cells"]
    assert len(cells) == len(store.obs(["cell_id"]))
    np.testing.assert_allclose(np.array([cells[i]["embedding"] for i in rows]), want, atol=2e-4, rtol=1e-3)


def test_chat_and_completions_are_openai_shaped(client: httpx.Client) -> None:
    msgs = [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "Cell: EGFR ACTB"}]
    req = {"model": NAME, "messages": msgs, "max_tokens": 6, "temperature": 0.7, "seed": 3}
    r = client.post("/v1/chat/completions", headers=H, json=req)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == NAME and body["id"]
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("length", "stop")
    u = body["usage"]
    assert 0 < u["completion_tokens"] <= 6 and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    again = client.post("/v1/chat/completions", headers=H, json=req).json()
    assert again["choices"][0]["message"]["content"] == choice["message"]["content"]  # seeded sampling
    r = client.post("/v1/completions", headers=H, json={"model": NAME, "prompt": "EGFR KRT18", "max_tokens": 4,
                                                        "temperature": 0})
    assert r.status_code == 200, r.text
    c = r.json()
    assert c["object"] == "text_completion" and isinstance(c["choices"][0]["text"], str)
    assert 0 < c["usage"]["completion_tokens"] <= 4


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/v1/embeddings", {"model": "nope", "input": "EGFR"}, 404, "nope"),
        ("/v1/embeddings", {"model": NAME, "input": ""}, 422, "non-empty"),
        ("/v1/embeddings", {"model": NAME, "input": []}, 422, "non-empty"),
        ("/v1/embeddings", {"model": NAME, "input": ["EGFR", ""]}, 422, "non-empty"),
        ("/v1/embeddings", {"model": NAME}, 422, ""),
        ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "nope"),
        ("/v1/chat/completions", {"model": NAME}, 422, ""),
        ("/v1/completions", {"model": NAME + "-embed", "prompt": "hi", "max_tokens": 2}, 400, ""),
        ("/v1/llm/embed-cells", {"cells": []}, 422, "non-empty list"),
        ("/v1/llm/embed-cells", {"model": "nope", "cells": [{"cell_id": "a", "expression": {"EGFR": 1}}]}, 404,
         "nope"),
        ("/v1/llm/embed-cells", {"top_k": 0, "cells": [{"cell_id": "a", "expression": {"EGFR": 1}}]}, 422, "top_k"),
    ],
)
def test_bad_requests_are_4xx(client: httpx.Client, path: str, body: dict[str, Any], status: int,
                              needle: str) -> None:
    r = client.post(path, headers=H, json=body)
    assert r.status_code == status, r.text
    assert needle in str(r.json().get("detail", r.json()))


def test_prompt_command_against_the_served_llm(app: dict[str, Any], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """``scdrugmap-ray prompt`` (engine/llm/client.py) end to end: zero-shot prompts of a few cells, each
    answer parsed or counted as an abstention (random weights: mostly abstentions)."""
    import pandas as pd
    from scdrugmap_ray.cli.main import app as cli
    from typer.testing import CliRunner

    monkeypatch.setenv("SCDRUGMAP_TEST_LLM_KEY", API_KEY)
    out = tmp_path / "preds.parquet"
    args = ["prompt", str(app["store"].path), "--out", str(out), "--base-url", app["llm_url"] + "/v1",
            "--model", NAME, "--api-key-env", "SCDRUGMAP_TEST_LLM_KEY", "--cells", "4", "--top-k", "20",
            "--concurrency", "2", "--cache", str(tmp_path / "cache")]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert "requests=4 cached=0" in r.output and "n_abstain=" in r.output
    df = pd.read_parquet(out)
    assert len(df) == 4 and df["answer"].notna().all()
    assert int(df["abstained"].sum()) + int((~df["abstained"]).sum()) == 4
    assert df.loc[df["abstained"], "abstain_reason"].notna().all()
    monkeypatch.setenv("SCDRUGMAP_TEST_LLM_KEY", "wrong")
    r = CliRunner().invoke(cli, [*args[:-1], str(tmp_path / "cache2")])
    assert r.exit_code != 0 and "HTTP 401" in str(r.exception)
