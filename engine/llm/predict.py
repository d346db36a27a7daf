"""The ``zero_shot`` and ``few_shot`` strategies for chat models: prompt each test cell, parse strictly.

few_shot shows k labelled cells of the fold's TRAINING split (balanced: ceil(k/2) sensitive, floor(k/2)
resistant, drawn with the unit's seed; the same examples for every test cell of the fold, which also
lets servers reuse the prompt prefix). zero_shot shows none. The validation split is not used (no
training happens). An answer that does not parse is an abstention: it scores p_sensitive = 0.5 in the
metrics over ALL prompted test cells, and is counted (``n_abstain``, ``abstain_rate``) beside metrics
over the answered cells only (``*_answered``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import pandas as pd

from ..data.splits import Fold
from ..data.store import CellStore
from ..errors import UserError
from ..progress import cells_progress, rate_text
from .client import ChatBackend, Usage
from .prompt import PromptCell, fit_messages, parse_answer
from .sentence import SentenceBuilder, SentenceSpec

log = logging.getLogger(__name__)

PROMPT_STRATEGIES = ("zero_shot", "few_shot")
_META = ("cancer_type", "tissue", "therapy", "regimen")


@dataclass(frozen=True)
class PromptSettings:
    """The benchmark's ``prompting:`` block."""

    k: int = 4  # few_shot examples per prompt
    context: bool = True  # cancer type / tissue / drug of the cell in the prompt
    top_k: int = 100  # genes per cell sentence
    value_format: str | None = None
    sentence_format: str = "ranked"
    max_test_cells: int | None = None  # prompt a seeded sample of each fold's test cells (cost control)
    temperature: float = 0.0
    max_tokens: int = 64
    batch_size: int = 256  # chats per backend call

    @classmethod
    def from_options(cls, opts: dict[str, Any]) -> PromptSettings:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(opts) - names)
        if unknown:
            raise UserError(f"prompting has no option(s) {', '.join(unknown)}; options: {', '.join(sorted(names))}")
        s = cls(**opts)
        if s.k < 1:
            raise UserError("prompting.k (few-shot examples) must be at least 1")
        if s.max_test_cells is not None and s.max_test_cells < 1:
            raise UserError("prompting.max_test_cells must be at least 1")
        s.sentence_spec()  # validates top_k / format / value_format
        return s

    def sentence_spec(self) -> SentenceSpec:
        return SentenceSpec(top_k=self.top_k, value_format=self.value_format, format=self.sentence_format)

    @property
    def params(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "max_tokens": self.max_tokens}


@dataclass
class PromptOutcome:
    test_rows: np.ndarray
    y_true: np.ndarray
    p_sensitive: np.ndarray
    abstained: np.ndarray
    reasons: list[str | None]
    answers: list[str | None]
    genes_dropped: np.ndarray
    usage: Usage
    n_examples: int
    seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


def _cells(store: CellStore, obs: pd.DataFrame, rows: np.ndarray, builder: SentenceBuilder,
           labels: bool) -> list[PromptCell]:
    csr = store.read_csr(rows)
    meta = obs.iloc[rows]
    out = []
    for j, r in enumerate(rows):
        gi = csr.indices[csr.indptr[j] : csr.indptr[j + 1]]
        v = csr.data[csr.indptr[j] : csr.indptr[j + 1]]
        m = {c: meta[c].iloc[j] for c in _META if c in meta.columns}
        label = int(obs["label"].iloc[r]) if labels else None
        out.append(PromptCell(builder.words(gi, v), m, label))
    return out


def pick_examples(obs: pd.DataFrame, train: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k training rows, balanced between the classes, in a seeded order."""
    rng = np.random.default_rng(seed)
    y = obs["label"].to_numpy()[train]
    pos, neg = train[y == 1], train[y == 0]
    n_pos = min(len(pos), math.ceil(k / 2))
    n_neg = min(len(neg), k - n_pos)
    n_pos = min(len(pos), k - n_neg)
    picked = np.concatenate([rng.choice(pos, n_pos, replace=False), rng.choice(neg, n_neg, replace=False)])
    return picked[rng.permutation(len(picked))].astype(np.int64)


def test_subset(fold: Fold, max_cells: int | None, seed: int) -> np.ndarray:
    if max_cells is None or len(fold.test) <= max_cells:
        return fold.test
    rng = np.random.default_rng(seed + 7919)
    return np.sort(rng.choice(fold.test, max_cells, replace=False)).astype(np.int64)


def predict_prompts(backend: ChatBackend, store: CellStore, obs: pd.DataFrame, fold: Fold, strategy: str,
                    settings: PromptSettings, seed: int, progress: bool = False) -> PromptOutcome:
    """One chat request per test cell (cached answers reused), in batches of ``settings.batch_size``;
    ``progress``: a bar of cells answered, with cells/s."""
    if strategy not in PROMPT_STRATEGIES:
        raise ValueError(strategy)
    t0 = time.perf_counter()
    builder = SentenceBuilder(store.genes, settings.sentence_spec())
    ex_rows = pick_examples(obs, fold.train, settings.k, seed) if strategy == "few_shot" else np.zeros(0, np.int64)
    examples = _cells(store, obs, ex_rows, builder, labels=True) if len(ex_rows) else []
    rows = test_subset(fold, settings.max_test_cells, seed)
    budget = backend.context_tokens - settings.max_tokens
    with_values = settings.value_format is not None or settings.sentence_format == "paper"

    answers: list[str | None] = []
    reasons: list[str | None] = []
    p = np.empty(len(rows), dtype=np.float32)
    abstained = np.zeros(len(rows), dtype=bool)
    dropped = np.zeros(len(rows), dtype=np.int32)
    total = Usage()
    bar = cells_progress(progress)
    task = bar.add_task(f"prompt {backend.model}", total=len(rows), rate="")
    with bar:
        for start in range(0, len(rows), settings.batch_size):
            part = rows[start : start + settings.batch_size]
            chats = []
            for j, cell in enumerate(_cells(store, obs, part, builder, labels=False)):
                msgs, n_drop = fit_messages(cell, examples, context=settings.context, with_values=with_values,
                                            count_tokens=backend.count_tokens, budget=budget)
                dropped[start + j] = n_drop
                chats.append(msgs)
            results, usage = backend.complete(chats, settings.params)
            for f in ("n_requests", "n_cached", "prompt_tokens", "completion_tokens", "cost_usd", "retries"):
                setattr(total, f, getattr(total, f) + getattr(usage, f))
            for j, res in enumerate(results):
                ans = parse_answer(res.text) if res.error is None else None
                i = start + j
                answers.append(res.text)
                if ans is None:
                    reasons.append(f"request failed: {res.error}")
                    abstained[i], p[i] = True, 0.5
                else:
                    reasons.append(ans.reason)
                    abstained[i], p[i] = ans.abstained, ans.p_sensitive
            bar.update(task, advance=len(part), rate=rate_text(start + len(part), t0))
    n_cut = int((dropped > 0).sum())
    if n_cut:
        log.warning("%d of %d prompts were longer than the model's context (%d tokens): their cells' lowest-"
                    "ranked genes were dropped", n_cut, len(rows), backend.context_tokens)
    return PromptOutcome(
        test_rows=rows, y_true=obs["label"].to_numpy()[rows].astype(np.int64), p_sensitive=p, abstained=abstained,
        reasons=reasons, answers=answers, genes_dropped=dropped, usage=total, n_examples=len(ex_rows),
        seconds=time.perf_counter() - t0,
        info={"example_cells": obs["cell_id"].astype(str).to_numpy()[ex_rows].tolist()},
    )


def chat_backend_of(model: Any, cache_dir: Any) -> ChatBackend:
    """The chat backend of a registry model that can be prompted, or a one-line error."""
    make = getattr(model, "chat_backend", None)
    if make is None:
        raise UserError(f"model {model.name!r} cannot be prompted (zero_shot/few_shot need a chat model: llama "
                        "or openai-chat)")
    return make(cache_dir)
