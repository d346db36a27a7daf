"""The Ray Data embedding engine: same embeddings as a direct call, order restored, token budgets,
and foundation models (random-weight presets) in a `frozen` benchmark run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scdrugmap_ray.engine.data.convert import ConvertOptions, convert_h5ad
from scdrugmap_ray.engine.data.store import CellStore
from scdrugmap_ray.engine.models.base import get_model
from scdrugmap_ray.engine.pipeline.embed import embed_store, token_budget_batches
from scdrugmap_ray.jobs.runner import run_benchmark
from scdrugmap_ray.jobs.spec import parse_spec


def test_token_budget_batches_cover_every_cell_once() -> None:
    lengths = np.array([5, 300, 7, 120, 2048, 64, 64, 1, 900])
    batches = list(token_budget_batches(lengths, batch_tokens=1024))
    seen = np.concatenate(batches)
    assert sorted(seen.tolist()) == list(range(len(lengths)))
    for b in batches:  # within budget, except a single cell longer than the budget
        assert len(b) == 1 or len(b) * lengths[b].max() <= 1024
    # length-sorted: padding inside a batch is small
    assert all(lengths[b].max() - lengths[b].min() <= 900 for b in batches)


@pytest.fixture(scope="module")
def real_store(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> CellStore:
    """300 real GSE149383 cells (raw Drop-seq counts) as a store with two shards."""
    import anndata as ad

    src = ad.read_h5ad(shared_dir / "data" / "gse149383_PC9_erlotinib_day11_rawcounts.h5ad")
    root = tmp_path_factory.mktemp("real")
    src[:300].copy().write_h5ad(root / "pc9.h5ad")
    opts = ConvertOptions(label_key="scdeal_label", dataset="PC9", shard_cells=170)
    convert_h5ad(root / "pc9.h5ad", root / "store", opts, progress=False)
    return CellStore.open(root / "store")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["geneformer", "tgpt", "scgpt", "scfoundation"])
def test_engine_matches_direct_embedding(
    name: str, real_store: CellStore, ray_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SCDRUGMAP_RAY_CACHE", str(tmp_path))
    model = get_model(name, {"preset": "tiny"})
    engine = embed_store(model, real_store, batch_tokens=4096, block_cells=64)
    assert engine.shape[0] == real_store.n_cells and engine.dtype == np.float32

    # the same cells, tokenized and embedded directly one at a time, in store order
    import torch

    tok = model.make_tokenizer(real_store.genes)
    module = model.load()
    batch = next(real_store.iter_batches(batch_size=20, columns=["cell_id", "gene_index", "value"]))
    ids = np.asarray(batch.column("cell_id").to_pylist(), dtype=object)
    gi = [batch.column("gene_index")[i].values.to_numpy() for i in range(batch.num_rows)]
    vals = [batch.column("value")[i].values.to_numpy() for i in range(batch.num_rows)]
    with torch.inference_mode():
        direct = np.concatenate([
            model.embed(module, model.collate(tok(ids[i : i + 1], gi[i : i + 1], vals[i : i + 1]))).float().numpy()
            for i in range(len(ids))
        ])
    np.testing.assert_allclose(engine[: len(ids)], direct, atol=1e-4)


@pytest.mark.slow
def test_foundation_models_in_a_frozen_benchmark(tmp_path: Path, ray_session: None,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCDRUGMAP_RAY_CACHE", str(tmp_path / "cache"))
    spec = parse_spec({
        "name": "fm",
        "data": [{"name": "sim", "simulate": {"cells": 400, "datasets": 2, "genes": 1500, "seed": 2}}],
        "models": [{"name": n, "options": {"preset": "tiny"}} for n in ("geneformer", "tgpt", "scgpt", "scfoundation")],
        "evaluation": {"pooled": {"folds": 2, "split": "sample"}, "bootstrap": 20},
        "output": str(tmp_path / "run"),
        "cache": str(tmp_path / "cache"),
    })
    run_dir = run_benchmark(spec, progress=False)
    res = pd.read_parquet(run_dir / "results.parquet")
    assert set(res["model"]) == {"geneformer", "tgpt", "scgpt", "scfoundation"}
    assert res["random_weights"].all()
    # one embedding folder per model, each finished and read by the fold tasks
    assert len(list((tmp_path / "cache" / "embeddings").glob("*/_embedding.json"))) == 4
    assert "RANDOM WEIGHTS" in (run_dir / "report.html").read_text().upper()


@pytest.mark.slow
def test_bench_embed_engine_and_naive_agree(
    real_store: CellStore, ray_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scdrugmap_ray.engine.pipeline.bench import bench_embed

    monkeypatch.setenv("SCDRUGMAP_RAY_CACHE", str(tmp_path))
    res = bench_embed(get_model("geneformer", {"preset": "tiny"}), real_store, 24, batch_tokens=4096)
    assert res["max_abs_diff"] < 1e-4
    engine, naive = res["engine"], res["naive"]
    assert engine["cells"] == naive["cells"] == 24
    # the engine pads to the longest cell of length-sorted batches, the naive loop to the model maximum
    assert engine["tokens"] == naive["tokens"] and engine["padded_tokens"] < naive["padded_tokens"]
    assert "speedup_vs_naive" in res and "cells_per_s=" in engine["line"] and "ray_start_s=" in engine["line"]
    # the same batching without Ray (its blocks may split at other cells than Ray Data's)
    local = res["in_process"]
    assert local["tokens"] == engine["tokens"] and local["padded_tokens"] < naive["padded_tokens"]
    assert res["speedup_in_process_vs_naive"] > 0
