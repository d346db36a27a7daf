"""``bench embed --model llama``: vLLM's pooling runner against the transformers backend, same tiny (or
real) checkpoint, same cells, same token ids, in the same run.

Both run in this process, one after the other: load (timed apart: vLLM's start-up is tens of seconds),
a warm-up on a few cells, then the timed embedding of every cell (transformers: token-budget batches,
as the engine's actors do; vLLM: the whole block at once, vLLM batches itself). Prints cells/s and
tokens/s for each and the largest difference between their embeddings.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from ..models.base import get_model
from ..pipeline.bench import PeakRSS, read_cells, spread_rows
from ..pipeline.embed import embed_block, tokenize_rows

if TYPE_CHECKING:
    from ..data.store import CellStore


def bench_llama(options: dict[str, Any], store: CellStore, n_cells: int, batch_tokens: int) -> list[str]:
    import torch  # heavy: only the benchmark needs it

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process (no spawn)
    rows = spread_rows(store, n_cells)
    cells = read_cells(store, rows)
    lines, embs = [], {}
    for backend in ("vllm", "transformers"):
        model = get_model("llama", {**options, "backend": backend})
        tok = model.make_tokenizer(store.genes)  # type: ignore[attr-defined]
        block = tokenize_rows(cells, tok).to_pydict()
        block = {k: (np.asarray(v, dtype=object) if k == "cell_id" else
                     np.asarray(v) if k == "n_tokens" else [np.asarray(x) for x in v]) for k, v in block.items()}
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            module = model.load(device="cpu", dtype=torch.float32)  # type: ignore[attr-defined]
            load_s = time.perf_counter() - t0
            budget = int(block["n_tokens"].sum()) + 1 if backend == "vllm" else batch_tokens
            warm = {k: v[:4] for k, v in block.items()}
            embed_block(model, module, warm, budget)  # type: ignore[arg-type]
            t1 = time.perf_counter()
            out = embed_block(model, module, block, budget)  # type: ignore[arg-type]
            secs = time.perf_counter() - t1
        embs[backend] = out["embedding"]
        n, toks = len(block["n_tokens"]), int(block["n_tokens"].sum())
        lines.append(f"llama[{backend}]: cells={n} tokens={toks} load_s={load_s:.1f} seconds={secs:.2f} "
                     f"cells_per_s={n / secs:.1f} tokens_per_s={toks / secs:.0f} peak_rss_mb={rss.peak / 2**20:.0f}")
        del module
    diff = float(np.abs(embs["vllm"] - embs["transformers"]).max())
    lines.append(f"max_abs_diff(vllm, transformers)={diff:.2e} random_weights={model.random_weights}")
    return lines
