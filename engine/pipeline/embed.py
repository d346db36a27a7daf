"""Streaming embedding of a cell store with Ray Data.

    read_parquet(shards) -> map_batches(tokenize)            CPU tasks
                         -> map_batches(EmbedActor, pool)     one model copy per actor (GPU or CPU)
                         -> cell_id + embedding

Inside each actor, a block of tokenized cells is sorted by length and cut into token-budget batches
(cells x longest cell <= budget), so padding stays small: for rank-value tokenizers padding to the
model's maximum is most of the compute. Output order is restored by cell_id.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from ..errors import UserError

if TYPE_CHECKING:
    from ..data.store import CellStore
    from ..models.base import CellTokenizer, FoundationModel

log = logging.getLogger(__name__)

DEFAULT_BATCH_TOKENS = 16_384
_USER_ERROR_LINE = re.compile(r"(?:^|\s)(?:[\w.]+\.)?UserError: (.+)$", re.MULTILINE)


def token_budget_batches(lengths: np.ndarray, batch_tokens: int, max_cells: int = 512) -> Iterator[np.ndarray]:
    """Indices of cells grouped so that n_cells * longest <= batch_tokens, shortest cells first."""
    order = np.argsort(lengths, kind="stable")
    start = 0
    while start < len(order):
        end = start + 1
        # lengths are ascending along `order`, so the last cell added is the longest
        while end < len(order) and end - start < max_cells and (end - start + 1) * lengths[order[end]] <= batch_tokens:
            end += 1
        yield order[start:end]
        start = end


def tokenize_rows(batch: dict[str, np.ndarray], tokenizer: CellTokenizer) -> pa.Table:
    """Tokenize a batch of store rows into an Arrow table of list columns (what the model sees)."""
    rows = tokenizer(batch["cell_id"], list(batch["gene_index"]), list(batch["value"]))
    columns: dict[str, Any] = {"cell_id": pa.array(batch["cell_id"], type=pa.string())}
    for key, cells in rows.items():
        columns[key] = _list_array(cells)
    columns["n_tokens"] = pa.array([len(x) for x in rows["input_ids"]], type=pa.int32())
    return pa.table(columns)


def _list_array(cells: list[np.ndarray]) -> pa.Array:
    lengths = np.fromiter((len(c) for c in cells), dtype=np.int32, count=len(cells))
    offsets = np.zeros(len(cells) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate(cells) if cells else np.zeros(0, dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))


class EmbedActor:
    """Holds one model copy; embeds blocks of tokenized cells in token-budget batches."""

    def __init__(self, model_name: str, options: dict[str, Any], device: str, dtype: str | None,
                 batch_tokens: int, finetuned: str | None = None, cpu_threads: int | None = None) -> None:
        import torch

        if device == "cpu" and cpu_threads:
            # Ray gives an actor one OpenMP thread (its num_cpus); on CPU the model should use the
            # cores the pool is meant to have.
            torch.set_num_threads(cpu_threads)
        from ..models.base import get_model

        self.model = get_model(model_name, options)
        self.device = device
        self.dtype = getattr(torch, dtype) if dtype else None
        self.batch_tokens = batch_tokens
        # A bad checkpoint must reach the user as its one-line UserError, not as a dead actor: keep it
        # and raise it from the first task, whose error Ray Data hands back to the driver.
        self.error: UserError | None = None
        try:
            if finetuned:  # a LoRA fine-tuned model: the backbone with its adapter merged in
                from ..train.lora import load_finetuned

                self.model, self.module, _ = load_finetuned(Path(finetuned), device, self.dtype)  # type: ignore[assignment]
            else:
                self.module = self.model.load(device=device, dtype=self.dtype)  # type: ignore[attr-defined]
        except UserError as err:
            self.error = err

    def __call__(self, block: dict[str, np.ndarray]) -> dict[str, Any]:
        if self.error is not None:
            raise self.error
        return embed_block(self.model, self.module, block, self.batch_tokens, self.device)  # type: ignore[arg-type]


def _user_error_in(exc: BaseException) -> UserError | None:
    """The UserError behind a Ray Data failure, if there is one. Ray Data re-raises a UDF's error as
    a UserCodeException that keeps only the remote traceback's text, so the line is read from it."""
    todo: list[BaseException | None] = [exc]
    seen: set[int] = set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        found = _USER_ERROR_LINE.findall(str(e))
        if found:
            return UserError(found[-1])
        todo.extend([getattr(e, "cause", None), e.__cause__, e.__context__])
    return None


def embed_block(model: FoundationModel, module: Any, block: dict[str, np.ndarray], batch_tokens: int,
                device: str = "cpu") -> dict[str, Any]:
    import torch

    lengths = block["n_tokens"]
    ragged = [k for k in block if k not in ("cell_id", "n_tokens")]
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
    return {"cell_id": block["cell_id"], "embedding": result, "n_tokens": lengths, "padded_tokens": padded}


def keep_cells(batch: dict[str, np.ndarray], wanted: frozenset[str]) -> dict[str, np.ndarray]:
    mask = np.fromiter((c in wanted for c in batch["cell_id"]), dtype=bool, count=len(batch["cell_id"]))
    return {k: v[mask] for k, v in batch.items()}


def _quiet_ray_data() -> None:
    """Ray Data's per-operator logs drown the CLI's own output, and a failing task is reported to the
    user by the driver as one line (see _user_error_in), so Ray Data's own logs are silenced."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)


def embed_store(
    model: FoundationModel,
    store: CellStore,
    *,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    num_actors: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    block_cells: int = 1024,
    cell_ids: Sequence[str] | None = None,
    return_stats: bool = False,
    finetuned: str | None = None,
) -> Any:
    """float32 [n_cells, d] embeddings in store row order, computed on the current Ray cluster.

    ``cell_ids`` embeds only those cells, in that order (benchmarks); ``return_stats`` also returns
    token counts; ``finetuned`` (a LoRA model directory) embeds with the fine-tuned backbone.
    """
    import ray
    import torch

    if not ray.is_initialized():
        ray.init(include_dashboard=False, configure_logging=False, logging_level=logging.WARNING)
    _quiet_ray_data()
    model.check_store(store)
    tokenizer = model.make_tokenizer(store.genes)
    log.info("%s: vocabulary covers %.1f%% of the store's genes", model.name, 100 * tokenizer.coverage)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    device = device or ("cuda" if gpus and torch.cuda.is_available() else "cpu")
    if device == "cuda" and dtype is None:
        dtype = "bfloat16"
    num_actors = num_actors or max(1, gpus if device == "cuda" else 1)
    cpu_threads = max(1, int(ray.cluster_resources().get("CPU", 1)) // num_actors)

    ds = ray.data.read_parquet([str(p) for p in store.shard_paths], columns=["cell_id", "gene_index", "value"])
    if cell_ids is not None:
        wanted = list(cell_ids)
        ds = ds.map_batches(keep_cells, fn_args=(frozenset(wanted),), batch_format="numpy")
    else:
        wanted = store.obs(["cell_id"])["cell_id"].tolist()
    n = len(wanted)
    ds = ds.map_batches(tokenize_rows, fn_args=(tokenizer,), batch_size=block_cells, batch_format="numpy")
    ds = ds.map_batches(
        EmbedActor,
        fn_constructor_args=(model.name, model.options, device, dtype, batch_tokens, finetuned, cpu_threads),
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_gpus=1 if device == "cuda" else 0,
        batch_size=block_cells,
        batch_format="numpy",
    )
    row_of = {cid: i for i, cid in enumerate(wanted)}
    out: np.ndarray | None = None
    stats = {"tokens": 0, "padded_tokens": 0}
    try:  # filled as batches stream in: memory holds the output, not a second copy of it
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            emb = np.stack(batch["embedding"]) if batch["embedding"].dtype == object else batch["embedding"]
            if out is None:
                out = np.empty((n, emb.shape[1]), dtype=np.float32)
            out[[row_of[c] for c in batch["cell_id"]]] = emb
            stats["tokens"] += int(batch["n_tokens"].sum())
            stats["padded_tokens"] += int(batch["padded_tokens"].sum())
    except Exception as err:
        user = _user_error_in(err)
        if user is not None:
            raise user from None
        raise
    assert out is not None, "empty store"
    return (out, stats) if return_stats else out


def tokenize_store(model: FoundationModel, store: CellStore, out_dir: Path, block_cells: int = 1024) -> float:
    """Write what the model sees (cell_id, input_ids and model-specific columns) as Parquet; returns
    the vocabulary coverage. Runs as Ray Data CPU tasks; the output directory appears whole or not at all."""
    import ray

    from ..fsutil import atomic_dir

    if not ray.is_initialized():
        ray.init(include_dashboard=False, configure_logging=False, logging_level=logging.WARNING)
    _quiet_ray_data()
    model.check_store(store)
    tokenizer = model.make_tokenizer(store.genes)
    ds = ray.data.read_parquet([str(p) for p in store.shard_paths], columns=["cell_id", "gene_index", "value"])
    ds = ds.map_batches(tokenize_rows, fn_args=(tokenizer,), batch_size=block_cells, batch_format="numpy")
    with atomic_dir(Path(out_dir)) as tmp:
        ds.write_parquet(str(tmp))
    return tokenizer.coverage


def write_embeddings(path: Path, cell_ids: Sequence[str], emb: np.ndarray) -> None:
    """Parquet with ``cell_id`` and ``embedding`` (fixed-size list<float32>), written atomically."""
    import pyarrow.parquet as pq

    from ..fsutil import atomic_file

    emb = np.ascontiguousarray(emb, dtype=np.float32)
    values = pa.array(emb.reshape(-1), type=pa.float32())
    table = pa.table(
        {
            "cell_id": pa.array(list(cell_ids), type=pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(values, emb.shape[1]),
        }
    )
    with atomic_file(Path(path)) as tmp:
        pq.write_table(table, tmp)


def read_embeddings(path: Path) -> np.ndarray:
    import pyarrow.parquet as pq

    col = pq.read_table(path, columns=["embedding"]).column("embedding").combine_chunks()
    return col.values.to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)
