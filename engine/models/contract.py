"""The contract every model file follows, in one place: the coverage refusal of a store whose genes the
model does not know (``MIN_COVERAGE``, ``check_coverage``), the config check of a checkpoint's sizes
(``positive_int``), and how ``explain`` attributes a foundation
model's input (``AttributionAdapter``, set on each model class as ``attribution_adapter``, with the helpers
its fields use). Strict checkpoint loading is ``engine.models.checkpoint`` (``check_state``,
``materialize``); LoRA targets are the class attribute ``lora_targets``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UserError

#: a tokenizer refuses a store of which fewer genes than this fraction are known to its model
MIN_COVERAGE = 0.2


def positive_int(cfg: dict[str, Any], key: str, where: str) -> int:
    """``cfg[key]`` of a checkpoint's config when it is a positive integer (not a bool); otherwise the one
    config error: "{where}: {key} = {value!r}, expected a positive integer"."""
    val = cfg.get(key)
    if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
        raise UserError(f"{where}: {key} = {val!r}, expected a positive integer")
    return val


def check_coverage(coverage: float, n_store_genes: int, known_as: str, examples: Sequence[Any], advice: str,
                   min_coverage: float = MIN_COVERAGE) -> None:
    """The one refusal of a store whose genes the model mostly does not know (below ``min_coverage``):
    "only X% of the store's N genes {known_as} (store genes look like: a, b, c); {advice}"."""
    if coverage < min_coverage:
        shown = ", ".join(str(e) for e in list(examples)[:3])
        raise UserError(f"only {coverage:.1%} of the store's {n_store_genes} genes {known_as} (store genes look "
                        f"like: {shown}); {advice}")


@dataclass(frozen=True)
class AttributionAdapter:
    """How one foundation model's input is attributed; one mechanism for all, a few fields per model.

    ``key`` is the collated batch entry that carries the cell's expression-dependent input (gene token ids,
    expression bins or values); ``layer`` the module whose output is attributed (LayerIntegratedGradients),
    or None to attribute the float input ``key`` itself (IntegratedGradients). A token's gene: its entry in
    the tokenizer's ``gene_key`` row (a vocabulary id or the model's gene index; None: the token's position
    in the row), matched to the cell's own expressed store genes through ``lookup(model, tokenizer)`` (store
    position -> that id, -1 for genes the model lacks). The baseline puts ``baseline`` (None: the collate's
    padding value) into ``key`` at every gene token; ``special(tokenizer, row)`` marks tokens that are never
    genes even if their id is also a gene's. ``attention`` gives per-token attention scores (models whose
    attention can run eager)."""

    layer: Callable[[Any], Any] | None
    lookup: Callable[[Any, Any], np.ndarray]
    key: str = "input_ids"
    gene_key: str | None = "input_ids"
    baseline: float | None = None
    special: Callable[[Any, np.ndarray], np.ndarray] | None = None
    attention: Callable[[Any, Any, dict[str, Any]], Any] | None = None


def tokenizer_lookup(fm: Any, tok: Any) -> np.ndarray:
    """The usual ``lookup`` of an adapter: the tokenizer's own store position -> model id table."""
    return tok.lookup


@contextmanager
def eager_attention(config: Any) -> Iterator[None]:
    """Run an HF model with the eager softmax (SDPA returns no attention weights), then restore."""
    old = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = old


def received_attention(attn: Any, mask: Any) -> Any:
    """[n, heads, L, L] attention -> [n, L]: what each token receives, averaged over heads and over the
    real (unpadded) query tokens; 0 on padding."""
    m = mask.to(attn.dtype)
    a = attn.mean(dim=1) * m[:, :, None]
    return a.sum(dim=1) / m.sum(dim=1, keepdim=True).clamp(min=1) * m
