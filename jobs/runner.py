"""Run a benchmark on Ray: prepare data, share embeddings, run every fold as a task, collect results.

The same code runs on an embedded local Ray (``scdrugmap-ray run``) and inside a Ray job on a cluster
(``scdrugmap-ray submit``): ``ray.init()`` connects to the cluster when the job runs there.

Each fold writes its result files atomically under ``units/<unit_id>/``, the result row last, so a
crash loses only the folds in flight and ``--resume`` skips every fold whose result row exists.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from scdrugmap_ray.engine.data.schema import METADATA_COLUMNS
from scdrugmap_ray.engine.data.splits import Fold
from scdrugmap_ray.engine.data.store import CellStore
from scdrugmap_ray.engine.errors import UserError
from scdrugmap_ray.engine.eval.metrics import METRICS, bootstrap_ci, breakdown, compute_metrics
from scdrugmap_ray.engine.fsutil import atomic_file, write_json
from scdrugmap_ray.engine.models.base import EmbeddingModel, get_model
from scdrugmap_ray.engine.pipeline.embed import EmbeddingSet
from scdrugmap_ray.engine.progress import progress_bar
from scdrugmap_ray.engine.runtime import init_ray
from scdrugmap_ray.engine.train.frozen import FoldOutcome, obs_columns, obs_rows, run_frozen_fold

from .planner import Unit, model_key, plan_units
from .spec import PROMPT_STRATEGIES, BenchmarkSpec
from .stores import ensure_embedding, labelled_obs, prepare_store

log = logging.getLogger(__name__)

RESULTS = "results.parquet"
BREAKDOWNS = "breakdowns.parquet"
MANIFEST = "manifest.json"


# --------------------------------------------------------------------------------------------- folds


def _fold_files(run_dir: Path, unit: Unit, fold: Fold) -> dict[str, Path]:
    base = run_dir / "units" / unit.unit_id / unit.fold_id(fold)
    return {k: base.with_name(f"{base.name}.{k}.parquet") for k in ("result", "breakdown", "predictions")}


def _fold_task(
    unit: Unit,
    fold: Fold,
    store_path: str,
    obs: pa.Table,
    emb_path: str | None,
    run_dir: str,
    n_boot: int,
    random_weights: bool,
) -> str:
    """Train and evaluate one frozen fold; write predictions, breakdowns, then the result row.

    ``obs`` is the cell metadata as an Arrow table put in the object store once (read zero-copy here);
    the embeddings are read for this fold's rows only."""
    store = CellStore.open(store_path)
    model = get_model(unit.model.name, unit.model.options)
    embedding = EmbeddingSet(emb_path) if emb_path else None
    # the fitted head (and a baseline's featurizer) is kept for `scdrugmap-ray models register`
    model_dir = Path(run_dir) / "units" / unit.unit_id / f"{unit.fold_id(fold)}.model"
    out = run_frozen_fold(
        model, store, obs, fold, unit.head, unit.model.head_options, unit.seed, embedding, save_dir=model_dir
    )
    return write_fold(unit, fold, obs, out, run_dir, n_boot, random_weights)


def write_fold(
    unit: Unit, fold: Fold, obs: pa.Table | pd.DataFrame, out: FoldOutcome, run_dir: str, n_boot: int,
    random_weights: bool,
    extra_row: dict[str, Any] | None = None, extra_preds: dict[str, Any] | None = None,
) -> str:
    """Metrics, bootstrap intervals and breakdowns of one fold's test predictions, written atomically
    (predictions, breakdowns, then the result row: a fold with a result row is finished)."""
    meta_cols = [c for c in METADATA_COLUMNS if c in obs_columns(obs)]
    preds = obs_rows(obs, out.test_rows, ["cell_id", *meta_cols])
    preds.insert(1, "fold", fold.fold)
    preds.insert(2, "y_true", out.y_true.astype(np.int8))
    preds.insert(3, "p_sensitive", out.p_sensitive.astype(np.float32))
    preds.insert(4, "y_pred", (out.p_sensitive >= 0.5).astype(np.int8))
    for i, (col, values) in enumerate((extra_preds or {}).items()):  # e.g. a prompted cell's answer
        preds.insert(5 + i, col, values)

    ident = {
        "unit_id": unit.unit_id,
        "data": unit.data,
        "model": unit.model.name,
        "model_key": model_key(unit.model),
        "head": unit.head,
        "strategy": unit.strategy,
        "scheme": unit.scheme,
        "split": unit.split,
        "fold": fold.fold,
        "fold_name": fold.name,
        "seed": unit.seed,
        "test_dataset": fold.test_dataset,
        "few_shot_k": fold.few_shot_k,
    }
    metrics = compute_metrics(out.y_true, out.p_sensitive)
    cis = bootstrap_ci(out.y_true, out.p_sensitive, n_boot=n_boot, seed=unit.seed) if n_boot else {}
    row: dict[str, Any] = {
        **ident,
        "n_train": len(fold.train),
        "n_val": len(fold.val),
        "n_test": len(fold.test),
        "n_test_sensitive": int(out.y_true.sum()),
        **metrics,
    }
    for m in METRICS:
        low, high = cis.get(m, (np.nan, np.nan))
        row[f"{m}_ci_low"], row[f"{m}_ci_high"] = low, high
    row.update(
        fit_seconds=out.fit_seconds,
        predict_seconds=out.predict_seconds,
        random_weights=random_weights,
        train_info=json.dumps(out.train_info, default=str),
    )
    row.update(extra_row or {})
    bd = breakdown(preds, by=[c for c in ("dataset", "cancer_type", "tissue", "therapy", "regimen") if c in preds])
    for k, v in reversed(list(ident.items())):
        if k not in ("data", "split", "fold_name"):
            bd.insert(0, k, v)

    files = _fold_files(Path(run_dir), unit, fold)
    files["result"].parent.mkdir(parents=True, exist_ok=True)
    for key, frame in (("predictions", preds), ("breakdown", bd), ("result", pd.DataFrame([row]))):
        with atomic_file(files[key]) as tmp:
            frame.to_parquet(tmp, index=False)
    return unit.unit_id


def lora_settings(spec: BenchmarkSpec, m: Any, head: str, seed: int) -> Any:
    """The LoRA settings of one model entry: the benchmark's ``lora:`` block, then the model's own;
    the head is scDrugMap's MLP (``mlp``) or a linear layer (``logreg``)."""
    from scdrugmap_ray.engine.train.lora import LoraSettings

    opts = {"hidden": 512 if head == "mlp" else 0, **spec.lora, **m.lora}
    return LoraSettings.from_options(opts, seed=seed)


def _run_lora_fold(
    unit: Unit, fold: Fold, store: CellStore, obs: pd.DataFrame, spec: BenchmarkSpec, run_dir: Path,
    random_weights: bool, progress: bool = False,
) -> None:
    """Fine-tune on the fold's training cells (validation picks the epoch), predict its test cells;
    ``progress``: a bar of the training steps (below the run's fold bar)."""
    import time

    from scdrugmap_ray.engine.train.lora import LabelledCells, finetune, predict_finetuned, remove_training_state

    fm = get_model(unit.model.name, unit.model.options)
    settings = lora_settings(spec, unit.model, unit.head, unit.seed)
    labels = obs["label"].to_numpy()
    out_dir = run_dir / "units" / unit.unit_id / f"{unit.fold_id(fold)}.lora"
    t0 = time.perf_counter()
    res = finetune(
        fm, store,  # type: ignore[arg-type]
        LabelledCells(fold.train, labels[fold.train]), LabelledCells(fold.val, labels[fold.val]),
        out_dir, settings, progress=progress,
    )
    t1 = time.perf_counter()
    p, _ = predict_finetuned(res.model_dir, store, rows=fold.test, batch_tokens=settings.batch_tokens)
    t2 = time.perf_counter()
    info = {k: v for k, v in res.metrics.items() if k != "history"}
    info.update(strategy="lora", model_dir=str(res.model_dir), r=settings.r, alpha=settings.alpha,
                workers=settings.workers, last_epoch=res.metrics["history"][-1] if res.metrics["history"] else {})
    outcome = FoldOutcome(
        test_rows=fold.test, y_true=labels[fold.test].astype(np.int64), p_sensitive=p, train_info=info,
        fit_seconds=t1 - t0, predict_seconds=t2 - t1,
    )
    write_fold(unit, fold, obs, outcome, str(run_dir), spec.evaluation.bootstrap, random_weights)
    remove_training_state(out_dir)  # the model stays; the resumable state is no longer needed


def _run_prompt_fold(
    unit: Unit, fold: Fold, store: CellStore, obs: pd.DataFrame, spec: BenchmarkSpec, run_dir: Path,
    backend: Any, random_weights: bool,
) -> None:
    """Prompt a chat model with each test cell (zero_shot, or few_shot with k training examples); an
    unparseable answer is an abstention, counted in the row (n_abstain, abstain_rate) and kept."""
    from scdrugmap_ray.engine.llm.predict import PromptSettings, predict_prompts

    settings = PromptSettings.from_options(dict(spec.prompting))
    res = predict_prompts(backend, store, obs, fold, unit.strategy, settings, unit.seed)
    answered = ~res.abstained
    extra: dict[str, Any] = {
        "n_prompted": len(res.test_rows),
        "n_abstain": int(res.abstained.sum()),
        "abstain_rate": float(res.abstained.mean()) if len(res.test_rows) else np.nan,
        "n_truncated": int((res.genes_dropped > 0).sum()),
        "few_shot_examples": res.n_examples,
        "llm_requests": res.usage.n_requests,
        "llm_cached": res.usage.n_cached,
        "llm_retries": res.usage.retries,
        "prompt_tokens": res.usage.prompt_tokens,
        "completion_tokens": res.usage.completion_tokens,
        "cost_usd": res.usage.cost_usd,
    }
    # metrics over the answered cells only, beside those over all (abstentions scored 0.5)
    sub = compute_metrics(res.y_true[answered], res.p_sensitive[answered]) if answered.any() else {}
    for m in ("f1", "accuracy", "auroc"):
        extra[f"{m}_answered"] = sub.get(m, np.nan)
    outcome = FoldOutcome(
        test_rows=res.test_rows, y_true=res.y_true, p_sensitive=res.p_sensitive,
        train_info={"strategy": unit.strategy, "backend": backend.identity, **settings.__dict__, **res.info},
        fit_seconds=0.0, predict_seconds=res.seconds,
    )
    preds = {"abstained": res.abstained, "abstain_reason": res.reasons, "answer": res.answers,
             "genes_dropped": res.genes_dropped}
    write_fold(unit, fold, obs, outcome, str(run_dir), spec.evaluation.bootstrap, random_weights, extra, preds)


# ---------------------------------------------------------------------------------------------- run


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("scdrugmap-ray", "ray", "torch", "numpy", "pandas", "scikit-learn", "anndata", "pyarrow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def run_benchmark(
    spec: BenchmarkSpec,
    *,
    out: str | None = None,
    resume: bool = False,
    address: str | None = None,
    progress: bool = True,
) -> Path:
    """Run every unit of the benchmark; return the run directory."""
    import ray

    run_dir = spec.output_dir(out)
    units_dir = run_dir / "units"
    if units_dir.exists() and any(units_dir.iterdir()) and not resume:
        raise UserError(
            f"{run_dir} already holds results of a run; pass --resume to continue it, or --out to start anew"
        )
    cache = spec.cache_dir()
    started = datetime.now(UTC).isoformat(timespec="seconds")

    # Everything that can be wrong with the input is found here, before any work is scheduled.
    stores: dict[str, CellStore] = {}
    obs_by_data: dict[str, pd.DataFrame] = {}
    for d in spec.data:
        store = prepare_store(d, cache, progress=progress)
        stores[d.display_name] = store
        obs_by_data[d.display_name] = labelled_obs(store, d.display_name)
    models = {model_key(m): get_model(m.name, m.options) for m in spec.models}
    for store in stores.values():
        for model in models.values():
            model.check_store(store)
    units = plan_units(spec, obs_by_data)
    todo = [(u, f) for u in units for f in u.folds if not _fold_files(run_dir, u, f)["result"].exists()]
    n_done = sum(len(u.folds) for u in units) - len(todo)
    log.info("%d units, %d folds to run (%d already finished)", len(units), len(todo), n_done)

    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "spec.json", spec.model_dump(mode="json"))
    init_ray(address)
    fold_remote = ray.remote(num_cpus=spec.resources.cpus_per_unit, num_gpus=spec.resources.gpus_per_unit)(
        _fold_task
    )

    # Each (data, embedding model) is embedded once; every frozen unit reuses it.
    emb_paths: dict[tuple[str, str], Path] = {}
    for data_name, store in stores.items():
        for m in spec.models:
            model = models[model_key(m)]
            needed = any(u.data == data_name and u.model == m and u.strategy == "frozen" for u, _ in todo)
            if isinstance(model, EmbeddingModel) and needed:
                log.info("embedding %s with %s", data_name, m.name)
                path = ensure_embedding(model, store, cache, progress=progress)
                if path is not None:
                    emb_paths[(data_name, model_key(m))] = path

    lora_todo = [(u, f) for u, f in todo if u.strategy == "lora"]
    prompt_todo = [(u, f) for u, f in todo if u.strategy in PROMPT_STRATEGIES]
    todo = [(u, f) for u, f in todo if u.strategy not in ("lora", *PROMPT_STRATEGIES)]
    # the cell metadata goes to the object store once per data entry, as Arrow (read zero-copy by the tasks)
    obs_refs = {name: ray.put(pa.Table.from_pandas(obs, preserve_index=False)) for name, obs in obs_by_data.items()}
    with progress_bar(progress, rate=False) as bar:
        task = bar.add_task("folds", total=len(todo) + len(lora_todo) + len(prompt_todo))
        # LoRA folds train with Ray Train from the driver, one after another: each needs the workers'
        # resources for itself, so it must not run inside a task that already holds some.
        for unit, fold in lora_todo:
            store = stores[unit.data]
            _run_lora_fold(unit, fold, store, obs_by_data[unit.data], spec, run_dir,
                           models[model_key(unit.model)].random_weights, progress=progress)
            bar.advance(task)
        # Prompted folds run from the driver too: one chat backend per model (a vLLM engine in its own Ray
        # actor, or an HTTP client with its own concurrency), shared by that model's folds.
        from scdrugmap_ray.engine.llm.predict import chat_backend_of

        for key in dict.fromkeys(model_key(u.model) for u, _ in prompt_todo):
            backend = chat_backend_of(models[key], cache / "llm-responses")
            try:
                for unit, fold in (x for x in prompt_todo if model_key(x[0].model) == key):
                    _run_prompt_fold(unit, fold, stores[unit.data], obs_by_data[unit.data], spec, run_dir,
                                     backend, models[key].random_weights)
                    bar.advance(task)
            finally:
                backend.close()
        refs = []
        for unit, fold in todo:
            emb = emb_paths.get((unit.data, model_key(unit.model)))
            refs.append(
                fold_remote.remote(
                    dataclasses.replace(unit, folds=[]),  # this fold's rows only, not every fold's
                    fold,
                    str(stores[unit.data].path),
                    obs_refs[unit.data],
                    str(emb) if emb else None,
                    str(run_dir),
                    spec.evaluation.bootstrap,
                    models[model_key(unit.model)].random_weights,
                )
            )
        remaining = refs
        while remaining:
            done, remaining = ray.wait(remaining, num_returns=1)
            ray.get(done)  # re-raises a task's error here
            bar.advance(task)

    collect_results(run_dir, units)
    manifest = {
        "name": spec.name,
        "spec": spec.model_dump(mode="json"),
        "versions": _versions(),
        "data": [
            {"name": n, "path": str(s.path), "content_hash": s.content_hash, "n_cells": s.n_cells}
            for n, s in stores.items()
        ],
        "models": [
            {"name": m.name, "key": k, "identity": models[k].identity(), "random_weights": models[k].random_weights}
            for k, m in ((model_key(m), m) for m in spec.models)
        ],
        "started": started,
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "units": [{"unit_id": u.unit_id, "n_folds": len(u.folds), "status": "finished"} for u in units],
        "ray": {"address": address or os.environ.get("RAY_ADDRESS") or "local"},
    }
    write_json(run_dir / MANIFEST, manifest)

    from .report import build_report  # matplotlib: loaded when a run has finished, not at import

    build_report(run_dir)
    if spec.explain is not None:
        from .explain import explain_from_spec  # scipy.stats, captum: only runs with an explain: block

        explain_from_spec(spec, run_dir)
    return run_dir


def collect_results(run_dir: Path, units: list[Unit]) -> None:
    """Gather the per-fold files into results.parquet, breakdowns.parquet and predictions/<unit>.parquet."""
    results, breakdowns = [], []
    (run_dir / "predictions").mkdir(exist_ok=True)
    for unit in units:
        preds = []
        for fold in unit.folds:
            files = _fold_files(run_dir, unit, fold)
            results.append(pd.read_parquet(files["result"]))
            breakdowns.append(pd.read_parquet(files["breakdown"]))
            preds.append(pd.read_parquet(files["predictions"]))
        with atomic_file(run_dir / "predictions" / f"{unit.unit_id}.parquet") as tmp:
            pd.concat(preds, ignore_index=True).to_parquet(tmp, index=False)
    for name, frames in ((RESULTS, results), (BREAKDOWNS, breakdowns)):
        with atomic_file(run_dir / name) as tmp:
            pd.concat(frames, ignore_index=True).to_parquet(tmp, index=False)

