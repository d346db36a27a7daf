"""The Ray Serve application: a FastAPI ingress (REST API, OpenAPI docs, web page) in front of predictor
deployments that load registry models on demand (``@serve.multiplexed``, LRU) and batch requests
(``@serve.batch``).

    GET  /healthz            liveness (no API key)
    GET  /v1/models          registry models (name, version, kind, metrics, gene count)
    POST /v1/predict         multipart (``model``, ``file``: .h5ad) or JSON cells -> per-cell predictions + summary
    POST /v1/embed           the same inputs -> per-cell embeddings (the features the head reads)
    GET  /                   the web page (static HTML/JS, no CDN, works offline)

With ``llm`` set (``serve --llm MODEL_DIR``), the same ingress also serves a vLLM-backed LLM through
OpenAI-compatible routes (/v1/embeddings, /v1/completions, /v1/chat/completions, the LLMs listed by
/v1/models) and cell-sentence embeddings (POST /v1/llm/embed-cells): see serve/llm.py.

Bad input is a 4xx with a message, never a 500: 401 (API key), 404 (unknown model), 413 (body or cell
count too large), 415 (not an .h5ad), 422 (validation: unknown genes, no overlap with the model's genes,
non-count values for a count model, empty request). Model names are validated by the registry before
they touch the file system.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

log = logging.getLogger(__name__)

APP_NAME = "scdrugmap"


@dataclass
class ServeConfig:
    registry: str
    api_key: str | None = None
    max_upload_bytes: int = 100_000_000
    max_cells: int = 200_000
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 4.0
    max_models_per_replica: int = 3
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.01
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    ingress_cpus: float = 0.0
    llm: str | None = None  # a Hugging Face causal-LM directory: adds the LLM deployments (serve/llm.py)
    llm_name: str = "llama"
    llm_cpus: float = 1.0  # per LLM engine (two engines: generation and embeddings)
    llm_gpus: float = 0.0
    llm_kv_cache_gb: float = 1.0  # vLLM's KV cache on CPU
    llm_embed_only: bool = False  # only the embedding engine (no chat/completions)


class RequestError(Exception):
    """A bad request: HTTP status and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


# ------------------------------------------------------------------------------------ request parsing


def cells_from_h5ad(data: bytes, filename: str) -> tuple[list[str], Any, Any, int]:
    """(cell_ids, csr, genes table, cells dropped as empty) of an uploaded .h5ad, read through the same
    checks as ``scdrugmap-ray convert`` (wrong type, truncated, CSC, NaN...)."""
    from scdrugmap_ray.engine.data.convert import ConvertOptions, convert_h5ad
    from scdrugmap_ray.engine.data.store import CellStore
    from scdrugmap_ray.engine.errors import UserError

    if not filename.lower().endswith(".h5ad"):
        raise RequestError(415, f"{filename!r} is not an .h5ad file; upload an AnnData .h5ad")
    if data[:8] != b"\x89HDF\r\n\x1a\n":
        raise RequestError(415, f"{filename!r} is not an .h5ad file (not HDF5); save it with adata.write_h5ad()")
    with tempfile.TemporaryDirectory(prefix="scdrugmap-upload-") as tmp:
        src = Path(tmp) / "upload.h5ad"
        src.write_bytes(data)
        try:
            report = convert_h5ad(src, Path(tmp) / "store", ConvertOptions(), progress=False)
            store = CellStore.open(Path(tmp) / "store")
            ids = store.obs(["cell_id"])["cell_id"].astype(str).tolist()
            csr = store.read_csr()
            genes = store.genes
        except UserError as err:
            msg = str(err).replace(str(src), filename)
            raise RequestError(422, msg) from None
    return ids, csr, genes, report.n_empty_dropped


def cells_from_json(body: dict[str, Any], max_cells: int) -> tuple[list[str], Any, Any]:
    """JSON cells: ``{"cells": [{"cell_id": "c1", "expression": {"GENE": count, ...}}, ...]}``."""
    import scipy.sparse as sp
    from scdrugmap_ray.engine.registry import _genes_frame

    cells = body.get("cells")
    if not isinstance(cells, list) or not cells:
        raise RequestError(422, "'cells' must be a non-empty list of {cell_id, expression: {gene: value}}")
    if len(cells) > max_cells:
        raise RequestError(413, f"{len(cells)} cells in one request; at most {max_cells}")
    gene_pos: dict[str, int] = {}
    ids, indptr, indices, data = [], [0], [], []
    for i, cell in enumerate(cells):
        if not isinstance(cell, dict) or not isinstance(cell.get("expression"), dict):
            raise RequestError(422, f"cells[{i}]: expected an object with 'expression': {{gene: value}}")
        ids.append(str(cell.get("cell_id", f"cell{i}")))
        for g, v in cell["expression"].items():
            if isinstance(v, bool) or not isinstance(v, int | float) or not np.isfinite(v) or v < 0:
                raise RequestError(422, f"cells[{i}] gene {g!r}: value {v!r} is not a finite non-negative number")
            if v == 0:
                continue
            indices.append(gene_pos.setdefault(str(g), len(gene_pos)))
            data.append(float(v))
        indptr.append(len(indices))
    if len(set(ids)) != len(ids):
        raise RequestError(422, "cell_id values must be unique within a request")
    if not gene_pos:
        raise RequestError(422, "no cell has any non-zero gene value")
    csr = sp.csr_matrix((np.asarray(data, np.float32), np.asarray(indices, np.int64), np.asarray(indptr)),
                        shape=(len(ids), len(gene_pos)))
    csr.sum_duplicates()
    return ids, csr, _genes_frame(list(gene_pos))


def embedding_2d(feats: np.ndarray) -> list[list[float]]:
    """First two principal components of the cells' features (for the web page's plot)."""
    x = np.asarray(feats, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        return []
    x = x - x.mean(axis=0)
    if len(x) < 2 or x.shape[1] < 2:
        return [[float(v[0]) if len(v) else 0.0, 0.0] for v in x]
    _, _, vt = np.linalg.svd(x[:20000] if len(x) > 20000 else x, full_matrices=False)
    xy = x @ vt[:2].T
    return np.round(xy, 4).tolist()


# ------------------------------------------------------------------------------------------- the app


def build_app(cfg: ServeConfig) -> Any:
    """The Serve application (ingress bound to a predictor deployment) for ``serve.run``."""
    from ray import serve
    from scdrugmap_ray.engine.errors import UserError
    from scdrugmap_ray.engine.registry import LoadedModel, Registry

    autoscaling: dict[str, Any] | None = None
    num_replicas: int | None = cfg.min_replicas
    if cfg.max_replicas > cfg.min_replicas:
        autoscaling = {"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                       "target_ongoing_requests": cfg.target_ongoing_requests}
        num_replicas = None

    @serve.deployment(
        name="Predictor",
        ray_actor_options={"num_cpus": cfg.replica_cpus, "num_gpus": cfg.replica_gpus},
        max_ongoing_requests=max(2 * cfg.max_batch_size, 8),
        **({"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": num_replicas}),
    )
    class Predictor:
        """Loads registry models on demand (LRU, ``max_models_per_replica``) and predicts batched requests."""

        def __init__(self, registry: str) -> None:
            import torch

            self.registry = Registry(registry)
            self.device = "cuda" if cfg.replica_gpus and torch.cuda.is_available() else "cpu"

        @serve.multiplexed(max_num_models_per_replica=cfg.max_models_per_replica)
        async def get_model(self, model_id: str) -> LoadedModel:
            path = self.registry.resolve(model_id)
            return await asyncio.to_thread(LoadedModel, path, self.device)

        async def predict(self, req: dict[str, Any]) -> dict[str, Any]:
            return await self._batched(req)

        @serve.batch(max_batch_size=cfg.max_batch_size, batch_wait_timeout_s=cfg.batch_wait_timeout_s)
        async def _batched(self, reqs: list[dict[str, Any]]) -> list[dict[str, Any]]:
            results: list[dict[str, Any] | None] = [None] * len(reqs)
            by_model: dict[str, list[int]] = {}
            for i, r in enumerate(reqs):
                by_model.setdefault(r["model"], []).append(i)
            for model_id, idx in by_model.items():
                try:
                    model = await self.get_model(model_id)
                except UserError as err:
                    for i in idx:
                        results[i] = {"error": str(err), "status": 404}
                    continue
                ok: list[int] = []
                prepared = []
                for i in idx:  # one request's bad cells must not fail the others
                    try:
                        prepared.append(model.prepare(reqs[i]["cell_ids"], reqs[i]["csr"], reqs[i]["genes"]))
                        ok.append(i)
                    except UserError as err:
                        results[i] = {"error": str(err), "status": 422}
                if not ok:
                    continue
                try:
                    outs = await asyncio.to_thread(model.run, prepared)
                except UserError as err:
                    for i in ok:
                        results[i] = {"error": str(err), "status": 422}
                    continue
                for i, (p, feats) in zip(ok, outs, strict=True):
                    results[i] = {"p": p, "features": feats if reqs[i].get("features") else None,
                                  "n_cells_batch": len(ok)}
            return results  # type: ignore[return-value]

    api = FastAPI(
        title="scdrugmap-ray",
        version="1",
        description="Single-cell drug-response prediction with registry models (sensitive vs resistant).",
    )
    api.add_middleware(BodyLimit, max_bytes=cfg.max_upload_bytes)  # type: ignore[arg-type]

    def check_key(
        x_api_key: str | None = Header(default=None), authorization: str | None = Header(default=None)
    ) -> None:
        if cfg.api_key is None:
            return
        given = x_api_key or (authorization[7:] if authorization and authorization.startswith("Bearer ") else None)
        import hmac

        if not given or not hmac.compare_digest(given.encode(), cfg.api_key.encode()):
            raise RequestError(401, "missing or wrong API key: send it as the X-API-Key header (or Bearer token)")

    @api.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    from . import llm as llm_mod

    bases: tuple[type, ...] = (llm_mod.ingress_base(),) if cfg.llm else ()

    class Ingress(*bases):  # type: ignore[misc]
        def __init__(self, predictor: Any, llm_deployments: dict[str, Any] | None = None,
                     model_cards: dict[str, Any] | None = None) -> None:
            if bases:
                super().__init__(llm_deployments, model_cards)
            self.predictor = predictor
            self.registry = Registry(cfg.registry)
            self._vocab: dict[str, list[str]] = {}

        def _model(self, ref: str) -> tuple[Path, dict[str, Any]]:
            if not isinstance(ref, str) or not ref:
                raise RequestError(422, "field 'model' is required: a registry model NAME or NAME@VERSION")
            try:
                path = self.registry.resolve(ref)
            except UserError as err:
                raise RequestError(404 if "no model" in str(err) or "no version" in str(err) else 422,
                                   str(err)) from None
            return path, json.loads((path / "model.json").read_text())

        def _vocabulary(self, path: Path) -> list[str]:
            key = str(path)
            if key not in self._vocab:
                import pandas as pd

                fit_cfg = path / "featurizer.json"
                if fit_cfg.is_file():
                    self._vocab[key] = list(json.loads(fit_cfg.read_text())["gene_symbols"])
                else:
                    self._vocab[key] = pd.read_parquet(path / "genes.parquet")["symbol"].astype(str).tolist()
            return self._vocab[key]

        @api.get("/healthz")
        async def healthz(self) -> dict[str, Any]:
            return {"status": "ok", "models": len(self.registry.names())}

        @api.get("/v1/models", dependencies=[Depends(check_key)])
        async def models(self) -> dict[str, Any]:
            """Registry models (``models``) and, OpenAI-style, the served LLMs (``object``, ``data``)."""
            out = []
            for info in self.registry.list():
                out.append({k: info.get(k) for k in ("name", "version", "kind", "model", "head", "random_weights",
                                                     "metrics", "cv_metrics", "created", "training_data")})
            llms = await self.llm_model_list() if bases else []
            return {"models": out, "object": "list", "data": llms}

        async def _cells(self, request: Request) -> tuple[str, bool, list[str], Any, Any, int, bool]:
            ctype = request.headers.get("content-type", "")
            if ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
                form = await request.form()
                model = form.get("model")
                upload = form.get("file")
                if upload is None or isinstance(upload, str):
                    raise RequestError(422, "multipart field 'file' (an .h5ad) is required")
                data = await upload.read()
                ids, csr, genes, dropped = await asyncio.to_thread(cells_from_h5ad, data, upload.filename or "upload")
                want_2d = str(form.get("embedding_2d", "false")).lower() in ("1", "true", "yes")
                if len(ids) > cfg.max_cells:
                    raise RequestError(413, f"{len(ids)} cells in one request; at most {cfg.max_cells}")
                return str(model or ""), False, ids, csr, genes, dropped, want_2d
            if ctype.startswith("application/json"):
                try:
                    body = await request.json()
                except ValueError:
                    raise RequestError(422, "the body is not valid JSON") from None
                if not isinstance(body, dict):
                    raise RequestError(422, "the JSON body must be an object with 'model' and 'cells'")
                ids, csr, genes = cells_from_json(body, cfg.max_cells)
                return (str(body.get("model") or ""), bool(body.get("ignore_unknown_genes", False)), ids, csr, genes,
                        0, bool(body.get("embedding_2d", False)))
            raise RequestError(415, "send multipart/form-data (fields model, file) or application/json cells")

        async def _run(self, request: Request, features: bool) -> tuple[dict[str, Any], list[str], Any, Any, bool]:
            model_ref, lenient, ids, csr, genes, dropped, want_2d = await self._cells(request)
            path, info = self._model(model_ref)
            from scdrugmap_ray.engine.registry import gene_overlap

            symbols = genes["symbol"].astype(str).tolist()
            known, unknown = gene_overlap(symbols, self._vocabulary(path))
            if known == 0:
                raise RequestError(422, f"none of the request's {len(symbols)} genes is in model {info['name']!r}'s "
                                        f"gene list (e.g. {', '.join(self._vocabulary(path)[:3])}); check the gene "
                                        "names (symbols or Ensembl IDs)")
            json_request = request.headers.get("content-type", "").startswith("application/json")
            if unknown and json_request and not lenient:
                raise RequestError(422, f"{len(unknown)} gene(s) unknown to model {info['name']!r}: "
                                        f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}; remove them "
                                        "or send \"ignore_unknown_genes\": true")
            if len(ids) == 0:
                raise RequestError(422, "the upload holds no cell with any expression")
            ref = f"{info['name']}@{info['version']}"
            res = await self.predictor.options(multiplexed_model_id=ref).predict.remote(
                {"model": ref, "cell_ids": ids, "csr": csr, "genes": genes, "features": features or want_2d})
            if "error" in res:
                raise RequestError(int(res["status"]), res["error"])
            meta = {"model": info["name"], "version": info["version"], "kind": info["kind"],
                    "base_model": info["model"], "random_weights": bool(info.get("random_weights")),
                    "genes_in_request": len(symbols), "genes_known_to_model": known,
                    "n_cells_skipped_empty": dropped}
            return meta, ids, res["p"], res["features"], want_2d

        @api.post("/v1/predict", dependencies=[Depends(check_key)])
        async def predict(self, request: Request) -> dict[str, Any]:
            """Per-cell p_sensitive and label, and a summary. Multipart: ``model``, ``file`` (.h5ad),
            optional ``embedding_2d=true``. JSON: ``{"model", "cells": [{"cell_id", "expression": {gene:
            value}}], "ignore_unknown_genes": false, "embedding_2d": false}``."""
            from scdrugmap_ray.engine.registry import label_of, summarize

            meta, ids, p, feats, want_2d = await self._run(request, features=False)
            labels = label_of(p)
            cells = [{"cell_id": c, "p_sensitive": round(float(v), 6), "label": lab}
                     for c, v, lab in zip(ids, p, labels, strict=True)]
            out = {**meta, "summary": summarize(p), "cells": cells}
            if want_2d and feats is not None:
                out["embedding_2d"] = await asyncio.to_thread(embedding_2d, feats)
            return out

        @api.post("/v1/embed", dependencies=[Depends(check_key)])
        async def embed(self, request: Request) -> dict[str, Any]:
            """Per-cell embeddings (the features the model's head reads), same inputs as /v1/predict."""
            meta, ids, _, feats, _ = await self._run(request, features=True)
            return {**meta, "dim": int(feats.shape[1]) if feats is not None and feats.ndim == 2 else 0,
                    "cells": [{"cell_id": c, "embedding": np.round(f, 6).tolist()}
                              for c, f in zip(ids, feats, strict=True)]}

        @api.post("/v1/llm/embed-cells", dependencies=[Depends(check_key)])
        async def embed_cells(self, request: Request) -> dict[str, Any]:
            """LLaMa embeddings of cell sentences (the ``llama`` model's rule); the inputs of /v1/embed, with
            ``model`` an LLM name (default: the served one) and optional ``top_k`` (genes per sentence)."""
            if not bases:
                raise RequestError(404, "no LLM is served: start the server with --llm MODEL_DIR")
            from scdrugmap_ray.engine.llm.sentence import DEFAULT_TOP_K

            top_k = DEFAULT_TOP_K
            if request.headers.get("content-type", "").startswith("application/json"):
                try:
                    body = await request.json()
                except ValueError:
                    raise RequestError(422, "the body is not valid JSON") from None
                top_k = body.get("top_k", DEFAULT_TOP_K) if isinstance(body, dict) else DEFAULT_TOP_K
            else:
                form = await request.form()
                top_k = form.get("top_k") or DEFAULT_TOP_K  # type: ignore[assignment]
            try:
                top_k = int(top_k)
            except (ValueError, TypeError):
                top_k = 0
            if top_k < 1:
                raise RequestError(422, "'top_k' must be a positive integer")
            model_ref, _, ids, csr, genes, _, _ = await self._cells(request)
            return await llm_mod.embed_cells(self, str(cfg.llm), model_ref or None, ids, csr, genes, top_k)

        @api.get("/", response_class=HTMLResponse, include_in_schema=False)
        async def page(self) -> HTMLResponse:
            return HTMLResponse(_static("index.html"))

        @api.get("/static/{name}", include_in_schema=False)
        async def static(self, name: str) -> Response:
            types = {"app.js": "text/javascript", "style.css": "text/css"}
            if name not in types:  # a fixed list: a request never names a file path
                raise RequestError(404, "not found")
            return Response(_static(name), media_type=types[name])

    if bases:
        ingress_cls = llm_mod.mount(Ingress, api, [Depends(check_key)])
        deployments, cards = llm_mod.bind_llm(cfg)
    else:
        ingress_cls, deployments, cards = serve.ingress(api)(Ingress), None, None
    ingress = serve.deployment(name="Ingress", ray_actor_options={"num_cpus": cfg.ingress_cpus},
                               max_ongoing_requests=256)(ingress_cls)
    return ingress.bind(Predictor.bind(cfg.registry), deployments, cards)


def _static(name: str) -> str:
    return files("scdrugmap_ray.serve").joinpath("static", name).read_text(encoding="utf-8")


class BodyLimit:
    """ASGI middleware: 413 for a body larger than ``max_bytes`` (by Content-Length, or counted as it streams)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _send_json(send, 413, f"request body of {int(length):,} bytes is larger than the limit of "
                                        f"{self.max_bytes:,} bytes")
            return
        seen = 0
        too_big = False

        async def limited() -> dict[str, Any]:
            nonlocal seen, too_big
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    too_big = True
                    raise RequestError(413, f"request body larger than the limit of {self.max_bytes:,} bytes")
            return msg

        try:
            await self.app(scope, limited, send)
        except RequestError as err:
            if not too_big:
                raise
            await _send_json(send, err.status, err.message)


async def _send_json(send: Any, status: int, message: str) -> None:
    body = json.dumps({"detail": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def run_app(cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000, blocking: bool = False,
            name: str = APP_NAME, route_prefix: str = "/") -> Any:
    """Start Serve's HTTP proxy on host:port and deploy the application (returns its handle). A second
    application on the same proxy needs its own ``name`` and ``route_prefix``."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    log.info("serve config: %s", {k: v for k, v in asdict(cfg).items() if k != "api_key"})
    return serve.run(build_app(cfg), name=name, route_prefix=route_prefix, blocking=blocking)
