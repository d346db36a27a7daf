"""The Ray Serve application: a FastAPI ingress (REST API, OpenAPI docs, web page) in front of predictor
deployments that load registry models on demand (``@serve.multiplexed``, LRU) and batch requests
(``@serve.batch``).

    GET  /healthz            liveness: answered by the ingress's outermost middleware, never queued
    GET  /readyz             readiness: every deployment HEALTHY and the default model loadable (503 if not)
    GET  /v1/models          registry models (name, version, kind, metrics, gene count); needs the API key
    POST /v1/predict         multipart (``model``, ``file``: .h5ad) or JSON cells -> per-cell predictions + summary
    POST /v1/embed           the same inputs -> per-cell embeddings (the features the head reads)
    GET  /                   the web page (static HTML/JS, no CDN, works offline); /docs: Swagger UI, served locally

Where the work runs: the ingress only moves bytes. The request body is read there (``BodyLimit`` caps it)
and handed as bytes to a Predictor replica, which parses and validates it (pydantic, in a thread), loads the
model, batches, and encodes the answer (JSON bytes, or NDJSON chunks streamed back through a streaming
handle). So no request can stall the ingress's event loop, and the CPU work scales with the predictors.

Answer formats (``Accept``): JSON (at most ``max_json_cells`` cells), NDJSON (``application/x-ndjson``: line 1
everything but the cells, then one line per cell), and for ``/v1/embed`` an Arrow IPC stream
(``application/vnd.apache.arrow.stream``: columns ``cell_id`` utf8 and ``embedding``
fixed_size_list<float32>[dim], record batches of ``NDJSON_CHUNK`` (2,000) cells encoded one at a time in
the predictor, the JSON head in the schema metadata key ``scdrugmap``). Streams are capped by
``max_cells`` per request (200,000 by default; 413 above), so an Arrow answer holds at most
``max_cells x (dim x 4 bytes + the ids)``; ``pyarrow.ipc.open_stream`` reads it.

Load: every deployment has bounded ``max_ongoing_requests`` and ``max_queued_requests``. Each ingress replica
runs its share of the predictors' slots and holds a short line (``Admission``): a model request waits there
at most ``max_queue_wait_s`` for a slot while the line moves (up to ``STALL_WAIT_S`` while no slot is freed:
a stall, not load); one that finds the line full takes the place of the request that has waited longest,
which is answered ``503`` + ``Retry-After`` (its body never read). Under overload accepted requests wait only
behind the newest few and shed ones hear it in milliseconds. On CPU a predictor works on ``CPU_ONGOING`` (1)
request at a time by default (on a GPU, a batch). Each predictor call has a deadline (``request_timeout_s``)
and the proxy has an end-to-end timeout.
An optional per-API-key token bucket answers ``429``: one bucket per key for all ingress replicas together,
held by a small named Ray actor (one call per request); if that actor does not answer within 0.5 s the limit
fails open to each replica's share (``rate / ingress_replicas``) until it does. A predictor replica that
dies mid-request costs the client nothing: predictions are pure, so the ingress retries them on another
replica. An ingress replica that dies costs no client an error when Serve runs in HAProxy mode
(``serve/proxy.py``): HAProxy replays the requests that replica took on the other one.

Drain: ``scdrugmap-ray serve`` on SIGTERM sets a flag (Ray's internal KV) that every ingress replica
watches: new requests get ``503`` + ``Connection: close``, ``/readyz`` turns 503, and the command waits until
every ingress replica reports no request in flight (or the grace period ends) before shutting Serve down.

Bad input is a one-line JSON 4xx, never a 500: 400 (malformed JSON or multipart), 401 (API key),
404 (unknown model: ``no model 'x'``, no server path, no list), 413 (body, cell count, or a JSON answer
above ``max_json_cells``: ask for NDJSON), 415 (not an .h5ad / JSON), 422 (validation: strict types,
duplicated keys, unknown genes, no overlap with the model's genes, negative or non-finite values).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from fastapi import Depends, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.experimental import internal_kv as kv
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from scdrugmap_ray.engine.data.convert import ConvertOptions, convert_h5ad
from scdrugmap_ray.engine.data.store import CellStore
from scdrugmap_ray.engine.errors import UserError
from scdrugmap_ray.engine.llm.sentence import DEFAULT_TOP_K
from scdrugmap_ray.engine.registry import (
    LoadedModel,
    Registry,
    gene_overlap,
    genes_frame,
    label_of,
    parse_ref,
    summarize,
)

from . import llm as llm_mod
from .errors import RequestError
from .explorer import explorer_router

log = logging.getLogger(__name__)

APP_NAME = "scdrugmap"
NDJSON = "application/x-ndjson"
ARROW = "application/vnd.apache.arrow.stream"  # /v1/embed only: Arrow IPC stream of float32 embeddings
#: routes that run a model: counted against the ingress's admission limit
HEAVY_PATHS = ("/v1/predict", "/v1/embed", "/v1/llm/embed-cells")
KV_NAMESPACE = "scdrugmap_serve"
# the API key's two security schemes (module level: the route signatures name them, see /openapi.json)
KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, description="the server's API key")
BEARER = HTTPBearer(auto_error=False, description="the API key as a Bearer token")


#: requests a CPU predictor replica works on at once by default: more only interleave on the replica's core
#: (parsing holds the GIL), each taking as many times as long (compare: benchmarks/loadtest_serve.py
#: --max-ongoing 2; figures in the README)
CPU_ONGOING = 1


@dataclass
class ServeConfig:
    registry: str
    api_key: str | None = None
    max_upload_bytes: int = 100_000_000
    max_cells: int = 200_000
    max_json_cells: int = 50_000  # larger answers only as NDJSON (Accept: application/x-ndjson)
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 0.0  # autoscaling target per replica; 0: predictor_ongoing (scale when full)
    max_models_per_replica: int = 3
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.01
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    ingress_cpus: float = 0.0
    ingress_replicas: int = 2  # two: one replica's death leaves the other serving
    max_ongoing_requests: int = 0  # per predictor replica; 0: max_batch_size on GPU, CPU_ONGOING on CPU
    max_queued_requests: int = 0  # per ingress replica, waiting (at most max_queue_wait_s); 0: ingress_admit
    request_timeout_s: float = 30.0  # a predictor call's deadline (503 after it); the proxy's is 10 s more
    max_queue_wait_s: float = 0.5  # longest wait in an ingress's line for a predictor slot (then 503, unread)
    rate_limit: float = 0.0  # requests/s per API key, across all ingress replicas (SharedRateLimit); 0: off
    rate_burst: int = 0  # bucket size; 0: 2 x rate_limit (at least 1)
    default_model: str | None = None  # /readyz loads it; None: the registry's first name
    drain_grace_s: float = 30.0
    docs: bool = True  # /docs (Swagger UI served from the package, no CDN)
    llm: str | None = None  # a Hugging Face causal-LM directory: adds the LLM deployments (serve/llm.py)
    llm_name: str = "llama"
    llm_cpus: float = 1.0  # per LLM engine (two engines: generation and embeddings)
    llm_gpus: float = 0.0
    llm_kv_cache_gb: float = 1.0  # vLLM's KV cache on CPU
    llm_embed_only: bool = False  # only the embedding engine (no chat/completions)

    @property
    def predictor_ongoing(self) -> int:
        """Requests one predictor replica works on at once. On a GPU, a batch: requests batched together
        run as one forward pass. On CPU more than CPU_ONGOING only interleaves requests on the replica's
        core (the parsing holds the GIL): each takes N times as long for the same throughput."""
        if self.max_ongoing_requests:
            return self.max_ongoing_requests
        return self.max_batch_size if self.replica_gpus else min(self.max_batch_size, CPU_ONGOING)

    @property
    def predictor_slots(self) -> int:
        """Requests all the predictor replicas (at most) work on at once."""
        return self.predictor_ongoing * max(self.max_replicas, 1)

    @property
    def ingress_admit(self) -> int:
        """Model requests one ingress replica runs at once: its share of what the predictors run."""
        return math.ceil(self.predictor_slots / max(self.ingress_replicas, 1))

    @property
    def predictor_accepts(self) -> int:
        """Requests a predictor replica takes from the ingresses (Serve's ``max_ongoing_requests``); it works
        on ``predictor_ongoing`` of them, the rest wait in the replica, first come first served. All that the
        ingress replicas admit, spread over the replicas but one: Serve's router never has to hold a request
        back from a full replica (it retries with a backoff of up to seconds), not when the shares of the slots
        round up (one replica, two ingress replicas), nor while a replica that died is replaced."""
        sent = self.ingress_admit * max(self.ingress_replicas, 1)
        return max(self.predictor_ongoing, math.ceil(sent / max(self.min_replicas - 1, 1)))

    @property
    def ingress_waiting(self) -> int:
        """Model requests one ingress replica holds waiting for a slot (``Admission``): as many as it runs,
        so closed-loop clients up to twice the predictors' slots are never refused."""
        return self.max_queued_requests or self.ingress_admit

    @property
    def ingress_holds(self) -> int:
        """Model requests all the ingress replicas take without refusing any (running and in line): closed-loop
        clients up to this many are never shed."""
        return (self.ingress_admit + self.ingress_waiting) * max(self.ingress_replicas, 1)

    @property
    def autoscaling_target(self) -> float:
        return self.target_ongoing_requests or float(self.predictor_ongoing)


# ------------------------------------------------------------------------------- request bodies


class CellIn(BaseModel):
    """One cell: its id and its expression (gene symbol or Ensembl ID -> non-negative count or value)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    cell_id: StrictStr | None = Field(None, max_length=256, description="unique within the request (default cellN)")
    expression: dict[StrictStr, StrictInt | StrictFloat] = Field(
        description="gene -> value; zeros may be left out; every value a finite number >= 0", examples=[{"EGFR": 3}])


class PredictRequest(BaseModel):
    """The JSON body of /v1/predict and /v1/embed."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: StrictStr = Field(min_length=1, max_length=200, description="registry model NAME or NAME@VERSION",
                             examples=["pca-sim@1"])
    cells: list[CellIn] = Field(min_length=1, description="the cells (at most the server's --max-cells)")
    ignore_unknown_genes: StrictBool = Field(False, description="drop genes the model does not know (else 422)")
    embedding_2d: StrictBool = Field(False, description="also return a 2-D PCA of the features (JSON answers)")


class PredictUpload(BaseModel):
    """The multipart form of /v1/predict and /v1/embed."""

    model: str = Field(description="registry model NAME or NAME@VERSION")
    file: bytes = Field(json_schema_extra={"format": "binary"}, description="an AnnData .h5ad")
    embedding_2d: bool = Field(False, description="'true' or 'false'")


@dataclass
class Cells:
    """Cells of one request, parsed and validated (in a predictor replica)."""

    model: str
    ids: list[str]
    csr: Any
    genes: Any
    lenient: bool = False  # unknown genes are dropped instead of refused
    embedding_2d: bool = False
    dropped: int = 0  # empty cells dropped from an upload
    json_body: bool = True
    extra: dict[str, Any] = field(default_factory=dict)  # fields a route allows beyond PredictRequest's


MAX_VALUE = float(2**53)  # larger is no count or expression value (and not exact as a float)


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:20] + "..." + r[-8:]


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise RequestError(422, f"key {dup!r} appears twice in one JSON object; send each key once")
    return out


def _no_constant(name: str) -> Any:
    raise RequestError(422, f"{name} is not a JSON number; send finite numbers only")


def _one_line(err: ValidationError) -> str:
    """A pydantic error as one line: where (cells[3].expression.EGFR), what, and how many more."""
    errors = err.errors(include_url=False)
    first, msg = errors[0], errors[0]["msg"]
    loc = list(first["loc"])
    if loc and loc[-1] in ("int", "float"):  # a value of the int | float union: one error, not two
        loc, msg = loc[:-1], "Input should be a number"
    where = ""
    for part in loc:
        where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
    n = len({tuple(p for p in e["loc"] if p not in ("int", "float")) for e in errors})
    more = f" (and {n - 1} more)" if n > 1 else ""
    return f"{where or 'body'}: {msg}{more}"


def parse_json_cells(raw: bytes, max_cells: int, extra_fields: tuple[str, ...] = (),
                     default_model: str | None = None) -> Cells:
    """JSON cells (``PredictRequest``) from the raw body: strict types, no duplicated keys, no NaN; CPU work
    (runs in a thread of a predictor replica). A body that passes every check takes the fast path (pydantic
    parses and validates it in Rust, the matrix is built with numpy; benchmarks/serve_parse.py: 200 cells of
    ~270 values, 26 against 39 CPU ms). Anything else goes through the checked path, which finds the first
    problem and names it."""
    if not extra_fields and default_model is None:
        fast = _parse_fast(raw, max_cells)
        if fast is not None:
            return fast
    return _parse_checked(raw, max_cells, extra_fields, default_model)


def _parse_fast(raw: bytes, max_cells: int) -> Cells | None:
    """The cells of a well-formed body; None for anything the checked path must explain."""
    try:
        req = PredictRequest.model_validate_json(raw)
    except ValidationError:
        return None
    if len(req.cells) > max_cells or b"\\u" in raw:  # \uXXXX escapes could hide a ':' from the count below
        return None
    flat = _flatten(req)
    # No duplicated key: pydantic keeps a repeated key's last value silently. Outside strings every ':' of
    # valid JSON follows a key and inside them a ':' is itself (no escapes above), so the body's ':' count
    # equals the keys plus the colons of the strings kept exactly when nothing was dropped
    _, genes, _, per_cell = flat
    strings = [req.model, *(c.cell_id for c in req.cells if c.cell_id is not None)]
    keys = len(req.model_fields_set) + sum(len(c.model_fields_set) for c in req.cells) + int(per_cell.sum())
    if raw.count(b":") != keys + "".join(strings).count(":") + "".join(genes).count(":"):
        return None
    return _cells_of(req, flat)


_Flat = tuple[list[str], list[str], list[Any], np.ndarray]  # cell ids, genes, values, genes per cell


def _flatten(req: PredictRequest) -> _Flat:
    """The request's cells in one pass: their ids, and every (gene, value) pair in order, cell after cell."""
    ids: list[str] = []
    genes: list[str] = []
    values: list[Any] = []
    per_cell = np.empty(len(req.cells), dtype=np.int64)
    for i, cell in enumerate(req.cells):
        ids.append(cell.cell_id if cell.cell_id is not None else f"cell{i}")
        genes.extend(cell.expression)
        values.extend(cell.expression.values())
        per_cell[i] = len(cell.expression)
    return ids, genes, values, per_cell


def _cells_of(req: PredictRequest, flat: _Flat) -> Cells | None:
    """The request's cells (``_flatten``) as a CSR matrix over the genes with a non-zero value (in order of
    first appearance); None if a value is not a number in [0, 2**53) (``_bad_value`` names it)."""
    ids, genes, values, per_cell = flat
    try:
        v = np.asarray(values, dtype=np.float64)
    except OverflowError:  # an integer beyond float range
        return None
    if not bool(np.all((v >= 0) & (v < MAX_VALUE))):  # also NaN
        return None
    if len(set(ids)) != len(ids):
        raise RequestError(422, "cell_id values must be unique within a request")
    nonzero = v != 0
    if not nonzero.any():
        raise RequestError(422, "no cell has any non-zero gene value")
    rows = np.repeat(np.arange(len(ids)), per_cell)[nonzero]
    codes, symbols = pd.factorize(np.asarray(genes, dtype=object)[nonzero])
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(ids)))])
    csr = sp.csr_matrix((v[nonzero].astype(np.float32), codes.astype(np.int64), indptr),
                        shape=(len(ids), len(symbols)))
    return Cells(req.model, ids, csr, genes_frame([str(g) for g in symbols]), req.ignore_unknown_genes,
                 req.embedding_2d)


def _bad_value(req: PredictRequest) -> RequestError:
    """The first value of the request that is not a number in [0, 2**53)."""
    for i, cell in enumerate(req.cells):
        for g, v in cell.expression.items():
            try:
                x = float(v)
            except OverflowError:
                x = math.inf
            if not (0.0 <= x < MAX_VALUE):  # also refuses NaN
                return RequestError(422, f"cells[{i}].expression.{g}: {_short(v)} is not a number in [0, 2**53)")
    raise AssertionError("no bad value")  # only called when _cells_of found one


def _parse_checked(raw: bytes, max_cells: int, extra_fields: tuple[str, ...],
                   default_model: str | None) -> Cells:
    """Python's json with a hook per object (duplicated keys, NaN), then pydantic: slower, and every
    problem is named (400 for what is not JSON, 413 for too many cells, 422 for the rest)."""
    try:
        body = json.loads(raw, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except RequestError:
        raise
    except RecursionError:
        raise RequestError(400, "the JSON body is nested too deeply; send {model, cells: [...]}") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise RequestError(400, f"the body is not valid JSON ({str(err).splitlines()[0][:120]})") from None
    if not isinstance(body, dict):
        raise RequestError(422, "the JSON body must be an object with 'model' and 'cells'")
    extra = {k: body.pop(k) for k in extra_fields if k in body}
    if body.get("cells") == []:
        raise RequestError(422, "'cells' must be a non-empty list of {cell_id, expression: {gene: value}}")
    if default_model is not None:
        body.setdefault("model", default_model)
    cells = body.get("cells")
    if isinstance(cells, list) and len(cells) > max_cells:
        raise RequestError(413, f"{len(cells)} cells in one request; at most {max_cells}")
    try:
        req = PredictRequest.model_validate(body)
    except ValidationError as err:
        raise RequestError(422, _one_line(err)) from None
    out = _cells_of(req, _flatten(req))
    if out is None:
        raise _bad_value(req)
    out.extra = extra
    return out


def cells_from_h5ad(data: bytes, filename: str) -> tuple[list[str], Any, Any, int]:
    """(cell_ids, csr, genes table, cells dropped as empty) of an uploaded .h5ad, read through the same
    checks as ``scdrugmap-ray convert`` (wrong type, truncated, CSC, NaN...)."""
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
            msg = str(err).replace(str(src), filename).replace(tmp, "")
            raise RequestError(422, msg) from None
    if csr.nnz and float(csr.data.min()) < 0:
        row = int(np.searchsorted(csr.indptr, int(np.argmin(csr.data)), side="right") - 1)
        raise RequestError(422, f"{filename!r} holds negative values (e.g. cell {ids[row]!r}); upload counts or "
                                "non-negative normalized expression")
    return ids, csr, genes, report.n_empty_dropped


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


# ------------------------------------------------------------------------------- answers


@dataclass
class Answer:
    """A computed answer, before encoding."""

    meta: dict[str, Any]
    ids: list[str]
    p: np.ndarray
    feats: np.ndarray | None
    features: bool  # the /v1/embed route
    want_2d: bool


def _cell_rows(ans: Answer, lo: int, hi: int) -> list[dict[str, Any]]:
    if ans.features:
        assert ans.feats is not None
        emb = np.round(ans.feats[lo:hi].astype(np.float64), 6).tolist()
        return [{"cell_id": c, "embedding": e} for c, e in zip(ans.ids[lo:hi], emb, strict=True)]
    p = ans.p[lo:hi]
    return [{"cell_id": c, "p_sensitive": round(float(v), 6), "label": lab}
            for c, v, lab in zip(ans.ids[lo:hi], p, label_of(p), strict=True)]


def _head(ans: Answer) -> dict[str, Any]:
    if ans.features:
        dim = int(ans.feats.shape[1]) if ans.feats is not None and ans.feats.ndim == 2 else 0
        return {**ans.meta, "dim": dim}
    return {**ans.meta, "summary": summarize(ans.p)}


def encode_json(ans: Answer) -> bytes:
    out = {**_head(ans), "cells": _cell_rows(ans, 0, len(ans.ids))}
    if ans.want_2d and ans.feats is not None and not ans.features:
        out["embedding_2d"] = embedding_2d(ans.feats)
    return json.dumps(out, separators=(",", ":")).encode()


NDJSON_CHUNK = 2000  # cells per streamed chunk


def ndjson_chunks(ans: Answer) -> Iterator[tuple[int, int]]:
    """Cell ranges of the NDJSON stream (line 1: everything but the cells; then one line per cell)."""
    for lo in range(0, len(ans.ids), NDJSON_CHUNK):
        yield lo, min(lo + NDJSON_CHUNK, len(ans.ids))


def encode_ndjson(ans: Answer, lo: int, hi: int) -> bytes:
    return "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in _cell_rows(ans, lo, hi)).encode()


#: the end-of-stream marker of the Arrow IPC stream format (continuation token, zero length)
ARROW_EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"


def arrow_schema(ans: Answer) -> Any:
    """The Arrow answer's schema: ``cell_id`` (utf8) and ``embedding`` (fixed_size_list<float32>[dim]); its
    metadata key ``scdrugmap`` holds the JSON answer's head (model, version, dim, ...) as JSON."""
    import pyarrow as pa

    head = _head(ans)
    return pa.schema([("cell_id", pa.string()), ("embedding", pa.list_(pa.float32(), int(head["dim"])))],
                     metadata={"scdrugmap": json.dumps(head, separators=(",", ":"))})


def encode_arrow_schema(ans: Answer) -> bytes:
    """The stream's first message (the schema), as the IPC stream format writes it."""
    return bytes(arrow_schema(ans).serialize().to_pybytes())


def encode_arrow_batch(ans: Answer, lo: int, hi: int) -> bytes:
    """Cells ``lo:hi`` as one IPC record-batch message (the stream is: schema, batches, ``ARROW_EOS``)."""
    import pyarrow as pa

    assert ans.feats is not None
    schema = arrow_schema(ans)
    flat = pa.array(np.ascontiguousarray(ans.feats[lo:hi], dtype=np.float32).reshape(-1), type=pa.float32())
    emb = pa.FixedSizeListArray.from_arrays(flat, list_size=int(schema.field("embedding").type.list_size))
    batch = pa.record_batch([pa.array(ans.ids[lo:hi], type=pa.string()), emb], schema=schema)
    return bytes(batch.serialize().to_pybytes())


def answer_format(accept: str, features: bool) -> str:
    """``json``, ``ndjson`` or ``arrow`` (/v1/embed only) from the request's Accept header."""
    if ARROW in accept:
        if not features:
            raise RequestError(406, f"{ARROW} is offered for /v1/embed; ask /v1/predict for JSON or {NDJSON}")
        return "arrow"
    return "ndjson" if NDJSON in accept else "json"


# ------------------------------------------------------------------------------- runtime guards


class _Runtime:
    """Per-process state of an ingress replica (one replica per process): drain flag, requests in flight."""

    def __init__(self) -> None:
        self.draining = False
        self.inflight = 0


RUNTIME = _Runtime()

_PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
             "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
# Swagger UI sets inline style attributes: its page alone allows them
_DOCS_CSP = _PAGE_CSP.replace("style-src 'self'", "style-src 'self' 'unsafe-inline'")


def _security_headers(path: str) -> list[tuple[bytes, bytes]]:
    csp = _DOCS_CSP if path == "/docs" else _PAGE_CSP
    return [(b"content-security-policy", csp.encode()), (b"x-frame-options", b"DENY"),
            (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]


#: how long a request may wait in a line that has not moved at all: every slot held by requests that a stall
#: holds, not by load (measured: a predictor replica's core worker blocked ~2 s reporting a result to an
#: ingress replica that had just died, and the requests in it with it)
STALL_WAIT_S = 3.0


class Admission:
    """The model-request slots of one ingress replica: ``limit`` run at once; up to ``waiting`` more wait in
    line, first come, first served. A request that finds the line full takes the place of the one that has
    waited longest, which is refused (its client hears 503 at once; under overload the oldest is the likeliest
    to be given up on, and what is accepted waits only for the newest few): so a full line is never a queue
    that accepted requests stand in, and a line that never fills (closed-loop clients up to ``limit +
    waiting``) refuses nobody. A waiting request is also refused after ``max_wait_s`` if slots were freed
    meanwhile (the line moves, too slowly: load), or after ``STALL_WAIT_S`` if none was (a stall: shedding
    would turn a fault into a 5xx). Event-loop only (no lock needed)."""

    def __init__(self, limit: int, waiting: int, max_wait_s: float) -> None:
        self.limit, self.waiting, self.max_wait_s = max(1, limit), max(0, waiting), max_wait_s
        self.running = 0
        self.freed = 0  # slots given back so far: tells a moving line from a stuck one
        self._line: deque[asyncio.Future[bool]] = deque()  # True: a slot handed over; False: pushed out

    async def enter(self) -> bool:
        """True: a slot is this request's (``leave`` gives it back); False: refused (at capacity)."""
        if self.running < self.limit and not self._line:
            self.running += 1
            return True
        if not self.waiting:
            return False
        if len(self._line) >= self.waiting:  # full: the oldest waiter gives its place to this one
            self._line.popleft().set_result(False)
        turn: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._line.append(turn)
        freed = self.freed
        try:
            try:
                return await asyncio.wait_for(asyncio.shield(turn), self.max_wait_s)
            except TimeoutError:
                if turn.done() or self.freed != freed:  # decided as the wait ended, or the line moved: load
                    raise
                return await asyncio.wait_for(asyncio.shield(turn), max(0.0, STALL_WAIT_S - self.max_wait_s))
        except TimeoutError:
            if turn.done():  # decided as the wait ended: keep what it says
                return turn.result()
            turn.cancel()
            self._line.remove(turn)
            return False
        except asyncio.CancelledError:  # the client went away while waiting
            if not turn.done():
                turn.cancel()
                self._line.remove(turn)
            elif turn.result():
                self.leave()
            raise

    def leave(self) -> None:
        self.freed += 1
        while self._line:  # hand the slot to the first request still waiting
            turn = self._line.popleft()
            if not turn.done():
                turn.set_result(True)
                return
        self.running -= 1


class Guard:
    """Outermost ASGI middleware of the ingress: /healthz answered here (nothing can queue in front of it),
    security headers on every answer, 503 while draining, admission (``Admission``) on the model routes,
    and the count of requests in flight that the drain waits for."""

    def __init__(self, app: Any, admit: int, waiting: int = 0, max_wait_s: float = 0.5) -> None:
        self.app, self.admit = app, admit
        self.slots = Admission(admit, waiting, max_wait_s)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):  # an app under a route prefix (e.g. /llm): the route's own path
            path = path[len(root):] or "/"
        extra = _security_headers(path)
        if path == "/healthz":
            await _send_json(send, 200, None, {"status": "ok"}, extra)
            return
        if RUNTIME.draining and path != "/readyz":
            await _send_json(send, 503, "the server is shutting down; retry (another instance will answer)",
                             headers=[*extra, (b"retry-after", b"1"), (b"connection", b"close")])
            return
        heavy = path in HEAVY_PATHS

        async def secured(msg: dict[str, Any]) -> None:
            if msg["type"] == "http.response.start":
                msg = {**msg, "headers": [*msg.get("headers", []), *extra]}
            await send(msg)

        RUNTIME.inflight += 1  # a request waiting for a slot is in flight too: the drain waits for it
        try:
            if heavy and not await self.slots.enter():
                await _send_json(send, 503, f"the server is at capacity ({self.admit} model requests running on "
                                            "this replica, its line full); retry after the Retry-After seconds",
                                 headers=[*extra, (b"retry-after", b"1")])
                return
            try:
                await self.app(scope, receive, secured)
            finally:
                if heavy:
                    self.slots.leave()
        finally:
            RUNTIME.inflight -= 1


class TokenBucket:
    """Per-key token bucket: ``rate`` tokens/s, at most ``burst``; ``take`` -> 0 if allowed, else the wait (s)."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> float:
        now = time.monotonic()
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > 100_000:  # forget idle keys (bounded memory)
            self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < 60}
        return (1.0 - tokens) / self.rate


class _BucketActor:
    """A named async Ray actor holding the token buckets of every ingress replica of one app, so the rate
    limit is per API key across replicas (each replica's own bucket would let N replicas admit N x the rate)."""

    def __init__(self, rate: float, burst: int) -> None:
        self.bucket = TokenBucket(rate, burst)

    async def take(self, key: str) -> float:
        return self.bucket.take(key)


class SharedRateLimit:
    """The per-API-key rate limit of all ingress replicas together: one ``take`` call per request to the
    app's bucket actor (created by the first replica that needs it; it lives as long as that replica and is
    created again after). Until the actor answers (its start takes a second or two), or when a call takes
    longer than ``timeout_s``, or while it is gone, the limit fails OPEN to this replica's share
    (``rate / replicas``, a local bucket): a limiter outage must not become a service outage, and the share
    keeps the total near the limit when the replicas share the load evenly."""

    def __init__(self, rate: float, burst: int, replicas: int, timeout_s: float = 0.5) -> None:
        self.rate, self.burst, self.timeout_s = rate, burst, timeout_s
        self.local = TokenBucket(rate / max(replicas, 1), max(1, burst // max(replicas, 1)))
        self._actor: Any = None  # kept while alive: a named actor with no handle left is collected
        self._ready = False
        self._retry_at = 0.0
        self._starting: Any = None  # the task starting the actor (a reference keeps it from being collected)

    def __getstate__(self) -> dict[str, Any]:  # pickled into every replica: without a handle
        return {**self.__dict__, "_actor": None, "_ready": False, "_retry_at": 0.0, "_starting": None}

    def _connect(self, app: str) -> Any:
        import ray

        return ray.remote(_BucketActor).options(  # type: ignore[attr-defined]
            name=f"ratelimit:{app}:{self.rate:g}:{self.burst}", namespace=KV_NAMESPACE, get_if_exists=True,
            num_cpus=0, max_restarts=0).remote(self.rate, self.burst)

    async def _start(self) -> None:
        try:
            actor = await asyncio.to_thread(self._connect, serve.get_replica_context().app_name)
            self._actor = actor
            await asyncio.wait_for(actor.take.remote(""), timeout=60)  # started (the key '' is no one's)
            self._ready = True
        except Exception as err:  # Ray unreachable, the actor failed to start: the local share meanwhile
            log.warning("rate-limit actor unavailable (%s); this replica limits alone", type(err).__name__)
            self._actor, self._retry_at = None, time.monotonic() + 1.0

    async def take(self, key: str) -> float:
        if self._actor is None and time.monotonic() >= self._retry_at:
            self._retry_at = math.inf  # one start at a time
            self._starting = asyncio.get_running_loop().create_task(self._start())
        if self._ready:
            try:
                return float(await asyncio.wait_for(self._actor.take.remote(key), timeout=self.timeout_s))
            except TimeoutError:
                log.warning("rate-limit actor slow (> %g s); this request counted by this replica", self.timeout_s)
            except (RayActorError, ActorUnavailableError) as err:
                log.warning("rate-limit actor gone (%s); this replica limits alone until it is back",
                            type(err).__name__)
                self._actor, self._ready, self._retry_at = None, False, time.monotonic() + 1.0
        return self.local.take(key)


def _drain_key(app: str) -> str:
    return f"drain:{app}"


def _watch_drain(app: str, replica: str) -> None:
    """Thread of an ingress replica: follow the drain flag; while draining, report the requests in flight."""
    while True:
        try:
            nonce = kv._internal_kv_get(_drain_key(app), namespace=KV_NAMESPACE)
            RUNTIME.draining = bool(nonce)
            if nonce:
                kv._internal_kv_put(f"inflight:{app}:{replica}", f"{nonce.decode()} {RUNTIME.inflight}",
                                    overwrite=True, namespace=KV_NAMESPACE)
        except Exception as err:  # the GCS restarting: keep the last state
            log.debug("drain flag not read: %s", err)
        time.sleep(0.2)


def drain(app: str, grace_s: float, ingress_replicas: int) -> tuple[bool, int]:
    """Stop the app's ingress replicas taking requests and wait until none is in flight (or ``grace_s``).
    Returns (drained, requests still in flight)."""
    nonce = uuid.uuid4().hex
    kv._internal_kv_put(_drain_key(app), nonce, overwrite=True, namespace=KV_NAMESPACE)
    deadline = time.monotonic() + grace_s
    left = -1
    while time.monotonic() < deadline:
        counts = []
        for key in kv._internal_kv_list(f"inflight:{app}:", namespace=KV_NAMESPACE):
            val = (kv._internal_kv_get(key, namespace=KV_NAMESPACE) or b"").decode().split()
            if len(val) == 2 and val[0] == nonce:
                counts.append(int(val[1]))
        left = sum(counts)
        if len(counts) >= ingress_replicas and left == 0:
            return True, 0
        time.sleep(0.2)
    return False, left


def _clear_drain(app: str) -> None:
    kv._internal_kv_del(_drain_key(app), namespace=KV_NAMESPACE)
    for key in kv._internal_kv_list(f"inflight:{app}:", namespace=KV_NAMESPACE):
        kv._internal_kv_del(key, namespace=KV_NAMESPACE)


# ------------------------------------------------------------------------------------------- the app


def _bool_field(value: Any, name: str) -> bool:
    if value is None:
        return False
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise RequestError(422, f"form field {name!r} must be 'true' or 'false'")


def resolve(registry: Registry, ref: str) -> tuple[str, Path]:
    """'name@version' and its directory; unknown: 404 naming only what was asked (no path, no list)."""
    try:
        name, version = parse_ref(ref)
    except UserError as err:
        raise RequestError(422, str(err)) from None
    versions = registry.versions(name)
    if not versions:
        raise RequestError(404, f"no model {name!r}; GET /v1/models lists the models")
    if version is not None and version not in versions:
        raise RequestError(404, f"model {name!r} has no version {version}; GET /v1/models lists the versions")
    version = version or versions[-1]
    return f"{name}@{version}", registry.root / name / str(version)


class Predictor:
    """Parses and validates requests, loads registry models on demand (LRU, ``max_models_per_replica``),
    predicts batched requests and encodes the answers: all the CPU work of a request. ``build_app`` makes
    it a deployment with the config's replicas and limits."""

    def __init__(self, cfg: ServeConfig) -> None:
        import torch  # heavy: in the replica's process only

        self.cfg = cfg
        self.registry = Registry(cfg.registry)
        self.device = "cuda" if cfg.replica_gpus and torch.cuda.is_available() else "cpu"
        self._vocab: dict[str, frozenset[str]] = {}
        # the requests worked on at once (a batch on a GPU); the others Serve hands this replica wait here
        self._working = asyncio.Semaphore(cfg.predictor_ongoing)

        async def load(model_id: str) -> LoadedModel:
            _, path = resolve(self.registry, model_id)
            return await asyncio.to_thread(LoadedModel, path, self.device)

        # the LRU size and the batch shape come from the config, so they are set per replica (Serve
        # detects a multiplexed function stored on the instance, and batch handlers take new sizes)
        self.get_model = serve.multiplexed(max_num_models_per_replica=cfg.max_models_per_replica)(load)
        # a batch holds at most what the replica works on at once (on CPU fewer than max_batch_size)
        self._batched.set_max_batch_size(min(cfg.max_batch_size, cfg.predictor_ongoing))  # type: ignore[attr-defined]
        self._batched.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)  # type: ignore[attr-defined]

    def check_health(self) -> None:
        if not self.registry.root.is_dir():
            raise RuntimeError(f"the registry {self.registry.root} is gone")

    async def _load(self, ref: str) -> LoadedModel:
        try:
            return await self.get_model(ref)
        except RequestError:
            raise
        except Exception as err:  # a broken registry entry is the server's fault: say so, log the details
            log.exception("model %s could not be loaded", ref)
            raise RequestError(500, f"model {ref!r} could not be loaded ({type(err).__name__}); see the "
                                    "server log") from None

    async def ready(self, ref: str) -> str:
        """'' when ``ref`` resolves and loads, else why not."""
        try:
            await self._load(resolve(self.registry, ref)[0])
        except RequestError as err:
            return err.message
        return ""

    async def _compute(self, req: dict[str, Any]) -> Answer:
        cfg = self.cfg
        if req["kind"] == "json":
            cells = await asyncio.to_thread(parse_json_cells, req["body"], cfg.max_cells)
        else:
            ids, csr, genes, dropped = await asyncio.to_thread(cells_from_h5ad, req["data"], req["filename"])
            cells = Cells(req["model"], ids, csr, genes, True, req["embedding_2d"], dropped, json_body=False)
        if len(cells.ids) > cfg.max_cells:
            raise RequestError(413, f"{len(cells.ids)} cells in one request; at most {cfg.max_cells}")
        if not req["stream"] and len(cells.ids) > cfg.max_json_cells:
            raise RequestError(413, f"{len(cells.ids)} cells: a JSON answer holds at most {cfg.max_json_cells}; "
                                    f"ask for a stream with the header 'Accept: {NDJSON}'"
                                    + (f" (or {ARROW})" if req["features"] else ""))
        if not cells.model:
            raise RequestError(422, "field 'model' is required: a registry model NAME or NAME@VERSION")
        ref, _ = resolve(self.registry, cells.model)
        model = await self._load(ref)
        if ref not in self._vocab:
            self._vocab[ref] = frozenset(model.vocabulary)
        symbols = cells.genes["symbol"].astype(str).tolist()
        known, unknown = gene_overlap(symbols, self._vocab[ref])
        name = ref.split("@")[0]
        if known == 0:
            example = ", ".join(sorted(self._vocab[ref])[:3])
            raise RequestError(422, f"none of the request's {len(symbols)} genes is in model {name!r}'s gene "
                                    f"list (e.g. {example}); check the gene names (symbols or Ensembl IDs)")
        if unknown and cells.json_body and not cells.lenient:
            raise RequestError(422, f"{len(unknown)} gene(s) unknown to model {name!r}: "
                                    f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}; remove "
                                    "them or send \"ignore_unknown_genes\": true")
        if not cells.ids:
            raise RequestError(422, "the upload holds no cell with any expression")
        try:
            prepared = await asyncio.to_thread(model.prepare, cells.ids, cells.csr, cells.genes)
        except UserError as err:
            raise RequestError(422, str(err)) from None
        out = await self._batched((ref, prepared))
        if isinstance(out, str):
            raise RequestError(422, out)
        p, feats = out
        info = model.info
        meta = {"model": info["name"], "version": info["version"], "kind": info["kind"],
                "base_model": info["model"], "random_weights": bool(info.get("random_weights")),
                "genes_in_request": len(symbols), "genes_known_to_model": known,
                "n_cells_skipped_empty": cells.dropped}
        keep = req["features"] or cells.embedding_2d
        return Answer(meta, cells.ids, p, feats if keep else None, req["features"], cells.embedding_2d)

    async def answer(self, req: dict[str, Any]) -> dict[str, Any]:
        """One JSON answer: ``{"status": 200, "body": bytes}`` or ``{"status": 4xx, "error": str}``. No
        request is shed here for having waited: the ingress bounds waiting (``Admission``, the handle's
        ``max_queued_requests``), and what arrives late arrives after a stall, not load (a replica's core
        worker blocked ~2 s reporting to a caller that died, the router's failover when a predictor died):
        shedding it would turn a fault into a 5xx and free nothing."""
        try:
            async with self._working:
                ans = await self._compute(req)
                return {"status": 200, "body": await asyncio.to_thread(encode_json, ans)}
        except RequestError as err:
            return {"status": err.status, "error": err.message}

    async def answer_stream(self, req: dict[str, Any]) -> AsyncIterator[Any]:
        """A stream: first the status (a dict), then byte chunks. NDJSON: the head line, then one line per
        cell; Arrow IPC: the schema (the head in its metadata), record batches of NDJSON_CHUNK cells, EOS."""
        try:
            async with self._working:
                ans = await self._compute(req)
        except RequestError as err:
            yield {"status": err.status, "error": err.message}
            return
        yield {"status": 200}
        if req.get("format") == "arrow":
            yield await asyncio.to_thread(encode_arrow_schema, ans)
            for lo, hi in ndjson_chunks(ans):
                yield await asyncio.to_thread(encode_arrow_batch, ans, lo, hi)
            yield ARROW_EOS
            return
        yield (json.dumps(_head(ans), separators=(",", ":")) + "\n").encode()
        for lo, hi in ndjson_chunks(ans):
            yield await asyncio.to_thread(encode_ndjson, ans, lo, hi)

    # the config's max_batch_size and batch_wait_timeout_s are set per replica in __init__
    @serve.batch(max_batch_size=ServeConfig.max_batch_size, batch_wait_timeout_s=ServeConfig.batch_wait_timeout_s)
    async def _batched(self, items: list[tuple[str, Any]]) -> list[Any]:
        results: list[Any] = [None] * len(items)
        by_model: dict[str, list[int]] = {}
        for i, (ref, _) in enumerate(items):
            by_model.setdefault(ref, []).append(i)
        for ref, idx in by_model.items():
            model = await self.get_model(ref)  # loaded by _compute just before: an LRU hit
            try:
                outs = await asyncio.to_thread(model.run, [items[i][1] for i in idx])
            except UserError as err:
                for i in idx:
                    results[i] = str(err)
                continue
            for i, out in zip(idx, outs, strict=True):
                results[i] = out
        return results


class Ingress:
    """The ingress deployment: only moves bytes (the predictors do the work). Its routes are added to the
    FastAPI app by ``build_app``; with ``--llm``, ``build_app`` mixes in ray.serve.llm's OpenAI ingress."""

    def __init__(self, cfg: ServeConfig, predictor: Any, llm_deployments: dict[str, Any] | None = None,
                 model_cards: dict[str, Any] | None = None) -> None:
        if cfg.llm:  # the OpenAI ingress that build_app mixed in
            super().__init__(llm_deployments, model_cards)  # type: ignore[call-arg]
        self.cfg = cfg
        self.predictor = predictor
        self.registry = Registry(cfg.registry)
        ctx = serve.get_replica_context()
        self.app_name = ctx.app_name
        threading.Thread(target=_watch_drain, args=(self.app_name, ctx.replica_id.unique_id), daemon=True,
                         name="drain-watch").start()

    def check_health(self) -> None:
        if not self.registry.root.is_dir():
            raise RuntimeError(f"the registry {self.registry.root} is gone")

    async def _call(self, req: dict[str, Any], stream: bool) -> tuple[Any, Any]:
        """The predictor's first answer (and the stream, if any), within the deadline; replicas that died
        are retried (a prediction is a pure function of its input), overload is a 503 at once."""
        cfg = self.cfg
        deadline = time.monotonic() + cfg.request_timeout_s
        attempt = 0
        while True:
            gen: Any = None
            if stream:
                gen = self.predictor.options(stream=True).answer_stream.remote(req)
                pending: Any = gen.__anext__()
            else:
                pending = gen = self.predictor.answer.remote(req)
            try:
                first = await asyncio.wait_for(pending, timeout=max(0.1, deadline - time.monotonic()))
                return first, gen
            except BackPressureError:
                raise RequestError(503, "the server is at capacity; retry after the Retry-After seconds",
                                   retry_after=1) from None
            except TimeoutError:
                gen.cancel()
                raise RequestError(503, f"no answer within {cfg.request_timeout_s:g} s (the server is "
                                        "overloaded); retry later", retry_after=2) from None
            except (RayActorError, ActorUnavailableError, DeploymentUnavailableError) as err:
                attempt += 1
                if attempt > 4 or time.monotonic() > deadline:
                    raise RequestError(503, "no predictor replica could answer; retry later",
                                       retry_after=2) from None
                log.warning("predictor call failed (%s); retrying (%d)", type(err).__name__, attempt)
                await asyncio.sleep(0.25 * attempt)

    async def _request(self, request: Request, features: bool) -> dict[str, Any]:
        """What the predictor needs: the raw JSON body, or the upload's bytes and form fields."""
        fmt = answer_format(request.headers.get("accept", ""), features)
        stream = fmt != "json"
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("application/json"):
            return {"kind": "json", "body": await request.body(), "features": features, "stream": stream,
                    "format": fmt}
        if ctype.startswith("multipart/form-data"):
            form = await request.form(max_files=1, max_fields=8)
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise RequestError(422, "multipart field 'file' (an .h5ad) is required")
            model = form.get("model")
            if not isinstance(model, str) or not model:
                raise RequestError(422, "field 'model' is required: a registry model NAME or NAME@VERSION")
            return {"kind": "h5ad", "data": await upload.read(), "filename": upload.filename or "upload",
                    "model": model, "embedding_2d": _bool_field(form.get("embedding_2d"), "embedding_2d"),
                    "features": features, "stream": stream, "format": fmt}
        raise RequestError(415, "send multipart/form-data (fields model, file) or application/json cells")

    async def _serve(self, request: Request, features: bool) -> Response:
        req = await self._request(request, features)
        first, gen = await self._call(req, req["stream"])
        if first["status"] != 200:
            raise RequestError(int(first["status"]), first["error"], retry_after=1 if first["status"] == 503
                               else None)
        if not req["stream"]:
            return Response(first["body"], media_type="application/json")

        async def rest() -> AsyncIterator[bytes]:
            async for chunk in gen:
                yield chunk

        return StreamingResponse(rest(), media_type=ARROW if req["format"] == "arrow" else NDJSON)

    async def readyz(self) -> dict[str, Any]:
        """Ready to serve: not draining, every deployment of the app HEALTHY, the default model loadable."""
        if RUNTIME.draining:
            raise RequestError(503, "shutting down", retry_after=5)
        problems: list[str] = []
        try:
            status = await asyncio.to_thread(serve.status)
            app = status.applications[self.app_name]
            deployments = {n: str(d.status.value if hasattr(d.status, "value") else d.status)
                           for n, d in app.deployments.items()}
            problems += [f"deployment {n} is {s}" for n, s in deployments.items() if s != "HEALTHY"]
        except Exception as err:  # the controller is restarting
            deployments = {}
            problems.append(f"the Serve controller did not answer ({type(err).__name__})")
        default = self.cfg.default_model or next(iter(await asyncio.to_thread(self.registry.names)), None)
        if default is None:
            problems.append("the registry holds no model")
        else:
            try:
                why = await asyncio.wait_for(self.predictor.ready.remote(default), timeout=20)
            except Exception as err:
                why = f"no predictor answered ({type(err).__name__})"
            if why:
                problems.append(f"default model {default!r}: {why}")
        if problems:
            raise RequestError(503, "not ready: " + "; ".join(problems), retry_after=5)
        return {"status": "ready", "default_model": default, "deployments": deployments}

    async def models(self) -> dict[str, Any]:
        """Registry models (``models``) and, OpenAI-style, the served LLMs (``object``, ``data``)."""
        out = []
        for info in await asyncio.to_thread(self.registry.list):
            out.append({k: info.get(k) for k in ("name", "version", "kind", "model", "head", "random_weights",
                                                 "metrics", "cv_metrics", "created", "training_data")})
        llms = await self.llm_model_list() if self.cfg.llm else []  # type: ignore[attr-defined]
        return {"models": out, "object": "list", "data": llms}

    async def predict(self, request: Request) -> Response:
        """Per-cell p_sensitive and label, and a summary. JSON: ``PredictRequest``; multipart: ``model``,
        ``file`` (.h5ad), optional ``embedding_2d=true``."""
        return await self._serve(request, features=False)

    async def embed(self, request: Request) -> Response:
        """Per-cell embeddings (the features the model's head reads), same inputs as /v1/predict."""
        return await self._serve(request, features=True)

    async def embed_cells(self, request: Request) -> dict[str, Any]:
        """LLaMa embeddings of cell sentences (the ``llama`` model's rule); the inputs of /v1/embed, with
        ``model`` an LLM name (default: the served one) and optional ``top_k`` (genes per sentence)."""
        cfg = self.cfg
        if not cfg.llm:
            raise RequestError(404, "no LLM is served: start the server with --llm MODEL_DIR")

        req = await self._request(request, features=True)
        top_k: Any = DEFAULT_TOP_K
        if req["kind"] == "json":
            cells = await asyncio.to_thread(parse_json_cells, req["body"], cfg.max_cells, ("top_k",),
                                            cfg.llm_name)
            model_ref, ids, csr, genes = cells.model, cells.ids, cells.csr, cells.genes
            top_k = cells.extra.get("top_k", DEFAULT_TOP_K)
        else:
            form = await request.form()
            top_k = form.get("top_k") or DEFAULT_TOP_K
            ids, csr, genes, _ = await asyncio.to_thread(cells_from_h5ad, req["data"], req["filename"])
            model_ref = req["model"]
        if isinstance(top_k, str) and top_k.isdigit():
            top_k = int(top_k)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise RequestError(422, "'top_k' must be a positive integer")
        return await llm_mod.embed_cells(self, str(cfg.llm), model_ref or None, ids, csr, genes, top_k)

    async def page(self) -> HTMLResponse:
        return HTMLResponse(_static("index.html"))

    async def docs(self) -> HTMLResponse:
        if not self.cfg.docs:
            raise RequestError(404, "the API docs are off on this server (serve --docs turns them on); "
                                    "the schema is at /openapi.json")
        return HTMLResponse(_static("docs.html"))

    async def static(self, name: str) -> Response:
        if name not in STATIC:  # a fixed list: a request never names a file path
            raise RequestError(404, "not found")
        return Response(await asyncio.to_thread(_static_bytes, name), media_type=STATIC[name],
                        headers={"Cache-Control": "max-age=3600"})


def build_app(cfg: ServeConfig) -> Any:
    """The Serve application (ingress bound to a predictor deployment) for ``serve.run``: the FastAPI app
    (middleware, API-key check, error handlers, routes) and the deployments with the config's options."""
    autoscaling: dict[str, Any] | None = None
    num_replicas: int | None = cfg.min_replicas
    if cfg.max_replicas > cfg.min_replicas:
        autoscaling = {"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                       "target_ongoing_requests": cfg.autoscaling_target}
        num_replicas = None
    shed = {"status_code": 503, "retry_after_s": 1}

    api = FastAPI(
        title="scdrugmap-ray",
        version="1",
        description="Single-cell drug-response prediction with registry models (sensitive vs resistant). "
                    "Model routes need the API key (X-API-Key header or Bearer token) when the server has one. "
                    f"Answers above {cfg.max_json_cells:,} cells come only as NDJSON (Accept: {NDJSON}): line 1 "
                    "holds everything but the cells, then one line per cell.",
        docs_url=None,
        redoc_url=None,
    )
    api.add_middleware(BodyLimit, max_bytes=cfg.max_upload_bytes)  # type: ignore[arg-type]
    api.add_middleware(Guard, admit=cfg.ingress_admit, waiting=cfg.ingress_waiting,  # type: ignore[arg-type]
                       max_wait_s=cfg.max_queue_wait_s)  # added last: outermost
    bucket = (SharedRateLimit(cfg.rate_limit, cfg.rate_burst or max(1, int(2 * cfg.rate_limit)), cfg.ingress_replicas)
              if cfg.rate_limit else None)

    async def check_key(request: Request, x_api_key: Annotated[str | None, Security(KEY_HEADER)] = None,
                        auth: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)] = None) -> None:
        given = x_api_key or (auth.credentials if auth else None)
        if cfg.api_key is not None and (not given or not hmac.compare_digest(given.encode(), cfg.api_key.encode())):
            raise RequestError(401, "missing or wrong API key: send it as the X-API-Key header (or Bearer token)")
        if bucket is not None:
            who = hashlib.sha256(given.encode()).hexdigest() if given else (request.client.host if request.client
                                                                            else "?")
            wait = await bucket.take(who)
            if wait:
                raise RequestError(429, f"rate limit of {cfg.rate_limit:g} requests/s for this API key reached; "
                                        f"retry after {wait:.1f} s", retry_after=wait)

    @api.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=exc.headers)

    @api.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse({"detail": f"{where}: {first.get('msg')}"}, status_code=422)

    @api.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); see the server log"}, status_code=500)

    api.include_router(explorer_router(cfg.registry, Depends(check_key)))  # /v1/explorer: Datasets, Models, Results
    body_doc = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/PredictRequest"}},
        "multipart/form-data": {"schema": {"$ref": "#/components/schemas/PredictUpload"}}}}}
    answers_doc: dict[int | str, dict[str, Any]] = {
        200: {"content": {"application/json": {}, NDJSON: {}}, "description": "JSON, or NDJSON when asked"},
        503: {"description": "at capacity or shutting down: retry after Retry-After seconds"},
        429: {"description": "rate limit of the API key reached (Retry-After)"}}
    embed_doc: dict[int | str, dict[str, Any]] = {
        **answers_doc,
        200: {"content": {"application/json": {}, NDJSON: {}, ARROW: {}},
              "description": f"JSON; NDJSON when asked; or with 'Accept: {ARROW}' an Arrow IPC stream: columns "
                             "cell_id (utf8) and embedding (fixed_size_list<float32>[dim]) in record batches of "
                             f"{NDJSON_CHUNK:,} cells, the head (model, version, dim, ...) as JSON in the schema "
                             f"metadata key 'scdrugmap'; at most max_cells ({cfg.max_cells:,}) cells per request"},
        406: {"description": f"{ARROW} asked of /v1/predict (offered for /v1/embed)"}}

    keyed = [Depends(check_key)]
    route = api.add_api_route  # in this order: the class's routes after the explorer's
    route("/readyz", Ingress.readyz, methods=["GET"], responses={503: {"description": "not ready: why, in 'detail'"}})
    route("/v1/models", Ingress.models, methods=["GET"], dependencies=keyed)
    route("/v1/predict", Ingress.predict, methods=["POST"], dependencies=keyed, openapi_extra=body_doc,
          response_class=Response, responses=answers_doc)
    route("/v1/embed", Ingress.embed, methods=["POST"], dependencies=keyed, openapi_extra=body_doc,
          response_class=Response, responses=embed_doc)
    route("/v1/llm/embed-cells", Ingress.embed_cells, methods=["POST"], dependencies=keyed)
    route("/", Ingress.page, methods=["GET"], response_class=HTMLResponse, include_in_schema=False)
    route("/docs", Ingress.docs, methods=["GET"], response_class=HTMLResponse, include_in_schema=False)
    route("/static/{name}", Ingress.static, methods=["GET"], include_in_schema=False)
    _document_bodies(api)
    if cfg.llm:
        mixed = type("Ingress", (Ingress, llm_mod.ingress_base()), {})
        ingress_cls = llm_mod.mount(mixed, api, keyed)
        deployments, cards = llm_mod.bind_llm(cfg)
    else:
        ingress_cls, deployments, cards = serve.ingress(api)(Ingress), None, None
    predictor = serve.deployment(
        name="Predictor",
        ray_actor_options={"num_cpus": cfg.replica_cpus, "num_gpus": cfg.replica_gpus},
        max_ongoing_requests=cfg.predictor_accepts,
        # a caller (an ingress replica) never has more outstanding than it admits: Serve's own queue in front
        # of the replicas holds them all, and its backpressure (503) is a last resort
        max_queued_requests=cfg.ingress_admit,
        backpressure_config=shed,
        graceful_shutdown_timeout_s=cfg.drain_grace_s,
        health_check_period_s=2.0,
        **({"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": num_replicas}),
    )(Predictor)
    # Shedding costs least before a body is read: the ingress's Guard runs ``ingress_admit`` model requests,
    # holds ``ingress_waiting`` more in its line and refuses the rest (its other slots stay free for /healthz,
    # /readyz and the page); Serve's own queue in front of the replica is short (then 503 + Retry-After).
    ingress = serve.deployment(name="Ingress", ray_actor_options={"num_cpus": cfg.ingress_cpus},
                               num_replicas=cfg.ingress_replicas,
                               max_ongoing_requests=cfg.ingress_admit + cfg.ingress_waiting + 16,
                               max_queued_requests=16, backpressure_config=shed,
                               graceful_shutdown_timeout_s=cfg.drain_grace_s, health_check_period_s=2.0)(ingress_cls)
    return ingress.bind(cfg, predictor.bind(cfg), deployments, cards)


def _document_bodies(api: FastAPI) -> None:
    """/openapi.json with the request-body models (the routes read their bodies themselves, off the loop)."""
    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            schema = get_openapi(title=api.title, version=api.version, description=api.description,
                                 routes=api.routes)
            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            for m in (PredictRequest, PredictUpload):
                s = m.model_json_schema(ref_template="#/components/schemas/{model}")
                comps.update(s.pop("$defs", {}))
                comps[m.__name__] = s
            api.openapi_schema = schema
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]


#: files of the page and of /docs: name -> media type (a fixed list, never a path from a request)
STATIC = {"app.js": "text/javascript", "style.css": "text/css", "docs.js": "text/javascript",
          "swagger-ui.css": "text/css", "swagger-ui-bundle.js": "text/javascript"}


def _static(name: str) -> str:
    return files("scdrugmap_ray.serve").joinpath("static", name).read_text(encoding="utf-8")


def _static_bytes(name: str) -> bytes:
    if name.startswith("swagger-ui"):
        from swagger_ui_bundle import swagger_ui_path

        return (Path(swagger_ui_path) / name).read_bytes()
    return files("scdrugmap_ray.serve").joinpath("static", name).read_bytes()


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


async def _send_json(send: Any, status: int, message: str | None, body_obj: dict[str, Any] | None = None,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(body_obj if body_obj is not None else {"detail": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def run_app(cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000, blocking: bool = False,
            name: str = APP_NAME, route_prefix: str = "/") -> Any:
    """Start Serve's HTTP proxy on host:port and deploy the application (returns its handle). A second
    application on the same proxy needs its own ``name`` and ``route_prefix``."""
    # the proxy's end-to-end timeout: later than the ingress's own deadline, so a client normally gets our 503
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": cfg.request_timeout_s + 10})
    log.info("serve config: %s", {k: v for k, v in asdict(cfg).items() if k != "api_key"})
    _clear_drain(name)
    return serve.run(build_app(cfg), name=name, route_prefix=route_prefix, blocking=blocking)


