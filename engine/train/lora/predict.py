"""Prediction with a saved fine-tuned model: the adapted backbone runs in the Ray Data actor pool of the
embedding pipeline, the small head on the driver."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...data.store import CellStore
from ...models.lora_adapter import load_config_and_head
from ...pipeline.embed import embed_store


def predict_finetuned(model_dir: Path, store: CellStore, cell_ids: list[str] | None = None,
                      batch_tokens: int | None = None, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(p_sensitive, embeddings) of the given cells (store ``rows``, or ``cell_ids``; all by default) with a
    fine-tuned model: the adapted backbone runs in the Ray Data actor pool, the small head on the driver."""
    import torch  # heavy: loaded when a fine-tuned model predicts

    fm, _, head = load_config_and_head(Path(model_dir))
    emb = embed_store(fm, store, cell_ids=cell_ids, rows=rows, finetuned=str(model_dir),
                      batch_tokens=batch_tokens)
    with torch.no_grad():
        p = torch.softmax(head(torch.from_numpy(emb)), dim=1)[:, 1].numpy().astype(np.float32)
    return p, emb
