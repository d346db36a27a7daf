"""Streaming embedding of a cell store with Ray Data.

    read_parquet(shards) -> [select rows] -> map_batches(tokenize)      CPU tasks
                         -> map_batches(EmbedActor, pool)               one model copy per GPU / node
                         -> parts written by the actors                 (embed_to_dir: atlases)
                         or row + embedding back to the caller          (embed_store: small selections)

Inside each actor, a block of tokenized cells is sorted by length and cut into token-budget batches
(cells x longest cell <= budget), so padding stays small: for rank-value tokenizers padding to the
model's maximum is most of the compute.

``embed_to_dir`` is the atlas path: the actors write their embeddings to storage every node reaches
(``engine.storage``), the driver sees only a few numbers per block, so its memory does not grow with
the number of cells. Output: one ``part-NNNNN.parquet`` per input shard (``cell_id``, ``row``,
``embedding`` as fixed-size list<float32>), written from staged pieces once a shard is whole; a killed
run resumes and skips the shards already written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..defaults import batch_tokens_for
from ..errors import UserError
from ..models.base import get_model
from ..models.lora_adapter import load_finetuned
from ..progress import cells_progress, rate_text
from ..runtime import ActorPlan, actor_plan, check_actor_device, init_ray, quiet_ray_data, user_errors
from ..storage import Location, location

if TYPE_CHECKING:
    from ..data.store import CellStore
    from ..models.base import CellTokenizer, FoundationModel

log = logging.getLogger(__name__)

STAGING = "_staging"
DONE = "_embedding.json"  # written last: the folder holds every wanted cell
JOB = "_job.json"  # written first: which model, store and rows the parts belong to
ROW_GROUP = 4096


def token_budget_batches(lengths: np.ndarray, batch_tokens: int, max_cells: int = 512) -> Iterator[np.ndarray]:
    """Indices of cells grouped so that n_cells * longest <= batch_tokens, shortest cells first."""
    order = np.argsort(lengths, kind="stable")
    ordered = np.asarray(lengths, dtype=np.int64)[order]
    start, n = 0, len(order)
    while start < n:
        # lengths ascend along `order`, so a batch [start, start + k) costs k * ordered[start + k - 1]
        window = ordered[start : start + max_cells]
        fits = np.arange(1, len(window) + 1) * window <= batch_tokens
        k = max(1, int(np.argmin(fits)) if not fits.all() else len(window))
        yield order[start : start + k]
        start += k


class SharedArray:
    """A numpy array put in the object store once; every task that needs it fetches it once per worker
    process (instead of pickling it into each task)."""

    _cache: dict[str, np.ndarray] = {}  # noqa: RUF012 - per-process cache, shared on purpose

    def __init__(self, array: np.ndarray) -> None:
        import ray

        self.ref = ray.put(np.ascontiguousarray(array))

    def get(self) -> np.ndarray:
        import ray

        key = self.ref.hex()
        arr = SharedArray._cache.get(key)
        if arr is None:
            if len(SharedArray._cache) > 8:
                SharedArray._cache.clear()
            arr = SharedArray._cache[key] = ray.get(self.ref)
        return arr


def member_mask(values: np.ndarray, sorted_set: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mask of ``values`` found in ``sorted_set``, their positions there): vectorised, no Python set."""
    pos = np.searchsorted(sorted_set, values)
    pos_clipped = np.minimum(pos, max(len(sorted_set) - 1, 0))
    mask = (pos < len(sorted_set)) & (sorted_set[pos_clipped] == values) if len(sorted_set) else np.zeros(
        len(values), dtype=bool)
    return mask, pos_clipped


def keep_rows(batch: dict[str, np.ndarray], rows: SharedArray) -> dict[str, np.ndarray]:
    """The cells of ``batch`` whose store row is in ``rows`` (sorted int64)."""
    mask, _ = member_mask(batch["row"], rows.get())
    return {k: v[mask] for k, v in batch.items()}


def tokenize_rows(batch: dict[str, np.ndarray], tokenizer: CellTokenizer) -> pa.Table:
    """Tokenize a batch of store rows into an Arrow table of list columns (what the model sees)."""
    rows = tokenizer(batch["cell_id"], list(batch["gene_index"]), list(batch["value"]))
    columns: dict[str, Any] = {"cell_id": pa.array(batch["cell_id"], type=pa.string())}
    if "row" in batch:
        columns["row"] = pa.array(np.asarray(batch["row"], dtype=np.int64))
    for key, cells in rows.items():
        columns[key] = _list_array(cells)
    columns["n_tokens"] = pa.array(np.fromiter((len(x) for x in rows["input_ids"]), dtype=np.int32,
                                               count=len(rows["input_ids"])))
    return pa.table(columns)


def _list_array(cells: list[np.ndarray]) -> pa.Array:
    lengths = np.fromiter((len(c) for c in cells), dtype=np.int32, count=len(cells))
    offsets = np.zeros(len(cells) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate(cells) if cells else np.zeros(0, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))


def embedding_table(cell_ids: Any, rows: np.ndarray, emb: np.ndarray) -> pa.Table:
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    return pa.table({
        "cell_id": pa.array(np.asarray(cell_ids).astype(str), type=pa.string()),
        "row": pa.array(np.asarray(rows, dtype=np.int64)),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), type=pa.float32()), emb.shape[1]),
    })


def _embeddings_of(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    width = arr.type.list_size
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), width).astype(np.float32, copy=False)


class EmbedActor:
    """Holds one model copy; embeds blocks of tokenized cells in token-budget batches. With ``out`` it
    writes each block's embeddings as staged pieces there and returns only counts (the driver never
    holds embeddings); without, it returns row + embedding."""

    def __init__(self, model_name: str, options: dict[str, Any], device: str, dtype: str | None,
                 batch_tokens: int | None, finetuned: str | None = None, cpu_threads: int | None = None,
                 out: str | None = None, shard_offsets: np.ndarray | None = None) -> None:
        import torch

        if device == "cpu" and cpu_threads:
            # Ray gives an actor one OpenMP thread (its num_cpus); on CPU the model should use the
            # cores the pool is meant to have.
            torch.set_num_threads(cpu_threads)
        self.model = get_model(model_name, options)
        self.device = device
        self.dtype = getattr(torch, dtype) if dtype else None
        self.batch_tokens = batch_tokens_for(device, batch_tokens)
        self.out = location(out).child(STAGING) if out else None
        self.shard_offsets = shard_offsets
        import ray

        self.node = ray.get_runtime_context().get_node_id()
        # A bad checkpoint must reach the user as its one-line UserError, not as a dead actor: keep it
        # and raise it from the first task, whose error Ray Data hands back to the driver.
        self.error: UserError | None = None
        try:
            check_actor_device(device)
            if finetuned:  # a LoRA fine-tuned model: the backbone with its adapter merged in
                self.model, self.module, _ = load_finetuned(Path(finetuned), device, self.dtype)  # type: ignore[assignment]
            else:
                self.module = self.model.load(device=device, dtype=self.dtype)  # type: ignore[attr-defined]
        except UserError as err:
            self.error = err

    def __call__(self, block: dict[str, np.ndarray]) -> dict[str, Any]:
        if self.error is not None:
            raise self.error
        result = embed_block(self.model, self.module, block, self.batch_tokens, self.device)  # type: ignore[arg-type]
        if self.out is None:
            return result
        assert self.shard_offsets is not None
        pieces = write_pieces(self.out, result, self.shard_offsets)
        pieces["node"] = np.full(len(pieces["shard"]), self.node, dtype=object)  # who did the work
        return pieces


def write_pieces(staging: Location, result: dict[str, Any], shard_offsets: np.ndarray) -> dict[str, np.ndarray]:
    """Write one embedded block as staged pieces, one per input shard it touches, named by (shard, first
    row): a retried block rewrites the same names, never adds rows twice. Returns per piece: shard, cells,
    tokens, padded tokens."""
    rows = np.asarray(result["row"], dtype=np.int64)
    shard = np.searchsorted(shard_offsets, rows, side="right") - 1
    out: dict[str, list[int]] = {"shard": [], "n_cells": [], "tokens": [], "padded_tokens": []}
    for s in np.unique(shard):
        sel = np.flatnonzero(shard == s)
        table = embedding_table(result["cell_id"][sel], rows[sel], result["embedding"][sel])
        staging.child(f"s{int(s):05d}-r{int(rows[sel].min()):012d}.parquet").write_table(table)
        out["shard"].append(int(s))
        out["n_cells"].append(len(sel))
        out["tokens"].append(int(np.asarray(result["n_tokens"])[sel].sum()))
        out["padded_tokens"].append(int(np.asarray(result["padded_tokens"])[sel].sum()))
    return {k: np.asarray(v, dtype=np.int64) for k, v in out.items()}


def embed_block(model: FoundationModel, module: Any, block: dict[str, np.ndarray], batch_tokens: int,
                device: str = "cpu") -> dict[str, Any]:
    import torch

    lengths = np.asarray(block["n_tokens"])
    ragged = [k for k in block if k not in ("cell_id", "row", "n_tokens")]
    result: np.ndarray | None = None
    padded = np.zeros(len(lengths), dtype=np.int64)  # the padded length of each cell's batch row
    with torch.inference_mode():
        for idx in token_budget_batches(lengths, batch_tokens):
            rows = {k: [block[k][i] for i in idx] for k in ragged}
            batch = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in model.collate(rows).items()}
            emb = model.embed(module, batch).float().cpu().numpy()
            if result is None:
                result = np.empty((len(lengths), emb.shape[1]), dtype=np.float32)
            result[idx] = emb
            padded[idx] = lengths[idx].max()
    assert result is not None
    out = {"cell_id": block["cell_id"], "embedding": result, "n_tokens": lengths, "padded_tokens": padded}
    if "row" in block:
        out["row"] = block["row"]
    return out


IN_PROCESS_BLOCK_CELLS = 1024  # the Ray Data path's block size, so both paths cut the same batches


def embed_in_process(model: FoundationModel, cell_ids: np.ndarray, csr: Any, genes: Any, *,
                     batch_tokens: int | None = None, device: str = "cpu", dtype: Any = None,
                     module: Any = None, progress: bool = False, stats: dict[str, int] | None = None) -> np.ndarray:
    """float32 [n_cells, d] in this process, no Ray: the model's tokenizer, then ``embed_block`` (what each
    Ray Data actor runs) over blocks of 1,024 cells in data order. For data that fits one machine's memory
    and wants no Ray start-up (seconds that dominate a few hundred cells); ``csr`` is cells x ``genes`` (a
    genes table as ``CellStore.genes``); ``stats`` (a dict) gets the tokens and padded tokens added to it.
    ``batch_tokens`` None: the device's default (``defaults.batch_tokens_for``)."""
    budget = batch_tokens_for(device, batch_tokens)
    tokenizer = model.make_tokenizer(genes)
    log.info("%s: vocabulary covers %.1f%% of the data's genes", model.name, 100 * tokenizer.coverage)
    if module is None:
        module = model.load(device=device, dtype=dtype)  # type: ignore[attr-defined]
    n = csr.shape[0]
    out: np.ndarray | None = None
    t0 = time.perf_counter()
    with cells_progress(progress) as bar:
        task = bar.add_task(f"embed {model.name}", total=n, rate="")
        for start in range(0, n, IN_PROCESS_BLOCK_CELLS):
            stop = min(start + IN_PROCESS_BLOCK_CELLS, n)
            spans = zip(csr.indptr[start:stop], csr.indptr[start + 1 : stop + 1], strict=True)
            gene_index, values = zip(*((csr.indices[a:b].astype(np.int32), csr.data[a:b].astype(np.float32))
                                       for a, b in spans), strict=True)
            tokens = tokenizer(cell_ids[start:stop], list(gene_index), list(values))
            block: dict[str, Any] = {k: list(v) for k, v in tokens.items()}
            block["n_tokens"] = np.fromiter((len(t) for t in tokens["input_ids"]), dtype=np.int64,
                                            count=len(tokens["input_ids"]))
            block["cell_id"] = cell_ids[start:stop]
            done = embed_block(model, module, block, budget, device)
            emb = done["embedding"]
            if stats is not None:
                stats["tokens"] = stats.get("tokens", 0) + int(done["n_tokens"].sum())
                stats["padded_tokens"] = stats.get("padded_tokens", 0) + int(done["padded_tokens"].sum())
            if out is None:
                out = np.empty((n, emb.shape[1]), dtype=np.float32)
            out[start:stop] = emb
            bar.update(task, advance=stop - start, rate=rate_text(stop, t0))
    if out is None:
        raise UserError("no cells to embed")
    return out


# ------------------------------------------------------------------------------------------ pipeline


@dataclass
class EmbedRun:
    """What ``embed_to_dir`` did: cells embedded now, shards skipped as already written, tokens, time."""

    out: str
    n_cells: int
    dim: int
    n_shards: int
    shards_embedded: int
    shards_skipped: int
    cells_embedded: int
    tokens: int
    padded_tokens: int
    seconds: float
    device: str
    max_actors: int
    cells_per_node: dict[str, int]  # Ray node id -> cells its actors embedded in this run

    @property
    def cells_per_s(self) -> float:
        return self.cells_embedded / self.seconds if self.seconds else 0.0


def _prepare(model: FoundationModel, store: CellStore) -> CellTokenizer:
    init_ray()
    quiet_ray_data()
    model.check_store(store)
    tokenizer = model.make_tokenizer(store.genes)
    log.info("%s: vocabulary covers %.1f%% of the store's genes", model.name, 100 * tokenizer.coverage)
    return tokenizer


def _pipeline(model: FoundationModel, store: CellStore, tokenizer: CellTokenizer, shards: Sequence[int],
              rows: np.ndarray | None, plan: ActorPlan, dtype: str | None, batch_tokens: int | None, block_cells: int,
              finetuned: str | None, out: str | None) -> Any:
    import ray

    paths = [str(store.shard_paths[s]) for s in shards]
    ds = ray.data.read_parquet(paths, columns=["cell_id", "row", "gene_index", "value"])
    if rows is not None:
        ds = ds.map_batches(keep_rows, fn_args=(SharedArray(rows),), batch_format="numpy")
    ds = ds.map_batches(tokenize_rows, fn_args=(tokenizer,), batch_size=block_cells, batch_format="numpy")
    return ds.map_batches(
        EmbedActor,
        fn_constructor_args=(model.name, model.options, plan.device, dtype, batch_tokens, finetuned,
                             plan.cpu_threads, out, store.shard_offsets),
        batch_size=block_cells,
        batch_format="numpy",
        **plan.map_kwargs(),
    )


def _dtype_for(device: str, dtype: str | None) -> str | None:
    return dtype or ("bfloat16" if device == "cuda" else None)


def embed_store(
    model: FoundationModel,
    store: CellStore,
    *,
    batch_tokens: int | None = None,
    num_actors: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    block_cells: int = 1024,
    rows: np.ndarray | None = None,
    cell_ids: Sequence[str] | None = None,
    return_stats: bool = False,
    finetuned: str | None = None,
    actor_resources: dict[str, float] | None = None,
) -> Any:
    """float32 [n, d] embeddings, returned to the caller: every cell in store order, the store ``rows``
    given (in that order), or the ``cell_ids`` given (in that order). For selections that fit in memory
    (a fold's test cells, benchmarks); atlases go through ``embed_to_dir``. ``return_stats`` also returns
    token counts; ``finetuned`` (a LoRA model directory) embeds with the fine-tuned backbone."""
    tokenizer = _prepare(model, store)
    if cell_ids is not None:
        rows = store.rows_of(cell_ids)
    wanted = None if rows is None else np.asarray(rows, dtype=np.int64)
    srt = None if wanted is None else np.unique(wanted)
    shards = store.shards_of(srt)
    plan = actor_plan(device, num_actors, actor_resources)
    n = store.n_cells if srt is None else len(srt)
    out: np.ndarray | None = None
    stats = {"tokens": 0, "padded_tokens": 0}
    ds = _pipeline(model, store, tokenizer, shards, srt, plan, _dtype_for(plan.device, dtype), batch_tokens,
                   block_cells, finetuned, None)
    with user_errors():  # filled as batches stream in: memory holds the output, not a second copy of it
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            emb = np.stack(batch["embedding"]) if batch["embedding"].dtype == object else batch["embedding"]
            if out is None:
                out = np.empty((n, emb.shape[1]), dtype=np.float32)
            at = batch["row"] if srt is None else np.searchsorted(srt, batch["row"])
            out[at] = emb
            stats["tokens"] += int(batch["n_tokens"].sum())
            stats["padded_tokens"] += int(batch["padded_tokens"].sum())
    if out is None:
        raise UserError(f"{store.path}: no cells to embed")
    if wanted is not None and srt is not None and not np.array_equal(srt, wanted):
        out = out[np.searchsorted(srt, wanted)]
    return (out, stats) if return_stats else out


def _job_identity(model: FoundationModel, store: CellStore, rows: np.ndarray | None, finetuned: str | None) -> dict:
    rows_digest = None if rows is None else hashlib.sha256(np.ascontiguousarray(rows).tobytes()).hexdigest()[:16]
    return {"model": model.identity(), "store": store.content_hash, "rows": rows_digest, "finetuned": finetuned}


def embed_to_dir(
    model: FoundationModel,
    store: CellStore,
    out: str | Path,
    *,
    rows: np.ndarray | None = None,
    batch_tokens: int | None = None,
    num_actors: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    block_cells: int = 1024,
    finetuned: str | None = None,
    actor_resources: dict[str, float] | None = None,
    progress: bool = False,
) -> EmbedRun:
    """Embed the store's cells (or the store ``rows`` given) into the folder ``out`` (a local path, a shared
    mount or a URI), streaming: the model actors write the embeddings; the driver keeps a few integers per
    block. Re-running with the same ``out`` resumes: shards already written are skipped, half-written
    ones are embedded again."""
    t0 = time.perf_counter()
    tokenizer = _prepare(model, store)
    dest = location(out)
    srt = None if rows is None else np.unique(np.asarray(rows, dtype=np.int64))
    ident = _job_identity(model, store, srt, finetuned)
    job = dest.child(JOB)
    created = not job.exists()
    if not created:
        if json.loads(job.read_text()) != json.loads(json.dumps(ident, default=str)):
            raise UserError(f"{dest.uri} holds embeddings of another model, store or cell selection; "
                            "choose another --out (or delete it)")
    else:
        if dest.exists() and dest.files():
            raise UserError(f"{dest.uri} exists and is not an embedding folder; choose another --out")
        dest.mkdir()
        job.write_text(json.dumps(ident, default=str, sort_keys=True))
    try:
        return _embed_shards(model, store, tokenizer, dest, srt, ident, t0, batch_tokens=batch_tokens,
                             num_actors=num_actors, device=device, dtype=dtype, block_cells=block_cells,
                             finetuned=finetuned, actor_resources=actor_resources, progress=progress)
    except BaseException:
        # a run that wrote nothing leaves nothing behind; one that wrote parts stays, to be resumed
        staged = dest.child(STAGING)
        if created and not any(f.base_name.startswith("part-") for f in dest.files(".parquet")) and not (
                staged.exists() and staged.files()):
            dest.delete()
        raise


def _embed_shards(model: FoundationModel, store: CellStore, tokenizer: CellTokenizer, dest: Location,
                  srt: np.ndarray | None, ident: dict[str, Any], t0: float, *, batch_tokens: int | None,
                  num_actors: int | None, device: str | None, dtype: str | None, block_cells: int,
                  finetuned: str | None, actor_resources: dict[str, float] | None, progress: bool) -> EmbedRun:
    import ray

    expected = store.cells_per_shard(srt)
    plan = actor_plan(device, num_actors, actor_resources)
    written = {int(f.base_name[5:10]) for f in dest.files(".parquet") if f.base_name.startswith("part-")}
    staging = dest.child(STAGING)
    pieces = staging.files(".parquet")
    counted = _staged_counts(staging, pieces)
    todo, compact_now = [], []
    for s, want in enumerate(expected):
        if want == 0 or s in written:
            continue
        if counted.get(s, 0) == want:
            compact_now.append(s)  # killed between its last piece and the compaction
        else:
            for f in pieces:  # half-written: its pieces go, the shard runs again
                if f.base_name.startswith(f"s{s:05d}-"):
                    staging.fs.delete_file(f.path)
            todo.append(s)
    skipped = sum(1 for s, want in enumerate(expected) if want and s in written)
    if skipped:
        log.info("%s: %d of %d shards already embedded; resuming with %d", dest.uri, skipped,
                 int((expected > 0).sum()), len(todo))
    compact = ray.remote(num_cpus=0.25)(_compact_shard)
    compactions = [compact.remote(dest.uri, s, int(expected[s])) for s in compact_now]
    done: dict[int, int] = {}
    per_node: dict[str, int] = {}
    tokens = padded = cells_now = 0
    total_todo = int(sum(expected[s] for s in todo))
    bar = cells_progress(progress)
    if todo:
        ds = _pipeline(model, store, tokenizer, todo, srt, plan, _dtype_for(plan.device, dtype), batch_tokens,
                       block_cells, finetuned, dest.uri)
        with bar, user_errors():
            task = bar.add_task(f"embed {model.name}", total=total_todo, rate="")
            for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for s, n, node in zip(b["shard"].tolist(), b["n_cells"].tolist(), b["node"].tolist(), strict=True):
                    done[s] = done.get(s, 0) + n
                    per_node[node] = per_node.get(node, 0) + n
                    if done[s] == expected[s]:  # the shard is whole: make its part while others embed
                        compactions.append(compact.remote(dest.uri, s, int(expected[s])))
                n_b = int(b["n_cells"].sum())
                cells_now += n_b
                tokens += int(b["tokens"].sum())
                padded += int(b["padded_tokens"].sum())
                bar.update(task, advance=n_b, rate=rate_text(cells_now, t0))
    with user_errors():
        dims = ray.get(compactions)
    short = [s for s in todo if done.get(s, 0) != expected[s]]
    if short:
        raise RuntimeError(f"shards {short[:5]} got {[done.get(s, 0) for s in short[:5]]} cells, expected "
                           f"{[int(expected[s]) for s in short[:5]]}")
    dim = int(dims[0]) if dims else _dim_of(dest)
    seconds = time.perf_counter() - t0
    summary = {**ident, "n_cells": int(expected.sum()), "dim": dim, "n_shards": int((expected > 0).sum()),
               "device": plan.device, "random_weights": model.random_weights}
    dest.child(DONE).write_text(json.dumps(summary, default=str, sort_keys=True, indent=2))
    if staging.exists() and not staging.files():
        staging.delete()
    return EmbedRun(dest.uri, int(expected.sum()), dim, int((expected > 0).sum()), len(todo), skipped, cells_now,
                    tokens, padded, seconds, plan.device, plan.max_actors, per_node)


def obsm_to_dir(store: CellStore, key: str, out: str | Path) -> Path:
    """Precomputed embeddings (the store's ``obsm.<key>`` column) in ``embed_to_dir``'s layout, written shard
    by shard (memory: one shard), so fold tasks read their rows the same way. Nothing is recomputed when
    the folder is finished."""
    dest = location(out)
    if dest.child(DONE).exists():
        return Path(str(out))
    dim = 0
    for s, path in enumerate(store.shard_paths):
        t = pq.read_table(path, columns=["cell_id", "row", f"obsm.{key}"])
        emb = _embeddings_of(t.column(2))
        if not np.isfinite(emb).all():
            raise UserError(f"obsm {key!r} contains NaN or inf values; fix or drop those cells before converting")
        dim = emb.shape[1]
        dest.child(f"part-{s:05d}.parquet").write_table(
            embedding_table(t.column("cell_id").to_numpy(zero_copy_only=False), t.column("row").to_numpy(), emb),
            row_group_size=ROW_GROUP)
    summary = {"obsm": key, "store": store.content_hash, "n_cells": store.n_cells, "dim": dim}
    dest.child(DONE).write_text(json.dumps(summary, sort_keys=True, indent=2))
    return Path(str(out))


def _staged_counts(staging: Location, pieces: list[Any]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for f in pieces:
        s = int(f.base_name[1:6])
        with staging.fs.open_input_file(f.path) as fh:
            counts[s] = counts.get(s, 0) + pq.ParquetFile(fh).metadata.num_rows
    return counts


def _compact_shard(out: str, shard: int, expected: int) -> int:
    """Join a shard's staged pieces into ``part-NNNNN.parquet`` (sorted by row, each row once), then remove
    the pieces. Runs as a Ray task on any node: the folder is on storage they all reach."""
    import pyarrow.compute as pc

    dest = location(out)
    staging = dest.child(STAGING)
    pieces = [f for f in staging.files(".parquet") if f.base_name.startswith(f"s{shard:05d}-")]
    tables = []
    for f in pieces:
        with staging.fs.open_input_file(f.path) as fh:
            tables.append(pq.read_table(fh))
    table = pa.concat_tables(tables).combine_chunks()
    table = table.take(pc.sort_indices(table, sort_keys=[("row", "ascending")]))
    rows = table.column("row").to_numpy()
    first = np.ones(len(rows), dtype=bool)
    first[1:] = rows[1:] != rows[:-1]
    if not first.all():  # a block retried with other boundaries: keep each row once
        table = table.filter(pa.array(first))
    if table.num_rows != expected:
        raise RuntimeError(f"shard {shard}: {table.num_rows} embedded cells staged, {expected} expected")
    dest.child(f"part-{shard:05d}.parquet").write_table(table, row_group_size=ROW_GROUP)
    for f in pieces:
        staging.fs.delete_file(f.path)
    return int(table.schema.field("embedding").type.list_size)


def _dim_of(dest: Location) -> int:
    parts = [f for f in dest.files(".parquet") if f.base_name.startswith("part-")]
    if not parts:
        raise UserError(f"{dest.uri}: no cells were embedded")
    with dest.fs.open_input_file(parts[0].path) as fh:
        return int(pq.ParquetFile(fh).schema_arrow.field("embedding").type.list_size)


# --------------------------------------------------------------------------------------------- reading


class EmbeddingSet:
    """An embedding folder written by ``embed_to_dir``: read the rows a task needs, never the whole matrix.

    Row groups are located from the Parquet footers' min/max statistics of ``row``, so a fold task reads
    the row groups holding its cells and nothing else."""

    def __init__(self, path: str | Path) -> None:
        self.loc = location(path)
        if not self.loc.child(DONE).exists():
            raise UserError(f"{self.loc.uri} is not a finished embedding folder (no {DONE}); run `scdrugmap-ray "
                            "embed` into it again to finish it")
        self.meta = json.loads(self.loc.child(DONE).read_text())

    @property
    def n_cells(self) -> int:
        return int(self.meta["n_cells"])

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @cached_property
    def _index(self) -> tuple[list[str], np.ndarray]:
        """Part paths, and per row group: (part index, row group, lowest row, highest row), by lowest row."""
        paths = [f.path for f in self.loc.files(".parquet") if f.base_name.startswith("part-")]
        entries = []
        for p_i, path in enumerate(paths):
            with self.loc.fs.open_input_file(path) as fh:
                md = pq.ParquetFile(fh).metadata
            col = md.schema.to_arrow_schema().get_field_index("row")
            for g in range(md.num_row_groups):
                st = md.row_group(g).column(col).statistics
                entries.append((p_i, g, st.min, st.max))
        idx = np.array(entries, dtype=np.int64).reshape(-1, 4)
        return paths, idx[np.argsort(idx[:, 2], kind="stable")]

    def take(self, rows: np.ndarray) -> np.ndarray:
        """float32 [len(rows), dim]: the embeddings of the given store rows, in that order."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        if not len(rows):
            return out
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        paths, idx = self._index
        found = 0
        for p_i, g, lo, hi in idx:
            a, b = np.searchsorted(srt, lo, "left"), np.searchsorted(srt, hi, "right")
            if a == b:
                continue
            with self.loc.fs.open_input_file(paths[p_i]) as fh:
                t = pq.ParquetFile(fh).read_row_group(int(g), columns=["row", "embedding"])
            have = t.column("row").to_numpy()
            pos = np.searchsorted(have, srt[a:b])
            ok = (pos < len(have)) & (have[np.minimum(pos, len(have) - 1)] == srt[a:b])
            emb = _embeddings_of(t.column("embedding"))
            out[order[a:b][ok]] = emb[pos[ok]]
            found += int(ok.sum())
        if found != len(rows):
            raise UserError(f"{self.loc.uri}: {len(rows) - found} of the requested cells have no embedding there")
        return out

    def iter_tables(self, columns: Sequence[str] = ("cell_id", "row", "embedding")) -> Iterator[pa.Table]:
        for path in self._index[0]:
            with self.loc.fs.open_input_file(path) as fh:
                yield from (pa.Table.from_batches([b]) for b in pq.ParquetFile(fh).iter_batches(columns=list(columns)))


def read_embeddings(path: str | Path, rows: np.ndarray | None = None) -> np.ndarray:
    """Embeddings from a folder of ``embed_to_dir`` (the given store rows, or all in row order) or from a
    single Parquet file (``cell_id``, ``embedding``) of earlier versions."""
    loc = location(path)
    if loc.child(DONE).exists():
        emb = EmbeddingSet(path)
        return emb.take(np.arange(emb.n_cells) if rows is None else rows)
    with loc.fs.open_input_file(loc.path) as fh:
        arr = _embeddings_of(pq.read_table(fh, columns=["embedding"]).column("embedding"))
    return arr if rows is None else arr[np.asarray(rows)]


def tokenize_store(model: FoundationModel, store: CellStore, out_dir: Path, block_cells: int = 1024) -> float:
    """Write what the model sees (cell_id, input_ids and model-specific columns) as Parquet; returns
    the vocabulary coverage. Runs as Ray Data CPU tasks; the output directory appears whole or not at all."""
    import ray

    from ..fsutil import atomic_dir

    tokenizer = _prepare(model, store)
    ds = ray.data.read_parquet([str(p) for p in store.shard_paths], columns=["cell_id", "row", "gene_index", "value"])
    ds = ds.map_batches(tokenize_rows, fn_args=(tokenizer,), batch_size=block_cells, batch_format="numpy")
    with atomic_dir(Path(out_dir)) as tmp, user_errors():
        ds.write_parquet(str(tmp))
    return tokenizer.coverage
