"""``bench embed``: the engine against the naive loop of the original scripts, in the same run.

The naive reference is what scDrugMap's scripts do: one process, a fixed number of cells per batch,
every cell padded to the model's maximum length, fp32. Both sides embed the same cells with the same
weights, so the embeddings must agree (max abs diff is reported) and only the speed may differ.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import psutil

if TYPE_CHECKING:
    from ..data.store import CellStore
    from ..models.base import FoundationModel

log = logging.getLogger(__name__)


class PeakRSS:
    """Peak resident memory and CPU time, sampled on a background thread: ``peak`` of this process and all
    its descendants (a local Ray's raylet and workers included), ``peak_driver`` of this process alone, and
    ``cpu_s``, the CPU seconds all of them used meanwhile (a process that ends between two samples loses
    its last interval). CPU seconds change less with the machine's load than wall time does.
    ``descendants=False``: this process alone (a side that runs without Ray must not count an idle Ray's)."""

    def __init__(self, interval: float = 0.1, descendants: bool = True) -> None:
        self.interval = interval
        self.descendants = descendants
        self.peak = 0
        self.peak_driver = 0
        self._cpu_first: dict[int, float] = {}
        self._cpu_last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def cpu_s(self) -> float:
        return sum(last - self._cpu_first[pid] for pid, last in self._cpu_last.items())

    def _sample(self) -> None:
        me = psutil.Process()
        total = 0
        for proc in [me, *(me.children(recursive=True) if self.descendants else [])]:
            with contextlib.suppress(psutil.Error):
                with proc.oneshot():
                    rss, times = proc.memory_info().rss, proc.cpu_times()
                if proc.pid == me.pid:
                    self.peak_driver = max(self.peak_driver, rss)
                total += rss
                cpu = times.user + times.system
                self._cpu_first.setdefault(proc.pid, 0.0 if self._thread.is_alive() else cpu)
                self._cpu_last[proc.pid] = cpu
        self.peak = max(self.peak, total)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


@dataclass
class BenchSide:
    cells: int
    seconds: float
    tokens: int
    padded_tokens: int
    peak_rss_mb: float
    cpu_s: float  # CPU seconds of this process and its descendants (Ray's included for the engine)

    @property
    def cells_per_s(self) -> float:
        return self.cells / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def padding_fraction(self) -> float:
        return 1 - self.tokens / self.padded_tokens if self.padded_tokens else 0.0

    def line(self, name: str) -> str:
        return (
            f"{name}: cells={self.cells} seconds={self.seconds:.2f} cells_per_s={self.cells_per_s:.1f} "
            f"tokens_per_s={self.tokens_per_s:.0f} padding_fraction={self.padding_fraction:.3f} "
            f"peak_rss_mb={self.peak_rss_mb:.0f} cpu_s={self.cpu_s:.1f}"
        )


def spread_rows(store: CellStore, n: int) -> np.ndarray:
    """n rows evenly spread over the store: a benchmark sees the store's mix of short and long cells."""
    return np.unique(np.linspace(0, store.n_cells - 1, num=min(n, store.n_cells)).round().astype(np.int64))


def read_cells(store: CellStore, rows: np.ndarray) -> dict[str, Any]:
    csr = store.read_csr(rows)
    ids = store.obs(["cell_id"])["cell_id"].to_numpy()[rows]
    genes = [csr.indices[csr.indptr[i] : csr.indptr[i + 1]].astype(np.int32) for i in range(len(rows))]
    values = [csr.data[csr.indptr[i] : csr.indptr[i + 1]] for i in range(len(rows))]
    return {"cell_id": np.asarray(ids, dtype=object), "gene_index": genes, "value": values}


def naive_embed(
    model: FoundationModel, store: CellStore, rows: np.ndarray, batch_cells: int
) -> tuple[np.ndarray, BenchSide]:
    """Single process, fixed batches in store order, every cell padded to the model maximum, fp32."""
    import torch

    with PeakRSS(descendants=False) as rss:
        t0 = time.perf_counter()
        cells = read_cells(store, rows)
        tokenizer = model.make_tokenizer(store.genes)
        module = model.load(device="cpu", dtype=torch.float32)
        rows = tokenizer(cells["cell_id"], cells["gene_index"], cells["value"])
        lengths = np.array([len(x) for x in rows["input_ids"]])
        out = []
        with torch.inference_mode():
            for start in range(0, len(lengths), batch_cells):
                part = {k: v[start : start + batch_cells] for k, v in rows.items()}
                out.append(model.embed(module, model.collate(part, pad_to=model.max_length)).float().numpy())
        seconds = time.perf_counter() - t0
    emb = np.concatenate(out)
    side = BenchSide(len(lengths), seconds, int(lengths.sum()), len(lengths) * model.max_length, rss.peak / 2**20,
                     rss.cpu_s)
    return emb, side


def in_process_embed(model: FoundationModel, store: CellStore, rows: np.ndarray,
                     batch_tokens: int | None) -> tuple[np.ndarray, BenchSide]:
    """The engine's batching (length-sorted token-budget batches) in this process, no Ray: what
    ``sdr.tl.embed`` does for small in-memory data. Timed like the naive loop: read, load, tokenize, embed."""
    from .embed import embed_in_process

    stats: dict[str, int] = {}
    with PeakRSS(descendants=False) as rss:
        t0 = time.perf_counter()
        csr = store.read_csr(rows)
        ids = store.obs(["cell_id"])["cell_id"].to_numpy()[rows]
        emb = embed_in_process(model, np.asarray(ids, dtype=object), csr, store.genes, batch_tokens=batch_tokens,
                               stats=stats)
        seconds = time.perf_counter() - t0
    return emb, BenchSide(len(rows), seconds, stats["tokens"], stats["padded_tokens"], rss.peak / 2**20, rss.cpu_s)


def bench_embed(model: FoundationModel, store: CellStore, n_cells: int, *, batch_tokens: int | None = None,
                naive_batch_cells: int = 8, num_actors: int | None = None) -> dict[str, object]:
    """Three ways over the same cells and weights: the Ray Data engine (timed from Ray start-up, which is
    reported apart as ``ray_start_s``), the same batching in this process without Ray, and the naive loop."""
    from ..runtime import init_ray
    from .embed import embed_store

    rows = spread_rows(store, n_cells)
    n = len(rows)
    ids = store.obs(["cell_id"])["cell_id"].to_numpy()[rows].tolist()
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        init_ray()
        ray_start = time.perf_counter() - t0
        emb, stats = embed_store(model, store, batch_tokens=batch_tokens, num_actors=num_actors, cell_ids=ids,
                                 return_stats=True)
        seconds = time.perf_counter() - t0
    engine = BenchSide(n, seconds, stats["tokens"], stats["padded_tokens"], rss.peak / 2**20, rss.cpu_s)
    local_emb, local = in_process_embed(model, store, rows, batch_tokens)
    ref, naive = naive_embed(model, store, rows, naive_batch_cells)
    return {
        "model": model.name,
        "random_weights": model.random_weights,
        "engine": asdict(engine) | {"ray_start_s": ray_start,
                                    "line": engine.line("engine") + f" ray_start_s={ray_start:.2f}"},
        "in_process": asdict(local) | {"line": local.line("in_process")},
        "naive": asdict(naive) | {"line": naive.line("naive")},
        "speedup_vs_naive": engine.cells_per_s / naive.cells_per_s,
        "speedup_in_process_vs_naive": local.cells_per_s / naive.cells_per_s,
        # CPU seconds (the engine's include Ray's processes and start-up): less sensitive to the load
        "cpu_speedup_vs_naive": naive.cpu_s / engine.cpu_s if engine.cpu_s else float("nan"),
        "max_abs_diff": float(max(np.abs(emb - ref).max(), np.abs(local_emb - ref).max())),
    }


def bench_finetune(
    model: FoundationModel, store: CellStore, n_cells: int, worker_counts: list[int], epochs: int = 2,
    batch_cells: int = 32, use_gpu: bool = False,
) -> list[str]:
    """Train LoRA on the same cells with each worker count; the last epoch's speed is reported (the
    first includes start-up). Returns printable lines."""
    import tempfile
    from pathlib import Path

    from ..train.lora import LoraSettings, finetune

    obs = store.obs(["cell_id", "label"])
    lab = obs[obs["label"].notna()].head(n_cells + max(8, n_cells // 8))
    ids, y = lab["cell_id"].astype(str).tolist(), lab["label"].astype(int).tolist()
    train, val = dict(zip(ids[:n_cells], y[:n_cells], strict=True)), dict(zip(ids[n_cells:], y[n_cells:], strict=True))
    lines = []
    for workers in worker_counts:
        settings = LoraSettings(epochs=epochs, workers=workers, batch_cells=batch_cells, use_gpu=use_gpu,
                                patience=epochs)
        with tempfile.TemporaryDirectory() as tmp, PeakRSS() as rss:
            t0 = time.perf_counter()
            res = finetune(model, store, train, val, Path(tmp) / "run", settings)
            wall = time.perf_counter() - t0
        last = res.metrics["history"][-1]
        per = last["cells_per_s_per_worker"]
        lines.append(
            f"model={model.name} workers={workers} cells={len(train)} epochs={epochs} "
            f"cells_per_s_per_worker={per} cells_per_s_total={sum(per):.1f} "
            f"tokens_per_s_total={sum(last['tokens_per_s_per_worker']):.0f} wall_s={wall:.1f} "
            f"peak_rss_mb={rss.peak / 2**20:.0f}"
        )
    return lines
