"""Figures for serving: load tests of the server's routes (peak memory: engine.pipeline.bench.PeakRSS).

A load test is bounded in count (a fixed number of requests) and in time (a deadline) and checks every
answer: for POST /v1/predict, JSON cells taken from a real .h5ad must all come back with a prediction.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class LoadResult:
    """What one load test saw; ``items`` are what the requests ask for (cells, sentences, tokens)."""

    label: str
    clients: int
    requests: int
    seconds: float = 0.0
    unit: str = "cells"
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    not_sent: int = 0
    items: int = 0  # answered
    missing: int = 0  # asked for in a successful request but not in its answer
    error_samples: list[str] = field(default_factory=list)
    shed: int = 0  # answered 503 or 429 (load shed: the client should retry later)
    shed_latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)  # HTTP status -> count (0: no answer)
    retry_after_missing: int = 0  # shed answers without a Retry-After header
    # a kept-alive connection the server closed before any byte of an answer, the request then sent again on a
    # new connection (RFC 9112 9.3.1; every POST of this API is a pure function of its body): not an error
    reconnects: int = 0
    # open loop: how far behind its schedule the load generator started a request, at worst (s). Large: the
    # generator itself was starved of CPU, and the latencies it measured include its own delays
    client_lag_s: float = 0.0

    @property
    def ok(self) -> int:
        return len(self.latencies)

    @property
    def answered(self) -> int:
        return self.ok + self.shed + self.errors

    def p(self, q: float, shed: bool = False) -> float:
        """Latency percentile in ms (accepted requests, or the shed ones)."""
        lat = self.shed_latencies if shed else self.latencies
        return float(np.percentile(np.asarray(lat) * 1000, q)) if lat else 0.0

    def line(self) -> str:
        per_s = 1 / self.seconds if self.seconds else 0.0
        out = (f"{self.label} clients={self.clients} requests={self.requests} ok={self.ok} errors={self.errors} "
               f"not_sent={self.not_sent} {self.unit}_missing={self.missing} seconds={self.seconds:.1f} "
               f"requests_per_s={self.ok * per_s:.1f} {self.unit}_per_s={self.items * per_s:.0f} "
               f"p50_ms={self.p(50):.1f} p99_ms={self.p(99):.1f}")
        if self.reconnects:
            out += f" reconnects={self.reconnects}"
        if self.client_lag_s:
            out += f" client_lag_ms={self.client_lag_s * 1000:.0f}"
        if self.shed:
            out += (f" shed={self.shed} shed_fraction={self.shed / max(self.requests, 1):.3f} "
                    f"shed_p99_ms={self.p(99, True):.1f} shed_max_ms={max(self.shed_latencies) * 1000:.1f}")
        if self.error_samples:
            out += f" first_error={self.error_samples[0]!r}"
        return out


def request_bodies(h5ad: Path, model: str, n: int, cells_per_request: int) -> list[dict[str, Any]]:
    """``n`` JSON bodies of ``cells_per_request`` cells each, cycling through the file's cells."""
    import anndata as ad
    import scipy.sparse as sp

    a = ad.read_h5ad(h5ad)
    x = sp.csr_matrix(a.X)
    genes = np.asarray(a.var_names.astype(str))
    bodies = []
    for r in range(n):
        cells = []
        for j in range(cells_per_request):
            i = (r * cells_per_request + j) % x.shape[0]
            lo, hi = x.indptr[i], x.indptr[i + 1]
            expr = {str(genes[k]): float(v) for k, v in zip(x.indices[lo:hi], x.data[lo:hi], strict=True)}
            cells.append({"cell_id": f"r{r}-c{j}-{a.obs_names[i]}", "expression": expr})
        bodies.append({"model": model, "cells": cells, "ignore_unknown_genes": True})
    return bodies


def drive(url: str, path: str, bodies: list[dict[str, Any]], answered: Callable[[dict[str, Any], Any], tuple[int, int]],
          *, clients: int, timeout_s: float, headers: dict[str, str] | None = None, label: str = "load",
          unit: str = "cells", shed_ok: bool = False) -> LoadResult:
    """POST every body once to ``url + path`` from ``clients`` threads, each with its own connection, until
    the deadline (bodies left then are counted as not sent). ``answered(body, response JSON)`` gives the
    (answered, missing) items of a successful request; a 503/429 is counted as shed with ``shed_ok``; any
    other outcome is an error."""
    import json

    import httpx

    res = LoadResult(label, clients, len(bodies), unit=unit)
    # encoded before the clock starts, as open_loop does: the figures are the server's, not the client's JSON
    # encoder's (a 200-cell body takes ~9 ms to encode)
    encoded = [json.dumps(b).encode() for b in bodies]
    hdrs = {"content-type": "application/json"}
    lock = threading.Lock()
    deadline = time.monotonic() + timeout_s
    next_i = iter(range(len(bodies)))

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=max(1.0, timeout_s), headers=headers or {}) as client:
            while True:
                with lock:
                    i = next(next_i, None)
                if i is None:
                    return
                if time.monotonic() > deadline:
                    with lock:
                        res.not_sent += 1
                    continue
                t0 = time.perf_counter()
                try:
                    try:
                        r = client.post(path, content=encoded[i], headers=hdrs)
                    except httpx.RemoteProtocolError as err:
                        # the race every keep-alive client meets: the server (HAProxy reloading its
                        # configuration, a replica going) closed the idle connection as the request left;
                        # nothing was answered, so it is sent once more on a new connection, as
                        # browsers and urllib3 do
                        if "without sending a response" not in str(err):
                            raise
                        with lock:
                            res.reconnects += 1
                        r = client.post(path, content=encoded[i], headers=hdrs)
                    dt = time.perf_counter() - t0
                    with lock:
                        res.statuses[r.status_code] = res.statuses.get(r.status_code, 0) + 1
                    if r.status_code in (503, 429) and shed_ok:
                        with lock:
                            res.shed += 1
                            res.shed_latencies.append(dt)
                            res.retry_after_missing += "retry-after" not in r.headers
                        continue
                    if r.status_code != 200:
                        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
                    got, missing = answered(bodies[i], r.json())
                    with lock:
                        res.latencies.append(dt)
                        res.items += got
                        res.missing += missing
                except Exception as err:  # any failure counts; the first few are kept
                    with lock:
                        res.errors += 1
                        if len(res.error_samples) < 3:
                            res.error_samples.append(str(err))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(worker) for _ in range(clients)]:
            f.result()
    res.seconds = time.perf_counter() - t0
    return res


def open_loop(url: str, path: str, bodies: list[dict[str, Any]], answered: Callable[[dict[str, Any], Any],
              tuple[int, int]], *, rate: float, duration_s: float, timeout_s: float = 30.0,
              headers: dict[str, str] | None = None, label: str = "open-loop", unit: str = "cells",
              expect_continue: bool = True) -> LoadResult:
    """Open-loop load: requests arrive at ``rate`` per second for ``duration_s`` (cycling through ``bodies``),
    whatever the server's answers, as clients on the internet do; a shed answer (503/429) is counted with its
    latency, any other non-200 (or no answer within ``timeout_s``) is an error. Bodies are sent pre-encoded,
    with ``Expect: 100-continue`` (as curl sends a large body): a request the server sheds before reading its
    body costs neither side the upload. aiohttp, not httpx: httpx does not implement 100-continue."""
    import asyncio
    import json

    import aiohttp

    n = max(1, int(rate * duration_s))
    res = LoadResult(label, 0, n, unit=unit)
    encoded = [json.dumps(b).encode() for b in bodies]
    hdrs = {"content-type": "application/json", **(headers or {})}

    async def one(session: aiohttp.ClientSession, i: int, due: float) -> None:
        body = bodies[i % len(bodies)]
        t0 = time.perf_counter()
        res.client_lag_s = max(res.client_lag_s, t0 - due)
        try:
            async with session.post(path, data=encoded[i % len(encoded)], headers=hdrs,
                                    expect100=expect_continue) as r:
                raw = await r.read()
                status, retry_after = r.status, "retry-after" in r.headers
            dt = time.perf_counter() - t0
            res.statuses[status] = res.statuses.get(status, 0) + 1
            if status in (503, 429):
                res.shed += 1
                res.shed_latencies.append(dt)
                res.retry_after_missing += not retry_after
                return
            if status != 200:
                raise RuntimeError(f"HTTP {status}: {raw[:200].decode(errors='replace')}")
            got, missing = answered(body, json.loads(raw))
            res.latencies.append(dt)
            res.items += got
            res.missing += missing
        except Exception as err:  # no answer, or a wrong one
            res.errors += 1
            if not isinstance(err, RuntimeError):
                res.statuses[0] = res.statuses.get(0, 0) + 1
            if len(res.error_samples) < 3:
                res.error_samples.append(f"{type(err).__name__}: {err}"[:200])

    async def run() -> None:
        connector = aiohttp.TCPConnector(limit=1000)
        async with aiohttp.ClientSession(base_url=url, connector=connector,
                                         timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
            start = time.perf_counter()
            tasks = []
            for i in range(n):
                due = start + i / rate
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(session, i, due)))
            await asyncio.gather(*tasks)
            res.seconds = time.perf_counter() - start

    # the bodies (millions of small objects) are kept for the answers' checks: moved out of the collector's
    # sight so its full passes do not pause the generator mid-run
    gc.collect()
    gc.freeze()
    try:
        asyncio.run(run())
    finally:
        gc.unfreeze()
    res.clients = int(rate)
    return res


_SERVE_PROCESSES = ("ray::ServeReplica", "ray::ProxyActor", "ray::ServeController")


def _serve_processes(haproxy: bool = False) -> Iterator[Any]:
    """This process's Ray Serve processes (proxy, controller, replicas); with ``haproxy``, also the HAProxy
    that Serve may run."""
    import psutil

    for proc in psutil.Process().children(recursive=True):
        try:
            name = proc.name()
        except psutil.Error:
            continue
        if name.startswith(_SERVE_PROCESSES) or (haproxy and name == "haproxy"):
            yield proc


def server_rss() -> int:
    """RSS (bytes) of this process's Ray Serve processes (proxy, controller, replicas), for leak checks."""
    import psutil

    total = 0
    for proc in _serve_processes():
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total


def server_cpu() -> dict[str, float]:
    """CPU seconds used so far by this process's Serve processes, by kind (``Predictor``, ``Ingress``,
    ``haproxy``, ...): two readings a phase apart give the cores each kind used."""
    import psutil

    out: dict[str, float] = {}
    for proc in _serve_processes(haproxy=True):
        try:
            name, t = proc.name(), proc.cpu_times()
        except psutil.Error:
            continue
        # "ray::ServeReplica:APP:Predictor" -> Predictor; "ray::ServeController.listen_for_change" (a process is
        # named after the task it runs) -> ServeController
        kind = name.rsplit(":", 1)[-1] if name.startswith("ray::ServeReplica") else name.removeprefix("ray::")
        kind = kind.split(".")[0]
        out[kind] = out.get(kind, 0.0) + t.user + t.system
    return out


def predicted_cells(body: dict[str, Any], response: Any) -> tuple[int, int]:
    got = {c["cell_id"] for c in response["cells"] if c.get("p_sensitive") is not None}
    missing = sum(1 for c in body["cells"] if c["cell_id"] not in got)
    return len(body["cells"]) - missing, missing


def load_test(url: str, model: str, h5ad: Path, *, clients: int = 8, n_requests: int = 200,
              cells_per_request: int = 16, timeout_s: float = 300.0, api_key: str | None = None,
              shed_ok: bool = False) -> LoadResult:
    """POST /v1/predict with JSON cells of a real .h5ad; every cell of an answered request must come back with
    a prediction. ``shed_ok``: a 503/429 (more clients than the server holds) is counted as shed, not as an
    error."""
    bodies = request_bodies(h5ad, model, n_requests, cells_per_request)
    return drive(url, "/v1/predict", bodies, predicted_cells, clients=clients, timeout_s=timeout_s,
                 headers={"X-API-Key": api_key} if api_key else None, shed_ok=shed_ok)


def demo_registry(work: Path, cells: int, genes: int, model_name: str) -> tuple[Path, Path]:
    """Simulated cells (.h5ad + store) and a registry model 'bench' fitted on 5,000 of them (benchmarks)."""
    import time

    import numpy as np
    from scdrugmap_ray.engine.data.convert import ConvertOptions, convert_h5ad
    from scdrugmap_ray.engine.data.simulate import simulate_h5ad
    from scdrugmap_ray.engine.data.store import CellStore
    from scdrugmap_ray.engine.models.base import get_model
    from scdrugmap_ray.engine.registry import Registry
    from scdrugmap_ray.engine.train.frozen import save_fold_model
    from scdrugmap_ray.engine.train.heads import make_head

    h5ad, store_dir = work / "sim.h5ad", work / "store"
    if not h5ad.exists():
        t = time.perf_counter()
        simulate_h5ad(h5ad, n_cells=cells, n_datasets=4, n_genes=genes, seed=0, progress=False)
        print(f"simulate: {cells} cells in {time.perf_counter() - t:.0f} s", flush=True)
    if not store_dir.exists():
        t = time.perf_counter()
        convert_h5ad(h5ad, store_dir, ConvertOptions(label_key="response", dataset_key="dataset",
                                                     sample_key="sample"), progress=False)
        print(f"convert: {time.perf_counter() - t:.0f} s", flush=True)
    store = CellStore.open(store_dir)
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(store.n_cells, size=min(5000, store.n_cells), replace=False))
    x = store.read_csr(rows)
    y = store.obs(["label"])["label"].to_numpy()[rows].astype(int)
    model = get_model(model_name)
    model.fit(x[:4000], store.genes, 0)  # type: ignore[attr-defined]
    feats = model.transform(x)  # type: ignore[attr-defined]
    head = make_head(model.default_head)
    head.fit(feats[:4000], y[:4000], feats[4000:], y[4000:], 0)
    fold = save_fold_model(work / "fold.model", model, head, store.genes, {})
    reg = Registry(work / "registry")
    if not reg.versions("bench"):
        reg.add("bench", fold, "frozen", {"model": model.name, "model_options": model.options,
                                          "head": head.name, "metrics": {}, "cv_metrics": {}})
    return store_dir, reg.root
