"""CLI commands of the model registry, atlas-scale prediction and the server:
``models register``, ``models list --registry``, ``predict``, ``serve``, ``bench predict``, ``bench serve``.

Registered into the main app by ``register(app, models_app, bench_app)`` (see the end of cli/main.py).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from scdrugmap_ray.engine.errors import UserError

log = logging.getLogger("scdrugmap_ray")

RegistryOpt = Annotated[
    Path | None,
    typer.Option("--registry", help="Registry directory (default: $SCDRUGMAP_RAY_REGISTRY or "
                 "~/.local/share/scdrugmap-ray/models)."),
]


def _say(line: str) -> None:
    typer.echo(line)


def models_register(
    run_dir: Annotated[Path, typer.Argument(help="A finished benchmark run directory.")],
    name: Annotated[str, typer.Option(help="Registry name of the model.")],
    unit: Annotated[str | None, typer.Option(help="The unit id (see results.parquet).")] = None,
    best: Annotated[str | None, typer.Option(help="Instead of --unit: the unit with the best mean METRIC.")] = None,
    fold: Annotated[str | None, typer.Option(help="Fold name or number (default: the best by --metric).")] = None,
    metric: Annotated[str, typer.Option(help="Metric choosing the fold (and the unit with --best).")] = "auroc",
    registry: RegistryOpt = None,
    copy_checkpoint: Annotated[bool, typer.Option(help="Copy the foundation model's checkpoint into the "
                                                  "registry (random-weight presets are always copied).")] = False,
) -> None:
    """Turn a trained unit of a run (frozen head, or LoRA adapter + head) into a versioned registry model."""
    from scdrugmap_ray.jobs.register import register_from_run

    path = register_from_run(run_dir, name, unit=unit, best=best, fold=fold, metric=metric, registry=registry,
                             copy_checkpoint=copy_checkpoint)
    info = json.loads((path / "model.json").read_text())
    cv = info["cv_metrics"].get(metric, {})
    _say(f"registered {info['name']}@{info['version']} ({info['kind']}, {info['model']} + {info['head']}) from "
         f"{info['source']['unit_id']} {info['source']['fold_name']}: "
         f"{metric} {info['metrics'].get(metric, float('nan')):.3f}"
         f" (unit mean {cv.get('mean', float('nan')):.3f} over {cv.get('n_folds', 0)} folds)")
    if info.get("random_weights"):
        _say("WARNING: RANDOM WEIGHTS (not pretrained): its predictions mean nothing")
    _say(f"in {path}")


def models_list(
    trained: Annotated[bool, typer.Option("--trained", help="List the trained models of the registry.")] = False,
    registry: RegistryOpt = None,
) -> None:
    """List the model architectures a benchmark can name, or (--trained / --registry DIR) the registry's models."""
    if not trained and registry is None:
        from scdrugmap_ray.engine.models.base import available_models

        for n in available_models():
            _say(n)
        return
    from scdrugmap_ray.engine.registry import Registry

    reg = Registry(registry)
    rows = reg.list()
    if not rows:
        _say(f"no models in {reg.root}")
        return
    for info in rows:
        m = info.get("metrics", {})
        cv = info.get("cv_metrics", {}).get("auroc", {})
        flag = "  RANDOM WEIGHTS" if info.get("random_weights") else ""
        _say(f"{info['name']}@{info['version']}  {info['kind']:6s} {info['model']} + {info['head']}  "
             f"auroc {m.get('auroc', float('nan')):.3f} (cv {cv.get('mean', float('nan')):.3f})  "
             f"{info['created']}{flag}")


def predict(
    data: Annotated[Path, typer.Argument(help="An .h5ad file or a cell store directory.")],
    model: Annotated[str, typer.Option(help="Registry model NAME or NAME@VERSION.")],
    out: Annotated[Path, typer.Option(help="Output: .parquet (cell_id, p_sensitive, label) or .h5ad (obs columns).")],
    registry: RegistryOpt = None,
    embeddings: Annotated[
        bool, typer.Option(help="Also write embeddings (obsm['X_scdrugmap'] / embedding column).")
    ] = False,
    address: Annotated[str | None, typer.Option(help="Connect to this Ray cluster.")] = None,
    actors: Annotated[int | None, typer.Option(min=1, help="Most predictor actors (default: one per GPU, or per "
                                                "node; CPUs for baselines).")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda; default: cuda when the cluster has GPUs.")] = None,
    actor_resource: Annotated[list[str] | None, typer.Option(
        "--actor-resource", help="A Ray resource every predictor actor needs, NAME=AMOUNT (repeatable).")] = None,
    batch_cells: Annotated[int, typer.Option(min=1, help="Cells per predictor call (memory per actor).")] = 4096,
    layer: Annotated[str | None, typer.Option(help="Read this layer of the .h5ad instead of X.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    submit: Annotated[bool, typer.Option("--submit", help="Run as a Ray job on the cluster whose dashboard is "
                                         "--address (paths must be absolute and readable there).")] = False,
    key_added: Annotated[str, typer.Option(help="Names in an .h5ad output: obs KEY_p_sensitive, KEY_label, obsm "
                                           "X_KEY, uns KEY (provenance), as sdr.tl.predict(key_added=KEY).")]
    = "scdrugmap",
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Predict drug response of every cell with a registry model (Ray Data streaming, bounded memory)."""
    if not key_added or not key_added.replace("_", "").replace("-", "").isalnum():
        raise UserError(f"--key-added {key_added!r}: use letters, digits, '_' or '-'")
    if submit:
        job_id = _submit_predict(data, model, out, registry, embeddings, address, actors, layer, overwrite,
                                 key_added)
        _say(f"submitted {job_id}; follow it with `scdrugmap-ray logs {job_id} --address {address}`")
        return
    from scdrugmap_ray.engine.data.convert import ConvertOptions, ensure_store
    from scdrugmap_ray.engine.models.base import cache_root
    from scdrugmap_ray.engine.registry import Registry, predict_store
    from scdrugmap_ray.engine.runtime import init_ray

    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; choose another --out or pass --overwrite")
    version_dir = Registry(registry).resolve(model)
    if not data.exists():
        raise UserError(f"{data} not found")
    store = ensure_store(data, ConvertOptions(layer=layer), cache_root() / "stores", progress=not quiet)
    source = data if data.is_file() else Path(str(store.meta.get("source", "")))
    init_ray(address)
    from scdrugmap_ray.engine.runtime import parse_resources

    stats = predict_store(version_dir, store, out, embeddings=embeddings, source_h5ad=source, num_actors=actors,
                          device=device, actor_resources=parse_resources(actor_resource), block_cells=batch_cells,
                          progress=not quiet)
    info = json.loads((version_dir / "model.json").read_text())
    if out.suffix.lower() == ".h5ad":  # the same names and provenance as sdr.tl.predict(key_added=...)
        from scdrugmap_ray.engine.registry import THRESHOLD
        from scdrugmap_ray.tl import prediction_provenance, rename_prediction_keys

        rename_prediction_keys(out, key_added, prediction_provenance(info, THRESHOLD, stats.n_cells, "ray",
                                                                     embeddings))
    if info.get("random_weights"):
        _say("WARNING: RANDOM WEIGHTS (not pretrained): predictions mean nothing")
    _say(f"predicted {stats.n_cells:,} cells with {info['name']}@{info['version']}: {stats.n_sensitive:,} sensitive "
         f"({stats.n_sensitive / max(stats.n_cells, 1):.1%}); {stats.cells_per_s:,.0f} cells/s; wrote {out}")


def _submit_predict(data: Path, model: str, out: Path, registry: Path | None, embeddings: bool,
                    address: str | None, actors: int | None, layer: str | None, overwrite: bool,
                    key_added: str = "scdrugmap") -> str:
    """The same predict as a Ray job (Jobs API, the package staged as py_modules), as ``submit`` does for runs."""
    import shlex
    import tempfile

    from scdrugmap_ray.engine.registry import Registry, parse_ref
    from scdrugmap_ray.jobs import submit as jobs_submit

    if not address:
        raise UserError("--submit needs --address http://HEAD:8265 (the cluster's dashboard)")
    parse_ref(model)
    reg = Registry(registry).root
    from scdrugmap_ray.engine.storage import shareable

    for what, path in (("DATA", data), ("--out", out), ("--registry", reg)):
        shareable(path, what)
    env = jobs_submit.cluster_env()
    if "SCDRUGMAP_RAY_CACHE" not in env and data.suffix == ".h5ad":
        raise UserError("predict --submit of an .h5ad converts it on the cluster: set SCDRUGMAP_RAY_CACHE to a "
                        "directory every node mounts (or a URI) so the cell store lands there, or convert first and "
                        "pass the store directory")
    command = ["python", "-m", "scdrugmap_ray.cli.main", "predict", str(data), "--model", model, "--out", str(out),
               "--registry", str(reg)]
    command += ["--embeddings"] if embeddings else []
    command += ["--actors", str(actors)] if actors else []
    command += ["--layer", layer] if layer else []
    command += ["--overwrite"] if overwrite else []
    command += ["--key-added", key_added] if key_added != "scdrugmap" else []
    command += ["--quiet"]  # a job's log is no terminal: no progress bar
    client = jobs_submit.job_client(address)
    with tempfile.TemporaryDirectory(prefix="scdrugmap-submit-") as tmp:
        package = jobs_submit.stage_package(Path(tmp) / "stage")
        return str(jobs_submit.call_jobs_api(address, None, lambda: client.submit_job(
            entrypoint=shlex.join(command), runtime_env={"py_modules": [str(package)], "env_vars": env},
            metadata={"tool": "scdrugmap-ray", "command": "predict"})))


def serve_cmd(
    registry: RegistryOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    api_key_env: Annotated[str | None, typer.Option(help="Environment variable holding the API key "
                                                    "(requests must send it as X-API-Key or Bearer).")] = None,
    max_upload_mb: Annotated[float, typer.Option(help="Largest request body in MB (413 above).")] = 100.0,
    max_cells: Annotated[int, typer.Option(help="Most cells per request.")] = 200_000,
    min_replicas: Annotated[int, typer.Option(help="Predictor replicas, at least.")] = 1,
    max_replicas: Annotated[int, typer.Option(help="Predictor replicas, at most (autoscaling when > min).")] = 1,
    target_ongoing_requests: Annotated[float, typer.Option(help="Autoscaling target per replica (0: "
                                                         "--max-ongoing-requests: add replicas when they are "
                                                         "full).")] = 0.0,
    max_models_per_replica: Annotated[int, typer.Option(help="Models kept loaded per replica (LRU).")] = 3,
    max_batch_size: Annotated[int, typer.Option(help="Requests batched together by a replica.")] = 16,
    batch_wait_ms: Annotated[float, typer.Option(help="How long a replica waits to fill a batch.")] = 10.0,
    replica_cpus: Annotated[float, typer.Option(help="CPUs per predictor replica.")] = 1.0,
    replica_gpus: Annotated[float, typer.Option(help="GPUs per predictor replica.")] = 0.0,
    ingress_replicas: Annotated[int, typer.Option(help="Ingress (HTTP) replicas: two, so one's death leaves "
                                                  "the other serving.")] = 2,
    max_ongoing_requests: Annotated[int, typer.Option(help="Requests one predictor replica works on at once "
                                                      "(0: --max-batch-size with --replica-gpus, else 1).")] = 0,
    max_queued_requests: Annotated[int, typer.Option(help="Requests one ingress replica holds waiting for a "
                                                     "predictor slot, each at most --max-queue-wait (0: as "
                                                     "many as it runs at once); a request finding the line full "
                                                     "takes the place of the longest waiting, which gets 503 + "
                                                     "Retry-After.")] = 0,
    request_timeout: Annotated[float, typer.Option(help="Seconds a request may wait for its prediction (503 "
                                                   "after); the proxy gives up 10 s later.")] = 30.0,
    max_queue_wait: Annotated[float, typer.Option(help="Seconds a model request may wait in its ingress "
                                                  "replica's line for a predictor slot before it is shed with "
                                                  "503 + Retry-After.")] = 0.5,
    rate_limit: Annotated[float, typer.Option(help="Requests/s per API key (one token bucket shared by the ingress "
                                              "replicas; 429 + Retry-After above); 0: off.")] = 0.0,
    rate_burst: Annotated[int, typer.Option(help="Token bucket size (0: 2 x --rate-limit).")] = 0,
    max_json_cells: Annotated[int, typer.Option(help="Most cells in a JSON answer; larger answers stream as "
                                                "NDJSON (Accept: application/x-ndjson).")] = 50_000,
    default_model: Annotated[str | None, typer.Option(help="Model /readyz loads (default: the registry's "
                                                      "first).")] = None,
    drain_grace: Annotated[float, typer.Option(help="On SIGTERM/Ctrl-C: seconds to finish requests in "
                                               "flight before stopping.")] = 30.0,
    docs: Annotated[bool, typer.Option(help="Serve the API docs at /docs (Swagger UI, from the package).")] = True,
    address: Annotated[str | None, typer.Option(help="Connect to this Ray cluster.")] = None,
    proxy: Annotated[str, typer.Option(help="HTTP proxy of the embedded local Ray: 'haproxy' (HAProxy in front of "
                                       "the ingress replicas, replaying a request whose replica died) or 'ray' "
                                       "(Ray's Python proxy). A cluster (--address) uses what it was started "
                                       "with (serve/proxy.py).")] = "haproxy",
    llm: Annotated[Path | None, typer.Option(help="Also serve this Hugging Face causal-LM directory (e.g. "
                                             "Meta-Llama-3-8B) with vLLM: OpenAI-compatible /v1/embeddings, "
                                             "/v1/completions, /v1/chat/completions and /v1/llm/embed-cells.")] = None,
    llm_name: Annotated[str, typer.Option(help="The LLM's model id (NAME for chat/completions, NAME-embed for "
                                          "embeddings).")] = "llama",
    llm_cpus: Annotated[float, typer.Option(help="CPUs per LLM engine (two engines unless --llm-embed-only).")] = 1.0,
    llm_gpus: Annotated[float, typer.Option(help="GPUs per LLM engine.")] = 0.0,
    llm_kv_cache_gb: Annotated[float, typer.Option(help="vLLM KV cache per engine on CPU, GiB.")] = 1.0,
    llm_embed_only: Annotated[bool, typer.Option(help="Only the embedding engine (no chat/completions).")] = False,
) -> None:
    """Serve registry models: REST API (/v1/...), OpenAPI docs (/docs) and a web page (/), on Ray Serve; with
    --llm also an LLM behind OpenAI-compatible routes."""
    import os

    from scdrugmap_ray.engine.registry import Registry
    from scdrugmap_ray.engine.runtime import init_ray
    from scdrugmap_ray.serve.app import APP_NAME, ServeConfig, drain, run_app

    for opt, val in (("--ingress-replicas", ingress_replicas), ("--min-replicas", min_replicas),
                     ("--max-batch-size", max_batch_size)):
        if val < 1:
            raise UserError(f"{opt} {val}: give at least 1")
    for opt, num in (("--request-timeout", request_timeout), ("--max-queue-wait", max_queue_wait),
                     ("--rate-limit", rate_limit),
                     ("--drain-grace", drain_grace)):
        if not num >= 0:
            raise UserError(f"{opt} {num}: give a number >= 0")
    if proxy not in ("haproxy", "ray"):
        raise UserError(f"--proxy {proxy!r}: give 'haproxy' or 'ray'")
    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise UserError(f"--api-key-env {api_key_env}: the environment variable is not set or empty")
    reg = Registry(registry)
    cfg = ServeConfig(
        registry=str(reg.root), api_key=api_key, max_upload_bytes=int(max_upload_mb * 1e6), max_cells=max_cells,
        min_replicas=min_replicas, max_replicas=max_replicas, target_ongoing_requests=target_ongoing_requests,
        max_models_per_replica=max_models_per_replica, max_batch_size=max_batch_size,
        batch_wait_timeout_s=batch_wait_ms / 1000, replica_cpus=replica_cpus, replica_gpus=replica_gpus,
        ingress_replicas=ingress_replicas, max_ongoing_requests=max_ongoing_requests,
        max_queued_requests=max_queued_requests, request_timeout_s=request_timeout, max_queue_wait_s=max_queue_wait,
        rate_limit=rate_limit,
        rate_burst=rate_burst, max_json_cells=max_json_cells, default_model=default_model,
        drain_grace_s=drain_grace, docs=docs,
        llm=str(llm.resolve()) if llm else None, llm_name=llm_name, llm_cpus=llm_cpus, llm_gpus=llm_gpus,
        llm_kv_cache_gb=llm_kv_cache_gb, llm_embed_only=llm_embed_only,
    )
    if llm:
        from scdrugmap_ray.serve.llm import llm_configs

        llm_configs(cfg)  # a wrong directory or name is one line here, before any replica starts
    proxy_env: dict[str, str] = {}
    if proxy == "haproxy" and address is None and os.environ.get("RAY_ADDRESS", "local") in ("", "local"):
        from scdrugmap_ray.serve.proxy import use_haproxy

        proxy_env = use_haproxy()  # before Ray starts: its controller and proxies read it at start
    init_ray(address)
    run_app(cfg, host=host, port=port)
    _say(f"serving {len(reg.names())} model(s) from {reg.root} at http://{host}:{port}/ (API docs: /docs); "
         "Ctrl-C stops")
    if llm:
        _say(f"LLM {llm_name} (chat/completions) and {llm_name}-embed (embeddings) from {llm}: OpenAI base URL "
             f"http://{host}:{port}/v1")
    import signal
    import threading

    import ray
    from ray import serve

    # Ray installs its own SIGINT handling in the driver: stop on SIGINT/SIGTERM explicitly. Drain first (new
    # requests get 503, those in flight finish), then take Serve and the embedded Ray down with the server.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    _say(f"draining (up to {drain_grace:g} s for the requests in flight)")
    drained, left = drain(APP_NAME, drain_grace, ingress_replicas)
    _say("drained; stopping" if drained else f"grace period over with {left} request(s) in flight; stopping")
    serve.shutdown()
    ray.shutdown()
    if proxy_env:
        from scdrugmap_ray.serve.proxy import stop_haproxy

        stop_haproxy(proxy_env)  # Ray can leave its HAProxy running after the shutdown


def bench_predict(
    model: Annotated[str, typer.Option(help="Registry model NAME[@VERSION].")],
    data: Annotated[Path, typer.Option(help="A cell store (or .h5ad) to predict.")],
    registry: RegistryOpt = None,
    out: Annotated[Path | None, typer.Option(help="Output .parquet (default: a temporary file).")] = None,
    actors: Annotated[int | None, typer.Option(help="Predictor actors.")] = None,
) -> None:
    """Atlas-scale predict throughput: cells/s and peak RSS of the whole process tree (driver + Ray)."""
    import tempfile

    from scdrugmap_ray.engine.data.convert import ConvertOptions, ensure_store
    from scdrugmap_ray.engine.models.base import cache_root
    from scdrugmap_ray.engine.pipeline.bench import PeakRSS
    from scdrugmap_ray.engine.registry import Registry, predict_store
    from scdrugmap_ray.engine.runtime import init_ray

    version_dir = Registry(registry).resolve(model)
    store = ensure_store(data, ConvertOptions(), cache_root() / "stores")
    init_ray(None)
    with tempfile.TemporaryDirectory() as tmp, PeakRSS(interval=0.2) as rss:
        target = out or Path(tmp) / "predictions.parquet"
        stats = predict_store(version_dir, store, target, num_actors=actors)
    _say(f"predict model={model} cells={stats.n_cells} seconds={stats.seconds:.1f} cells_per_s={stats.cells_per_s:.0f} "
         f"peak_rss_driver_mb={rss.peak_driver / 2**20:.0f} peak_rss_total_mb={rss.peak / 2**20:.0f} "
         f"(total = driver + Ray processes, sampled every {rss.interval}s)")


def bench_serve(
    url: Annotated[str, typer.Option(help="The server, e.g. http://127.0.0.1:8000.")],
    model: Annotated[str, typer.Option(help="Model NAME[@VERSION] to call.")],
    data: Annotated[Path, typer.Option(help="An .h5ad whose cells make the requests.")],
    clients: Annotated[int, typer.Option(help="Concurrent clients (those beyond what the server holds are shed: "
                                         "503 + Retry-After, counted as shed, not as errors).")] = 8,
    requests: Annotated[int, typer.Option(help="Requests in all.")] = 200,
    cells_per_request: Annotated[int, typer.Option(help="Cells per request (JSON cells).")] = 16,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds in all.")] = 300.0,
    api_key_env: Annotated[str | None, typer.Option(help="Environment variable holding the API key.")] = None,
) -> None:
    """Load test of POST /v1/predict: N concurrent clients, a fixed number of requests; requests/s, p50/p99
    latency, requests shed (503/429), errors, and whether every cell of every answered request came back."""
    import os

    from scdrugmap_ray.serve.bench import load_test

    key = os.environ.get(api_key_env) if api_key_env else None
    res = load_test(url, model, data, clients=clients, n_requests=requests, cells_per_request=cells_per_request,
                    timeout_s=timeout, api_key=key, shed_ok=True)
    _say(res.line())
    if res.errors or res.missing:
        raise typer.Exit(1)


def register(app: Any, models_app: Any, bench_app: Any) -> None:
    """Add the commands to the main CLI (``models list`` is replaced by the one that also lists the registry)."""
    for info in list(models_app.registered_commands):
        if info.name == "list":
            models_app.registered_commands.remove(info)
    models_app.command("list")(models_list)
    models_app.command("register")(models_register)
    app.command("predict")(predict)
    app.command("serve")(serve_cmd)
    bench_app.command("predict")(bench_predict)
    bench_app.command("serve")(bench_serve)
