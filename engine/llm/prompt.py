"""Prompts for zero/few-shot drug-response prediction, and the strict parser of the answers.

A prompt is a chat: a system message stating the task and the answer format, then for few-shot k
example cells from the training split (each a user turn with the cell and an assistant turn with its
true answer), then the cell to classify. Optional dataset context: cancer type, tissue and drug
(therapy, regimen) of the cell; never its dataset or sample name (those are often GEO accessions, which a model
could look up from memory instead of reading the cell).

The answer must be a JSON object ``{"label": "sensitive" | "resistant", "confidence": 0..1}``:
exactly those two keys, the label one of the two words (any letter case), the confidence a JSON number
in [0, 1]. The only leniency is a single Markdown code fence around the object (```json ... ```), which
chat models add by habit. Anything else is an ABSTENTION with its reason: it is kept, counted and
scored, never dropped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .sentence import fit_words

LABELS = {"sensitive": 1, "resistant": 0}
CONTEXT_COLUMNS = (("cancer_type", "cancer type"), ("tissue", "tissue"), ("therapy", "therapy"), ("regimen", "drug"))

SYSTEM = (
    "You are an expert in single-cell transcriptomics and cancer drug response. You are given one cancer "
    "cell as its expressed genes, ranked from highest to lowest expression{values}. Predict whether the cell "
    "is sensitive or resistant to the drug. Answer with only a JSON object of the form "
    '{{"label": "sensitive" or "resistant", "confidence": a number between 0 and 1}}, where confidence is '
    "your probability that the label is correct. No other text."
)
_FENCE = re.compile(r"^```(?:json|JSON)?\s*\n?(.*?)\n?```$", re.DOTALL)


@dataclass(frozen=True)
class Answer:
    label: int | None  # 1 sensitive, 0 resistant, None abstained
    confidence: float | None
    reason: str | None = None  # why it is an abstention

    @property
    def abstained(self) -> bool:
        return self.label is None

    @property
    def p_sensitive(self) -> float:
        """The answer as a probability of "sensitive"; an abstention scores 0.5 (no information)."""
        if self.label is None or self.confidence is None:
            return 0.5
        return self.confidence if self.label == 1 else 1.0 - self.confidence


def parse_answer(text: str | None) -> Answer:
    """Strict parse of one model answer (see the module docstring); never raises."""
    if text is None:
        return Answer(None, None, "no answer")
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1).strip()
    if not body:
        return Answer(None, None, "empty answer")
    try:
        obj = json.loads(body)
    except ValueError:
        return Answer(None, None, "not a JSON object")
    if not isinstance(obj, dict):
        return Answer(None, None, "not a JSON object")
    keys = set(obj)
    if keys != {"label", "confidence"}:
        missing = sorted({"label", "confidence"} - keys)
        extra = sorted(keys - {"label", "confidence"})
        what = "; ".join(p for p in (missing and f"missing {missing}", extra and f"unexpected {extra}") if p)
        return Answer(None, None, f"keys: {what}")
    label, conf = obj["label"], obj["confidence"]
    if not isinstance(label, str) or label.strip().lower() not in LABELS:
        return Answer(None, None, "label is not 'sensitive' or 'resistant'")
    if isinstance(conf, bool) or not isinstance(conf, int | float) or not 0.0 <= float(conf) <= 1.0:
        return Answer(None, None, "confidence is not a number in [0, 1]")
    return Answer(LABELS[label.strip().lower()], float(conf))


def answer_text(label: int) -> str:
    """The answer a few-shot example shows for its true label."""
    return json.dumps({"label": "sensitive" if label == 1 else "resistant", "confidence": 1.0})


def context_line(meta: dict[str, Any]) -> str | None:
    parts = []
    for col, name in CONTEXT_COLUMNS:
        v = meta.get(col)
        if isinstance(v, str) and v.strip():
            parts.append(f"{name}: {v.strip()}")
    return "; ".join(parts) if parts else None


def cell_message(words: Sequence[str], meta: dict[str, Any] | None) -> str:
    ctx = context_line(meta) if meta is not None else None
    head = f"Context: {ctx}.\n" if ctx else ""
    return f"{head}Cell: {' '.join(words)}"


@dataclass(frozen=True)
class PromptCell:
    words: list[str]  # the cell sentence, most expressed first
    meta: dict[str, Any]  # cancer_type, tissue, therapy (used when context is on)
    label: int | None = None  # examples only


def build_messages(query: PromptCell, examples: Sequence[PromptCell], *, context: bool, with_values: bool,
                   n_words: int | None = None) -> list[dict[str, str]]:
    """The chat for one cell; ``n_words`` cuts every cell sentence to its first n genes."""
    cut = (lambda w: w) if n_words is None else (lambda w: w[:n_words])
    system = SYSTEM.format(values=" (each gene written as GENE:value)" if with_values else "")
    msgs = [{"role": "system", "content": system}]
    for ex in examples:
        assert ex.label is not None
        msgs.append({"role": "user", "content": cell_message(cut(ex.words), ex.meta if context else None)})
        msgs.append({"role": "assistant", "content": answer_text(ex.label)})
    msgs.append({"role": "user", "content": cell_message(cut(query.words), query.meta if context else None)})
    return msgs


def fit_messages(query: PromptCell, examples: Sequence[PromptCell], *, context: bool, with_values: bool,
                 count_tokens: Callable[[list[dict[str, str]]], int], budget: int
                 ) -> tuple[list[dict[str, str]], int]:
    """The chat cut to ``budget`` prompt tokens by dropping the lowest-ranked genes of its cells; returns
    it and how many genes of the query cell were dropped."""
    longest = max([len(query.words), *(len(e.words) for e in examples)])

    def fits(n: int) -> bool:
        return count_tokens(build_messages(query, examples, context=context, with_values=with_values,
                                           n_words=n)) <= budget

    n = fit_words(range(longest), fits)  # type: ignore[arg-type]
    msgs = build_messages(query, examples, context=context, with_values=with_values,
                          n_words=None if n == longest else n)
    return msgs, max(0, len(query.words) - n)
