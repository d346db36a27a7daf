"""Atlas-scale prediction: every cell of a store through a registry model, streamed by Ray Data actors
(bounded memory, scales out), written by ``writers``."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from ..errors import UserError
from ..pipeline.embed import tokenize_rows
from ..progress import cells_progress, rate_text
from ..runtime import actor_plan, check_actor_device, init_ray, quiet_ray_data, user_errors
from .loaded import LoadedModel, column_map, gene_overlap, remap_with
from .writers import PredictStats, write_h5ad, write_parquet

log = logging.getLogger(__name__)


class _PredictActor:
    """Ray Data actor: one model copy; cells in (store rows or tokens) -> cell_id, p_sensitive[, features]."""

    def __init__(self, version_dir: str, store_symbols: list[str], device: str, dtype: str | None,
                 batch_tokens: int, want_features: bool, cpu_threads: int | None) -> None:
        import torch  # heavy: loaded in the actor process only

        if device == "cpu" and cpu_threads:
            torch.set_num_threads(cpu_threads)
        self.error: UserError | None = None
        self.want = want_features
        self.n_store_genes = len(store_symbols)
        try:
            check_actor_device(device)
            self.model = LoadedModel(version_dir, device, getattr(torch, dtype) if dtype else None, batch_tokens)
            self.col_map = column_map(store_symbols, self.model.vocabulary)  # once, not per batch
        except UserError as err:
            self.error = err

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        if self.error is not None:
            raise self.error
        m = self.model
        if "n_tokens" in batch:  # tokenized upstream by CPU tasks
            feats = m.embed_tokens(batch)
        else:
            gi, val = list(batch["gene_index"]), list(batch["value"])
            lengths = np.fromiter((len(g) for g in gi), dtype=np.int64, count=len(gi))
            indptr = np.concatenate([[0], np.cumsum(lengths)])
            csr = sp.csr_matrix(
                (np.concatenate(val).astype(np.float32) if val else np.zeros(0, np.float32),
                 np.concatenate(gi).astype(np.int64) if gi else np.zeros(0, np.int64), indptr),
                shape=(len(gi), self.n_store_genes),
            )
            feats = m.model.transform(remap_with(csr, self.col_map, len(m.vocabulary)))  # type: ignore[attr-defined]
        out: dict[str, Any] = {"cell_id": batch["cell_id"], "p_sensitive": m.head_proba(feats)}
        if self.want:
            out["features"] = feats.astype(np.float32)
        return out


def iter_predictions(version_dir: Path, store: Any, *, want_features: bool = False, num_actors: int | None = None,
                     device: str | None = None, batch_tokens: int | None = None, block_cells: int = 4096,
                     actor_resources: dict[str, float] | None = None,
                     ) -> Iterator[dict[str, np.ndarray]]:
    """Batches of {cell_id, p_sensitive[, features]} for every cell of a store, streamed by Ray Data. Actors
    are planned from the cluster's resources (GPUs found on workers, not on the driver)."""
    import ray  # heavy: only atlas-scale prediction starts Ray

    init_ray()
    quiet_ray_data()
    # a bad model or bad data fails here, in one line, before any task starts
    probe = LoadedModel(version_dir)
    if probe.is_obsm:
        raise UserError("models on precomputed obsm embeddings are not supported by predict yet")
    probe.model.check_store(store)
    store_symbols = store.genes["symbol"].astype(str).tolist()
    known, _ = gene_overlap(store_symbols, probe.vocabulary)
    if known == 0:
        raise UserError(f"none of the {len(store_symbols)} genes of {store.path} is in the model's vocabulary "
                        f"({len(probe.vocabulary)} genes, e.g. {', '.join(probe.vocabulary[:3])})")
    log.info("%d of the data's %d genes are in the model's gene list", known, len(store_symbols))
    if probe.is_foundation:
        plan = actor_plan(device, num_actors, actor_resources)
    else:  # a baseline: small CPU actors, as many as the cluster's CPUs allow, one thread each
        cpus = int(ray.cluster_resources().get("CPU", 1))
        plan = actor_plan(device or "cpu", num_actors or max(1, cpus - 1), actor_resources, foundation=False)
        plan = dataclasses.replace(plan, cpu_threads=1)
    dtype = "bfloat16" if plan.device == "cuda" else None
    ds = ray.data.read_parquet([str(p) for p in store.shard_paths], columns=["cell_id", "gene_index", "value"])
    if probe.is_foundation:
        ds = ds.map_batches(tokenize_rows, fn_args=(probe.model.make_tokenizer(store.genes),),  # type: ignore[attr-defined]
                            batch_size=1024, batch_format="numpy")
    del probe
    ds = ds.map_batches(
        _PredictActor,
        fn_constructor_args=(str(version_dir), store_symbols, plan.device, dtype, batch_tokens, want_features,
                             plan.cpu_threads),
        batch_size=block_cells if not want_features else min(block_cells, 1024), batch_format="numpy",
        **plan.map_kwargs(),
    )
    with user_errors():
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")


def predict_store(version_dir: Path, store: Any, out: Path, *, embeddings: bool = False,
                  source_h5ad: Path | None = None, num_actors: int | None = None, device: str | None = None,
                  actor_resources: dict[str, float] | None = None, block_cells: int = 4096,
                  progress: bool = False) -> PredictStats:
    """Predict every cell of ``store`` and write ``out``: Parquet (cell_id, p_sensitive, label[, embedding]) or
    .h5ad (a copy of ``source_h5ad`` with ``obs`` columns ``scdrugmap_p_sensitive`` / ``scdrugmap_label`` and,
    with ``embeddings``, ``obsm['X_scdrugmap']``). Memory is bounded by Ray Data blocks, except for one float
    per cell (and the cell-id index) when writing an .h5ad. ``progress``: a bar of cells predicted, with cells/s."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".parquet", ".h5ad"):
        raise UserError(f"--out {out}: the output must end in .parquet or .h5ad")
    if suffix == ".h5ad" and (source_h5ad is None or not Path(source_h5ad).is_file()):
        raise UserError(f"--out {out}: an .h5ad output is the input .h5ad with predictions added, but the source "
                        ".h5ad of this cell store is not available; write .parquet instead")
    t0 = time.perf_counter()
    batches = iter_predictions(Path(version_dir), store, want_features=embeddings, num_actors=num_actors,
                               device=device, actor_resources=actor_resources, block_cells=block_cells)
    batches = counted(batches, int(getattr(store, "n_cells", 0)) or None, t0, progress)
    if suffix == ".parquet":
        stats = write_parquet(batches, out, embeddings)
    else:
        assert source_h5ad is not None
        stats = write_h5ad(batches, Path(source_h5ad), out, embeddings)
    stats.seconds = time.perf_counter() - t0
    return stats


def counted(batches: Iterator[dict[str, np.ndarray]], total: int | None, t0: float,
            progress: bool) -> Iterator[dict[str, np.ndarray]]:
    """The batches, passed through a bar of cells done (cells/s) as they arrive."""
    done = 0
    with cells_progress(progress) as bar:
        task = bar.add_task("predict", total=total, rate="")
        for b in batches:
            done += len(b["cell_id"])
            bar.update(task, advance=len(b["cell_id"]), rate=rate_text(done, t0))
            yield b
