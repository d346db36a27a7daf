"""Multi-node for real: a Ray cluster of four nodes on 127.0.0.1 (`ray start` processes) whose head has no
accelerator and whose workers have one (a custom ``accelerator`` resource standing in for a GPU). The
model actors must land on the workers; a worker node killed mid-embed and mid-predict must cost no cell
(every cell exactly once in the output); a SIGKILLed embed resumes without recomputing written parts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from cluster import LocalCluster, local_cluster, ray_env

CLI = str(Path(sys.executable).parent / "scdrugmap-ray")
ACCEL = {"accelerator": 1.0}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with local_cluster(head_cpus=1, workers=[(2, ACCEL), (2, ACCEL), (2, ACCEL)]) as c:
        yield c


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1,200 simulated cells in 8 shards (raw counts, genes with Ensembl IDs Geneformer knows)."""
    from scdrugmap_ray.engine.data.convert import ConvertOptions, convert_h5ad
    from scdrugmap_ray.engine.data.simulate import simulate_h5ad

    root = tmp_path_factory.mktemp("mn")
    simulate_h5ad(root / "sim.h5ad", n_cells=1200, n_datasets=2, samples_per_dataset=2, effect=1.0, seed=0,
                  n_genes=400, progress=False)
    convert_h5ad(root / "sim.h5ad", root / "store", ConvertOptions(label_key="response", dataset_key="dataset",
                                                                  sample_key="sample", shard_cells=150),
                 progress=False)
    return root / "store"


def _env(cluster: LocalCluster, cache: Path) -> dict[str, str]:
    return {**ray_env(cluster.address), "SCDRUGMAP_RAY_CACHE": str(cache)}


def _wait_for(path_glob: tuple[Path, str], proc: subprocess.Popen, n: int = 1, timeout_s: float = 300,
              poll_s: float = 0.2) -> None:
    folder, pattern = path_glob
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if len(list(folder.glob(pattern))) >= n:
            return
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"finished before anything could be killed: rc={proc.returncode}\n{err[-3000:]}")
        time.sleep(poll_s)
    pytest.fail(f"no {pattern} in {folder} after {timeout_s} s")


def _finish(proc: subprocess.Popen, timeout_s: float = 600) -> str:
    out, err = proc.communicate(timeout=timeout_s)
    assert proc.returncode == 0, err[-4000:]
    return out


def _store_ids(store: Path) -> list[str]:
    shards = sorted(str(p) for p in store.glob("part-*.parquet"))
    return pq.read_table(shards, columns=["cell_id"]).column(0).to_pylist()


def test_actors_on_accelerator_workers_survive_a_killed_node(cluster: LocalCluster, store: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    env = _env(cluster, tmp_path / "cache")
    nodes = cluster.nodes_info()
    accel_nodes = {n["NodeID"] for n in nodes if n["Alive"] and n["Resources"].get("accelerator")}
    head = {n["NodeID"] for n in nodes if n["Alive"] and not n["Resources"].get("accelerator")}
    assert len(accel_nodes) == 3 and len(head) == 1

    # --- embed: kill a worker node once the first pieces are written
    out = tmp_path / "emb"
    proc = subprocess.Popen([CLI, "embed", str(store), "--model", "geneformer", "--preset", "tiny", "--out", str(out),
                             "--actor-resource", "accelerator=1", "--batch-tokens", "4096", "--quiet"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for((out / "_staging", "*.parquet"), proc)
    victim = cluster.nodes[2]
    cluster.kill(victim)
    text = _finish(proc)
    table = pq.read_table(out)
    ids = table.column("cell_id").to_pylist()
    assert len(ids) == len(set(ids)) == 1200 and set(ids) == set(_store_ids(store))
    assert table.column("row").to_pylist() == sorted(table.column("row").to_pylist())
    assert len(list(out.glob("part-*.parquet"))) == 8 and not (out / "_staging").exists()
    # every cell was embedded by an actor on an accelerator node, none on the head
    line = next(x for x in text.splitlines() if x.startswith("cells per node:"))
    workers_used = {kv.split("=")[0] for kv in line.split(":", 1)[1].split(",")}
    assert workers_used and all(any(n.startswith(w.strip()) for n in accel_nodes) for w in workers_used), line
    assert not any(any(h.startswith(w.strip()) for h in head) for w in workers_used), line

    # the same embeddings as one process computes directly (same tiny random weights)
    from scdrugmap_ray.engine.data.store import CellStore
    from scdrugmap_ray.engine.models.base import get_model
    from scdrugmap_ray.engine.pipeline.embed import EmbeddingSet, embed_block, tokenize_rows

    monkeypatch.setenv("SCDRUGMAP_RAY_CACHE", str(tmp_path / "cache"))
    cells = CellStore.open(store)
    fm = get_model("geneformer", {"preset": "tiny"})
    rows = np.array([0, 149, 150, 777, 1199])
    batch = pq.read_table([str(p) for p in cells.shard_paths],
                          columns=["cell_id", "row", "gene_index", "value"]).take(rows).to_pydict()
    tok = tokenize_rows({k: np.array(v, dtype=object) if k != "row" else np.array(v) for k, v in batch.items()},
                        fm.make_tokenizer(cells.genes)).to_pydict()
    block = {k: (np.array(v) if k in ("cell_id", "row", "n_tokens") else [np.array(x) for x in v])
             for k, v in tok.items()}
    direct = embed_block(fm, fm.load(), block, 4096)["embedding"]
    np.testing.assert_allclose(EmbeddingSet(out).take(rows), direct, atol=1e-5)

    # --- predict: another worker is killed mid-predict
    registry = _register_geneformer_model(tmp_path, cells)
    preds = tmp_path / "preds.parquet"
    proc = subprocess.Popen([CLI, "predict", str(store), "--model", "gf", "--registry", str(registry),
                             "--out", str(preds), "--actor-resource", "accelerator=1", "--batch-cells", "50"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # the writer has started: batches are flowing (on an idle machine the predictions of 1,200 cells take
    # well under a second once the actors are up, hence the fine polling)
    _wait_for((tmp_path, ".preds.parquet.tmp-*"), proc, poll_s=0.005)
    cluster.kill(cluster.nodes[1])
    _finish(proc)
    got = pd.read_parquet(preds)
    assert len(got) == got["cell_id"].nunique() == 1200 and set(got["cell_id"]) == set(_store_ids(store))
    assert got["p_sensitive"].between(0, 1).all()


def _register_geneformer_model(tmp_path: Path, cells: object) -> Path:
    """A registry model: tiny random Geneformer + a logistic-regression head fitted on random 64-d
    features (the head's numbers do not matter here; the model is loaded and run for real)."""
    from scdrugmap_ray.engine.models.base import get_model
    from scdrugmap_ray.engine.registry import Registry
    from scdrugmap_ray.engine.train.frozen import save_fold_model
    from scdrugmap_ray.engine.train.heads import make_head

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 64)).astype(np.float32), np.tile([0, 1], 20)
    head = make_head("logreg")
    head.fit(x[:30], y[:30], x[30:], y[30:], 0)
    fm = get_model("geneformer", {"preset": "tiny"})
    fold_dir = save_fold_model(tmp_path / "fold.model", fm, head, cells.genes, {})  # type: ignore[attr-defined]
    registry = tmp_path / "registry"
    Registry(registry).add("gf", fold_dir, "frozen", {"model": "geneformer", "model_options": fm.options})
    return registry


def test_killed_embed_resumes_without_recomputing(cluster: LocalCluster, store: Path, tmp_path: Path) -> None:
    cluster.wait_until_settled()  # the nodes killed above are known dead before new work is placed
    env = _env(cluster, tmp_path / "cache")
    out = tmp_path / "emb"
    args = [CLI, "embed", str(store), "--model", "geneformer", "--preset", "tiny", "--batch-tokens", "4096",
            "--quiet", "--out"]
    proc = subprocess.Popen([*args, str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    _wait_for((out, "part-*.parquet"), proc, n=1, poll_s=0.02)  # killed as soon as a first shard is whole
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    written = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert 1 <= len(written) < 8 and not (out / "_embedding.json").exists()

    text = _finish(subprocess.Popen([*args, str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True))
    assert f"({len(written)} shards were already written)" in text, text
    for name, mtime in written.items():  # parts already written were not computed again
        assert (out / name).stat().st_mtime_ns == mtime, name
    assert len(list(out.glob("part-*.parquet"))) == 8

    # equal to an uninterrupted run
    whole = tmp_path / "whole"
    _finish(subprocess.Popen([*args, str(whole)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    a, b = pq.read_table(out).to_pandas(), pq.read_table(whole).to_pandas()
    assert a["cell_id"].tolist() == b["cell_id"].tolist() and a["row"].tolist() == b["row"].tolist()
    np.testing.assert_allclose(np.stack(a["embedding"]), np.stack(b["embedding"]), atol=1e-6)
