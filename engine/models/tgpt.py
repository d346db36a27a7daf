"""tGPT (transcriptome GPT-2, ``lixiangchun/transcriptome-gpt-1024-8-16-64``) cell embeddings.

What the original does (deeplearningplus/tGPT: ``README.md`` / ``example.ipynb`` "Extract features",
``train.py``; the checkpoint is a Hugging Face folder ``transcriptome-gpt-1024-8-16-64``):

* Input: one line of text per cell, the cell's gene SYMBOLS ranked by expression, highest first,
  separated by spaces (``data/val.txt``: 62 symbols a line). The ranking step itself is not in the
  repository. ``LineDataset`` replaces every ``-`` and ``.`` in a line by ``_`` (the vocabulary spells
  ``HLA-B`` as ``HLA_B``).
* Tokenizer: ``PreTrainedTokenizerFast`` over the checkpoint's ``tokenizer.json``: a WordLevel model of
  21,150 tokens (``<pad>`` 0, ``</b>`` 1, ``</s>`` 2, ``<unk>`` 3, gene symbols; no normaliser), the
  ``Whitespace`` pre-tokeniser (words are ``\\w+`` or runs of punctuation) and a template that wraps a
  line as ``</b> ... </s>``. ``tokenizer(lines, max_length=64, truncation=True, padding=True)``: a
  symbol outside the vocabulary becomes ``<unk>`` in place; the genes are truncated to 64 - 2 = 62
  tokens (the README: "sequence of 62 top expressing genes"), then the template adds ``</b>``/``</s>``;
  the batch is right-padded with ``<pad>`` to its longest line, with an attention mask.
* Model: ``GPT2LMHeadModel.from_pretrained(ckpt).transformer`` (the GPT-2 body, no LM head), eval mode.
  ``train.py`` builds it as ``GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=1024, n_layer=8,
  n_head=16, bos/pad/eos ids of the tokenizer)``: every other setting is GPT-2's default, so
  ``n_positions`` is 1,024 (the "64" of the name is the sequence length used, not the model's maximum).
  The released ``pytorch_model.bin`` is 502 MB (the notebook's download log), which is what this config
  gives: 123.5M float32 parameters = 493.9 MB plus the eight 1 MiB ``attn.bias`` causal-mask buffers
  that transformers 4.x saved (``init_random`` writes 502,338,069 bytes); with ``n_positions`` 64 it
  would be 490 MB.
* Cell embedding: ``last_hidden_state`` (after the final LayerNorm); per cell
  ``hidden[1 : attention_mask.sum() - 1].mean(0)``, i.e. the mean over the gene tokens, excluding
  ``</b>`` and ``</s>`` and the padding: 1,024-d for the released model.

Where this file follows it: the symbol rewriting, vocabulary (read from the checkpoint's own
``tokenizer.json``), ``<unk>`` for unknown symbols, truncation to ``max_len`` tokens including the
template's special tokens, the special tokens, right padding with ``<pad>`` to the longest cell and the
attention mask, the GPT-2 body and the pooling rule. The per-cell tokens are identical to running the
original tokenizer on the joined sentence (tested on real cells against ``transformers``), but computed
as a per-gene lookup: each store gene's symbol is split into words once, with the ``Whitespace`` rule,
and mapped through the vocabulary; a cell is then a gather of its ranked genes' token ids.

Where it differs (the ranking step, which tGPT does not publish), and why:

* Genes are ranked by the store's value (counts), descending; only expressed (non-zero) genes are
  ranked, so a cell with fewer than 62 of them gives a shorter sequence (a dense ``argsort`` would
  append arbitrary zero-count genes). Per-cell normalisation or ``log1p`` would not change the order.
* Ties (very common in counts: most cells of the real GSE149383 data have a tie across the 62-gene
  cut) keep the store's gene order (stable sort). Third-party scripts that feed tGPT sort a dense row
  with ``np.argsort`` (quicksort: tie order implementation- and CPU-dependent) or use Python's
  ``sorted`` (stable, like here); none of them is part of tGPT.
* ``exclude_genes="mito_ribo"`` (an option; the default ``none`` ranks every expressed gene, as the
  bare inference code would) leaves out mitochondrially encoded genes (``MT-*``) and
  cytosolic ribosomal protein genes (``RPL*``/``RPS*``, ``RPLP0-2``, ``RPSA``; not their ``L``
  paralogs, pseudogenes or ``RPS6K*``) before ranking. Evidence that the pretraining sentences were
  built without them: the vocabulary, apparently ordered by frequency in the corpus (``TMSB4X``,
  ``FTH1``, ``ACTB`` ... first), has no ``MT_*`` symbol at all and puts the ribosomal genes, which top
  almost every cell's raw counts, after position 11,900 of 21,150; the 100 cells of the official
  ``data/val.txt`` (62 genes each) contain none of them. On the real GSE149383 cells, keeping them
  would fill 22% of the 62 positions on average, the mitochondrial ones as ``<unk>``. The default stays
  with what tGPT's code does (nothing removes them there), so the filter is one option away. (``MALAT1`` and
  ``NEAT1`` are rare in the vocabulary too, at 13,737 and 19,159, and absent from ``val.txt``, but no
  rule that would explain it is known; they are kept.)
* Store genes without a symbol, or whose symbol column holds Ensembl IDs, are named through the
  package's org.Hs.eg.db table (``engine/data/gene_ids``); the original would see the ID, an ``<unk>``.
* A cell left with no gene token gets a zero embedding (the original's mean over an empty slice is NaN).
* Loading is strict (``from_pretrained`` silently fills missing weights with random values): every key of
  the GPT-2 body must be in the file with its shape. Accepted layouts: ``GPT2LMHeadModel`` keys
  (``transformer.*``, the official ``pytorch_model.bin``) with the tied ``lm_head.weight`` present or
  absent, or ``GPT2Model`` keys (no prefix); in ``.bin`` or ``.safetensors``. The legacy buffers
  ``h.N.attn.bias`` / ``h.N.attn.masked_bias`` of transformers 4.x files are shape-checked and ignored.
* Attention runs through PyTorch SDPA (``attn_implementation="sdpa"``), not the eager softmax: the same
  math. Precision: option ``dtype`` (``upstream``, the default: float32, as the original); the embedding
  is returned as float32.

Checkpoints: ``init_random`` writes the official folder layout (``config.json``, ``pytorch_model.bin``
with the ``GPT2LMHeadModel`` keys and legacy buffers of a transformers-4.x file, ``tokenizer.json``,
``tokenizer_config.json``, ``special_tokens_map.json``). The official tokenizer is GPL-3 and is NOT
shipped with this package: pass its folder as ``tokenizer_dir`` (the folder of a downloaded checkpoint
or of deeplearningplus/tGPT's ``gpt2tokenizer``); it is copied into the new checkpoint, as the official
one sits in the official folder. Without it the ``tiny`` preset builds a stand-in tokenizer with the
same structure over the human gene symbols with an Ensembl ID in org.Hs.eg.db
(``engine/data/resources/human_genes.tsv.gz``) or over a ``genes`` list given in the config; the real-size
preset requires the real tokenizer.
LoRA acts on GPT-2's ``c_attn`` / ``c_proj`` ``Conv1D`` modules (PEFT needs ``fan_in_fan_out=True`` for
them and sets it itself with a warning); scDrugMap's tGPT fine-tuning script used ``c_attn`` only.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from ..data.gene_ids import ensembl_to_symbols, gene_table
from ..errors import UserError
from ..fsutil import atomic_file, write_json
from .base import CellTokenizer, FoundationModel, pad_tokens, register
from .checkpoint import check_state, materialize, read_state_dict
from .contract import (
    MIN_COVERAGE,
    AttributionAdapter,
    check_coverage,
    eager_attention,
    positive_int,
    received_attention,
)

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
TORCH_FILE = "pytorch_model.bin"
SAFETENSORS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
TOKENIZER_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_FILE)
#: the original's ``max_len``: 62 genes + ``</b>`` + ``</s>``
DEFAULT_MAX_LEN = 64
SPECIALS = {"pad": "<pad>", "bos": "</b>", "eos": "</s>", "unk": "<unk>"}

#: GPT2Config as tGPT's train.py builds it (GPT-2 defaults + its four settings); vocab_size and the
#: special token ids come from the tokenizer when a checkpoint is written
_REAL: dict[str, Any] = {
    "model_type": "gpt2",
    "architectures": ["GPT2LMHeadModel"],
    "vocab_size": 21150,
    "n_positions": 1024,
    "n_embd": 1024,
    "n_layer": 8,
    "n_head": 16,
    "n_inner": None,
    "activation_function": "gelu_new",
    "resid_pdrop": 0.1,
    "embd_pdrop": 0.1,
    "attn_pdrop": 0.1,
    "layer_norm_epsilon": 1e-05,
    "initializer_range": 0.02,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "use_cache": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
#: a toy body (tests run in seconds on a CPU); 64 positions are all the original's max_len needs
_TINY: dict[str, Any] = {**_REAL, "n_positions": 64, "n_embd": 64, "n_layer": 2, "n_head": 2}

# symbols: the original's LineDataset rewriting, and the Whitespace pre-tokeniser's word rule
_REWRITE = re.compile(r"[-.]")
_WHITESPACE_WORDS = re.compile(r"\w+|[^\w\s]+")
# on rewritten symbols (MT-CO1 -> MT_CO1); ribosomal protein genes, not their paralogs/pseudogenes
_MITO = re.compile(r"^MT_")
_RIBO = re.compile(r"^(RP[LS]\d+[AXY]?\d*|RPLP[0-2]|RPSA)$")
_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d+(\.\d+)?$")
# transformers 4.x persistent buffers (causal mask, -1e4): in old pytorch_model.bin files
_LEGACY_BUFFER = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")
_LM_HEAD = "lm_head.weight"
_PREFIX = "transformer."


# ------------------------------------------------------------------------------------------- vocabulary


@dataclass(frozen=True)
class TgptVocabulary:
    """What this file needs of a tGPT ``tokenizer.json`` (WordLevel, Whitespace, template)."""

    vocab: dict[str, int]
    unk_id: int
    pad_id: int
    prefix: tuple[int, ...]  # template tokens before the genes (``</b>``)
    suffix: tuple[int, ...]  # and after them (``</s>``)
    split: str  # "whitespace" (\w+ | punctuation runs) or "whitespace_split" (on spaces only)

    @property
    def size(self) -> int:
        return max(self.vocab.values()) + 1

    def words(self, symbol: str) -> list[str]:
        """The words the original's tokenizer sees for one (already rewritten) symbol."""
        if self.split == "whitespace":
            return _WHITESPACE_WORDS.findall(symbol)
        return symbol.split()

    def encode_symbol(self, symbol: str) -> list[int]:
        return [self.vocab.get(w, self.unk_id) for w in self.words(symbol)]


def _token_name(entry: Any) -> str | None:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("content"), str):
        return entry["content"]
    return None


def _read_json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"tGPT {path} is not readable JSON ({err})") from None


def _template_ids(post: Any, vocab: dict[str, int], path: Path) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Special token ids the post-processor puts before / after a single sequence."""
    if post is None:
        return (), ()
    if not isinstance(post, dict) or post.get("type") != "TemplateProcessing":
        raise UserError(
            f"tGPT {path}: post_processor {post.get('type') if isinstance(post, dict) else post!r} is not supported "
            "(the official tokenizer uses TemplateProcessing: </b> $A </s>)"
        )
    specials = post.get("special_tokens") or {}
    before: list[int] = []
    after: list[int] = []
    seen_sequence = False
    for item in post.get("single") or []:
        if "Sequence" in item:
            seen_sequence = True
            continue
        name = (item.get("SpecialToken") or {}).get("id")
        ids = (specials.get(name) or {}).get("ids")
        if ids is None:
            ids = [vocab[name]] if name in vocab else None
        if ids is None:
            raise UserError(f"tGPT {path}: template token {name!r} has no id")
        (after if seen_sequence else before).extend(int(i) for i in ids)
    return tuple(before), tuple(after)


@functools.lru_cache(maxsize=8)
def _read_vocabulary(path_str: str, _stamp: tuple[int, int]) -> TgptVocabulary:
    folder = Path(path_str)
    path = folder / TOKENIZER_FILE
    doc = _read_json_file(path)
    model = doc.get("model") if isinstance(doc, dict) else None
    if not isinstance(model, dict) or model.get("type") != "WordLevel" or not isinstance(model.get("vocab"), dict):
        raise UserError(
            f"tGPT {path} is not a WordLevel tokenizer (tGPT's tokenizer.json maps gene symbols to ids with a "
            "WordLevel model); is this another model's tokenizer?"
        )
    vocab = {str(k): int(v) for k, v in model["vocab"].items()}
    for added in doc.get("added_tokens") or []:
        if isinstance(added, dict) and isinstance(added.get("content"), str):
            vocab.setdefault(added["content"], int(added["id"]))
    if doc.get("normalizer") is not None:
        raise UserError(f"tGPT {path}: a normalizer is set; the official tokenizer has none (not supported)")
    pre = doc.get("pre_tokenizer")
    kind = pre.get("type") if isinstance(pre, dict) else None
    if kind not in ("Whitespace", "WhitespaceSplit"):
        raise UserError(
            f"tGPT {path}: pre_tokenizer {kind!r} is not supported (the official tokenizer uses Whitespace)"
        )
    unk = model.get("unk_token") or SPECIALS["unk"]
    if unk not in vocab:
        raise UserError(f"tGPT {path}: the unknown token {unk!r} is not in the vocabulary")
    pad = SPECIALS["pad"]
    for extra in (SPECIAL_TOKENS_FILE, TOKENIZER_CONFIG_FILE):
        if (folder / extra).is_file():
            meta = _read_json_file(folder / extra)
            name = _token_name(meta.get("pad_token")) if isinstance(meta, dict) else None
            if name:
                pad = name
                break
    if pad not in vocab:
        raise UserError(f"tGPT {path}: the padding token {pad!r} is not in the vocabulary")
    prefix, suffix = _template_ids(doc.get("post_processor"), vocab, path)
    return TgptVocabulary(
        vocab=vocab,
        unk_id=vocab[unk],
        pad_id=vocab[pad],
        prefix=prefix,
        suffix=suffix,
        split="whitespace" if kind == "Whitespace" else "whitespace_split",
    )


def read_vocabulary(folder: Path) -> TgptVocabulary:
    """The tokenizer of a tGPT checkpoint folder (``tokenizer.json`` + special token files)."""
    path = Path(folder) / TOKENIZER_FILE
    if not path.is_file():
        raise UserError(
            f"{folder} has no {TOKENIZER_FILE}: a tGPT checkpoint folder holds the tokenizer files "
            f"({', '.join(TOKENIZER_FILES)}) beside {CONFIG_FILE} and {TORCH_FILE}, as "
            "lixiangchun/transcriptome-gpt-1024-8-16-64 does"
        )
    st = path.stat()
    return _read_vocabulary(str(path.parent.resolve()), (st.st_mtime_ns, st.st_size))


def rewrite_symbol(symbol: str) -> str:
    """The original's ``LineDataset`` rewriting: ``-`` and ``.`` become ``_``."""
    return _REWRITE.sub("_", symbol)


def is_excluded(rewritten: str, rule: str) -> bool:
    """Is a (rewritten) symbol left out of the ranking by ``exclude_genes``?"""
    if rule == "none":
        return False
    return bool(_MITO.match(rewritten) or _RIBO.match(rewritten))


def _present(x: Any) -> bool:
    return isinstance(x, str) and bool(x.strip())


def store_symbols(genes: pd.DataFrame) -> list[str | None]:
    """The gene symbol of every store gene (position order); Ensembl IDs in place of symbols, or a
    missing symbol with an Ensembl ID, are named through org.Hs.eg.db."""
    table = genes.sort_values("position")
    syms = table["symbol"].tolist()
    ens = table["ensembl_id"].tolist() if "ensembl_id" in table else [None] * len(syms)
    out: list[str | None] = []
    need: list[int] = []
    for i, (s, e) in enumerate(zip(syms, ens, strict=True)):
        s = s.strip() if _present(s) else None
        if s is not None and not _ENSEMBL.match(s):
            out.append(s)
            continue
        out.append(None)
        eid = e.strip() if _present(e) else s
        if eid is not None and _ENSEMBL.match(eid):
            need.append(i)
    if need:
        mapped = ensembl_to_symbols([(ens[i] if _present(ens[i]) else syms[i]).strip() for i in need])
        for i, m in zip(need, mapped, strict=True):
            out[i] = m
    return out


# ------------------------------------------------------------------------------------------- tokenizer


class TgptTokenizer(CellTokenizer):
    """Store cells -> tGPT sentences as token ids: ``input_ids`` (int32: ``</b>``, the top genes by
    expression, highest first, ``</s>``)."""

    def __init__(
        self,
        genes: pd.DataFrame,
        vocab: TgptVocabulary,
        max_len: int = DEFAULT_MAX_LEN,
        exclude_genes: str = "mito_ribo",
        unknown_genes: str = "unk",
        min_coverage: float = MIN_COVERAGE,
    ) -> None:
        table = genes.sort_values("position")
        positions = table["position"].to_numpy(dtype=np.int64)
        symbols = store_symbols(genes)
        n_positions = int(positions.max()) + 1 if len(positions) else 0
        self.prefix = np.asarray(vocab.prefix, dtype=np.int32)
        self.suffix = np.asarray(vocab.suffix, dtype=np.int32)
        self.budget = int(max_len) - len(self.prefix) - len(self.suffix)  # gene tokens per cell
        if self.budget < 1:
            raise UserError(f"tgpt max_len={max_len} leaves no room for genes beside the special tokens")
        offsets = np.zeros(n_positions + 1, dtype=np.int64)
        pieces: list[list[int]] = [[] for _ in range(n_positions)]
        self.keep = np.zeros(n_positions, dtype=bool)
        n_known = n_excluded = n_unknown = 0
        for pos, sym in zip(positions.tolist(), symbols, strict=True):
            words = vocab.words(rewrite_symbol(sym)) if sym is not None else []
            ids = [vocab.vocab.get(w, vocab.unk_id) for w in words]
            known = bool(words) and all(w in vocab.vocab for w in words)
            n_known += known
            if sym is not None and is_excluded(rewrite_symbol(sym), exclude_genes):
                n_excluded += 1
                continue
            if not known:
                n_unknown += 1
                if unknown_genes == "drop":
                    continue
                # no usable name (no symbol, an ID without a symbol): one <unk>, as the ID would give
                ids = ids or [vocab.unk_id]
            pieces[pos] = ids
            self.keep[pos] = True
        offsets[1:] = np.cumsum([len(p) for p in pieces])
        self.offsets = offsets
        self.flat = np.asarray([t for p in pieces for t in p], dtype=np.int32)
        counts = np.diff(offsets)
        self.single = np.full(n_positions, -1, dtype=np.int32)  # the token of a one-word gene
        one = counts == 1
        self.single[one] = self.flat[offsets[:-1][one]]
        self.multi = bool((counts[self.keep] > 1).any()) if n_positions else False
        n = len(positions)
        self.coverage = n_known / n if n else 0.0
        self.report = {
            "n_store_genes": n,
            "n_in_vocabulary": n_known,
            "coverage": self.coverage,
            "n_excluded": n_excluded,
            "n_unknown_kept_as_unk": n_unknown if unknown_genes == "unk" else 0,
            "n_unknown_dropped": n_unknown if unknown_genes == "drop" else 0,
            "vocabulary_size": vocab.size,
            "max_len": int(max_len),
        }
        check_coverage(self.coverage, n, "are in tGPT's vocabulary", table["symbol"].head(3).tolist(),
                       "tGPT needs human HGNC gene symbols: mouse data or another gene ID type does not match",
                       min_coverage)

    def tokenize_cell(self, gene_index: np.ndarray, values: np.ndarray) -> np.ndarray:
        gi = np.asarray(gene_index, dtype=np.int64)
        x = np.asarray(values, dtype=np.float64)
        sel = self.keep[gi] & (x > 0)
        gi, x = gi[sel], x[sel]
        k = self.budget  # every gene gives at least one token: the top `budget` genes suffice
        if len(x) > k:
            kth = np.partition(x, len(x) - k)[len(x) - k]
            cand = x >= kth  # all genes tied with the k-th largest stay in the race
            gi, x = gi[cand], x[cand]
        ranked = gi[np.lexsort((gi, -x))]  # descending value; ties in store order
        if not self.multi:
            genes = self.single[ranked[:k]]
        else:
            parts = [self.flat[self.offsets[p] : self.offsets[p + 1]] for p in ranked[:k]]
            genes = np.concatenate(parts)[:k] if parts else np.zeros(0, dtype=np.int32)
        return np.concatenate([self.prefix, genes, self.suffix]).astype(np.int32, copy=False)

    def __call__(
        self, cell_ids: np.ndarray, gene_index: list[np.ndarray], values: list[np.ndarray]
    ) -> dict[str, list[np.ndarray]]:
        return {"input_ids": [self.tokenize_cell(gi, v) for gi, v in zip(gene_index, values, strict=True)]}


# ---------------------------------------------------------------------------------------------- config


def validate_config(cfg: dict[str, Any], where: str = CONFIG_FILE) -> dict[str, Any]:
    """Check a tGPT (GPT-2) config dict; returns it."""
    if cfg.get("model_type", "gpt2") != "gpt2":
        raise UserError(
            f"tGPT {where}: model_type {cfg.get('model_type')!r} is not 'gpt2'; a tGPT checkpoint is a Hugging Face "
            "GPT2LMHeadModel folder (lixiangchun/transcriptome-gpt-1024-8-16-64)"
        )
    archs = cfg.get("architectures")
    if archs and not {"GPT2LMHeadModel", "GPT2Model"} & set(archs):
        raise UserError(
            f"tGPT {where}: architectures {archs} are neither GPT2LMHeadModel nor GPT2Model; only the pretrained "
            "tGPT model (not a fine-tuned classifier) is supported"
        )
    for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
        positive_int(cfg, key, f"tGPT {where}")
    if cfg["n_embd"] % cfg["n_head"]:
        raise UserError(f"tGPT {where}: n_embd {cfg['n_embd']} is not a multiple of n_head {cfg['n_head']}")
    if cfg.get("add_cross_attention"):
        raise UserError(f"tGPT {where}: add_cross_attention is set; tGPT is a plain decoder")
    return cfg


def gpt2_config(cfg: dict[str, Any]) -> Any:
    from transformers import GPT2Config

    clean = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "transformers_version")}
    return GPT2Config.from_dict(clean)


def build_body(cfg: dict[str, Any], device: Any = None) -> Any:
    """The GPT-2 body (``GPT2Model``) with SDPA attention; on ``device`` ("meta": shapes only)."""
    import torch
    from transformers import GPT2Model

    with torch.device(device or "cpu"):
        return GPT2Model._from_config(gpt2_config(cfg), attn_implementation="sdpa")


def check_state_dict(state: dict[str, Any], shapes: dict[str, tuple[int, ...]], path: Path) -> dict[str, Any]:
    """The GPT-2 body's state dict (``transformer.`` prefix removed) through the one loading rule of every
    model (``checkpoint.check_state``): every body key with its shape; the tied LM head
    (``lm_head.weight``) and the legacy attention buffers of transformers-4.x files (``h.N.attn.bias`` /
    ``h.N.attn.masked_bias``) skipped and named in one log line; anything else is an error."""
    prefixed = any(str(k).startswith(_PREFIX) for k in state)
    prefix = _PREFIX if prefixed else ""
    expected = {prefix + k: v for k, v in shapes.items()}
    legacy = re.compile(re.escape(prefix) + _LEGACY_BUFFER.pattern.lstrip("^"))
    skip = (lambda k: k == _LM_HEAD or bool(legacy.match(k))) if prefixed else (lambda k: bool(legacy.match(k)))
    kept = check_state(state, expected, f"tGPT checkpoint {path}", "the GPT-2 model of its config.json", "config.json",
                       skip=skip)
    return {k[len(prefix):]: v for k, v in kept.items()}


# ---------------------------------------------------------------------------------------------- model


def tgpt_lookup(fm: Any, tok: Any) -> np.ndarray:
    # one-word genes only (a multi-word symbol spreads over several tokens); <unk> is no particular gene
    single = np.asarray(tok.single, dtype=np.int64)
    return np.where(single == fm.vocabulary().unk_id, -1, single)


def tgpt_attention(fm: Any, module: Any, batch: dict[str, Any]) -> Any:
    """Attention each token receives in the last layer (eager softmax)."""
    body = getattr(module, "transformer", module)
    with eager_attention(body.config):
        out = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                   output_attentions=True)
    return received_attention(out.attentions[-1].float(), batch["attention_mask"])


@register
class TgptModel(FoundationModel):
    """tGPT: the top expressed genes of a cell as a sentence of gene symbols, GPT-2, mean over genes."""

    name: ClassVar[str] = "tgpt"
    presets: ClassVar[dict[str, dict[str, Any]]] = {"tiny": _TINY, "1024-8-16-64": _REAL}
    # PEFT matches module-name suffixes: h.N.attn.c_attn (q/k/v), h.N.attn.c_proj and h.N.mlp.c_proj
    lora_targets: ClassVar[list[str]] = ["c_attn", "c_proj"]
    #: gene-as-token: the gene-token embedding; baseline = the padding token at every gene token
    attribution_adapter = AttributionAdapter(layer=lambda m: getattr(m, "transformer", m).wte, lookup=tgpt_lookup,
                                            attention=tgpt_attention)
    default_options: ClassVar[dict[str, Any]] = {
        "checkpoint": None,
        "preset": None,
        "max_len": DEFAULT_MAX_LEN,  # tokens per cell incl. </b> and </s> (the original's max_len)
        "exclude_genes": "none",  # none (upstream: every expressed gene is ranked) | mito_ribo
        "unknown_genes": "unk",  # unk (as the original's tokenizer) | drop
        "min_coverage": MIN_COVERAGE,
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        if isinstance(o["max_len"], bool) or not isinstance(o["max_len"], int) or o["max_len"] < 3:
            raise UserError(f"tgpt option max_len={o['max_len']!r}: use an integer >= 3 (the original uses 64)")
        if o["exclude_genes"] not in ("mito_ribo", "none"):
            raise UserError(f"tgpt option exclude_genes={o['exclude_genes']!r}: use mito_ribo or none")
        if o["unknown_genes"] not in ("unk", "drop"):
            raise UserError(f"tgpt option unknown_genes={o['unknown_genes']!r}: use unk or drop")
        mc = o["min_coverage"]
        if isinstance(mc, bool) or not isinstance(mc, int | float) or not 0 <= mc <= 1:
            raise UserError(f"tgpt option min_coverage={mc!r}: use a fraction between 0 and 1")
        self._config: dict[str, Any] | None = None

    # -- checkpoint facts -------------------------------------------------------------------------

    @staticmethod
    def _format_hint(ckpt: Path) -> str:
        found = ", ".join(sorted(p.name for p in ckpt.iterdir())[:8]) or "nothing"
        return (
            f"{ckpt} is not a tGPT checkpoint: expected {CONFIG_FILE}, {TORCH_FILE} (or {SAFETENSORS_FILE}) and "
            f"{TOKENIZER_FILE}, as in lixiangchun/transcriptome-gpt-1024-8-16-64; found: {found}"
        )

    def config(self) -> dict[str, Any]:
        """The checkpoint's config.json (validated)."""
        if self._config is None:
            ckpt = self.checkpoint_dir()
            path = ckpt / CONFIG_FILE
            if not path.is_file():
                raise UserError(self._format_hint(ckpt))
            cfg = _read_json_file(path)
            if not isinstance(cfg, dict):
                raise UserError(f"tGPT {path} does not hold a JSON object")
            self._config = validate_config(cfg, str(path))
        return self._config

    def vocabulary(self) -> TgptVocabulary:
        ckpt = self.checkpoint_dir()
        if not (ckpt / TOKENIZER_FILE).is_file():
            raise UserError(self._format_hint(ckpt))
        vocab = read_vocabulary(ckpt)
        n = self.config()["vocab_size"]
        if vocab.size > n:
            raise UserError(
                f"tGPT checkpoint {ckpt}: {TOKENIZER_FILE} has ids up to {vocab.size - 1} but config.json vocab_size "
                f"is {n}; the tokenizer belongs to another model"
            )
        return vocab

    @property
    def max_length(self) -> int:
        max_len = int(self.options["max_len"])
        n_positions = int(self.config()["n_positions"])
        if max_len > n_positions:
            raise UserError(f"tgpt option max_len={max_len} exceeds the model's n_positions ({n_positions})")
        return max_len

    @property
    def embedding_dim(self) -> int:
        return int(self.config()["n_embd"])

    # -- tokenizer -------------------------------------------------------------------------------

    def _tokenizer(self, genes: pd.DataFrame, min_coverage: float) -> TgptTokenizer:
        o = self.options
        return TgptTokenizer(genes, self.vocabulary(), self.max_length, o["exclude_genes"], o["unknown_genes"],
                             min_coverage)

    def make_tokenizer(self, genes: pd.DataFrame) -> TgptTokenizer:
        tok = self._tokenizer(genes, float(self.options["min_coverage"]))
        r = tok.report
        log.info(
            "tgpt: %d of %d store genes in the vocabulary (%.1f%%); %d excluded (%s), %d unknown (%s)",
            r["n_in_vocabulary"], r["n_store_genes"], 100 * r["coverage"], r["n_excluded"],
            self.options["exclude_genes"], r["n_unknown_kept_as_unk"] + r["n_unknown_dropped"],
            self.options["unknown_genes"],
        )
        return tok

    def vocabulary_coverage(self, genes: pd.DataFrame) -> dict[str, Any]:
        """How a store's genes meet the vocabulary, without the coverage threshold."""
        return self._tokenizer(genes, 0.0).report

    # -- batches ---------------------------------------------------------------------------------

    def collate(self, rows: dict[str, list[np.ndarray]], pad_to: int | None = None) -> dict[str, Any]:
        return pad_tokens(rows["input_ids"], self.vocabulary().pad_id, pad_to)  # right padding, as the original

    # -- weights ---------------------------------------------------------------------------------

    def load(self, device: str = "cpu", dtype: Any = None) -> Any:
        import torch

        dtype = self.weights_dtype(device, dtype)  # option dtype: upstream precision by default
        ckpt = self.checkpoint_dir()
        cfg = self.config()
        _ = self.vocabulary(), self.max_length  # refuse a bad tokenizer or option before reading weights
        for name in (SAFETENSORS_FILE, TORCH_FILE):
            if (ckpt / name).is_file():
                path = ckpt / name
                break
        else:
            raise UserError(self._format_hint(ckpt))
        state = read_state_dict(path)
        module = build_body(cfg, device="meta")
        shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        body = check_state_dict(state, shapes, path)
        # the file's tensors as they are (memory-mapped for .bin): no copy, no random init
        return materialize(lambda: build_body(cfg), body, device, dtype or torch.float32)

    def embed(self, module: Any, batch: dict[str, Any]) -> Any:
        import torch

        body = getattr(module, "transformer", module)  # a GPT2LMHeadModel works too
        hidden = body(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).last_hidden_state.float()
        vocab = self.vocabulary()
        start = len(vocab.prefix)
        stop = batch["lengths"].to(hidden.device) - len(vocab.suffix)
        n_genes = (stop - start).clamp(min=0)
        pos = torch.arange(hidden.shape[1], device=hidden.device)
        genes = (pos[None, :] >= start) & (pos[None, :] < stop[:, None])
        summed = (hidden * genes[..., None].to(hidden.dtype)).sum(dim=1)
        # the original: hidden[1 : eos].mean(0); a cell without gene tokens gets zeros (not NaN)
        return summed / n_genes.clamp(min=1)[:, None].to(hidden.dtype)

    # -- random checkpoints ----------------------------------------------------------------------

    @classmethod
    def init_random(cls, out_dir: Path, preset: str = "tiny", config: dict[str, Any] | None = None, *,
                    tokenizer_dir: str | Path | None = None) -> Path:
        """A random-weight checkpoint in the official folder layout.

        ``config`` overrides the preset's GPT-2 settings and may hold ``tokenizer_dir`` (a folder with the
        official tokenizer files, copied in), ``genes`` (symbols for a stand-in tokenizer when there is no
        ``tokenizer_dir``; tiny preset only) and ``seed`` (default 0).
        """
        import torch
        from transformers import GPT2LMHeadModel

        if preset not in cls.presets:
            raise UserError(f"model 'tgpt' has no preset {preset!r}; presets: {', '.join(cls.presets)}")
        overrides = dict(config or {})
        tok_src = overrides.pop("tokenizer_dir", None) or tokenizer_dir
        gene_list = overrides.pop("genes", None)
        seed = overrides.pop("seed", 0)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if tok_src is not None:
            src = Path(tok_src)
            missing = [f for f in TOKENIZER_FILES if not (src / f).is_file()]
            if missing:
                raise UserError(
                    f"tgpt tokenizer_dir {src} lacks {', '.join(missing)}; give the folder of a downloaded tGPT "
                    "checkpoint (or deeplearningplus/tGPT's gpt2tokenizer/)"
                )
            read_vocabulary(src)  # refuse a foreign tokenizer before writing anything
            for f in TOKENIZER_FILES:
                shutil.copyfile(src / f, out_dir / f)
            tokenizer_note = f"copied from {src}"
        elif preset == "tiny":
            n = write_standin_tokenizer(out_dir, gene_list)
            tokenizer_note = f"stand-in WordLevel tokenizer over {n} human gene symbols, NOT tGPT's vocabulary"
        else:
            raise UserError(
                f"tgpt preset {preset!r} needs the real tGPT tokenizer, which this package does not ship (GPL-3): "
                "pass a config with tokenizer_dir: the folder of a downloaded tGPT checkpoint (tokenizer.json, "
                "tokenizer_config.json, special_tokens_map.json)"
            )
        vocab = read_vocabulary(out_dir)
        cfg = {**cls.presets[preset], **overrides}
        # as tGPT's train.py: vocab_size and the special ids of the tokenizer
        cfg["vocab_size"] = vocab.size
        cfg["pad_token_id"] = vocab.pad_id
        if vocab.prefix:
            cfg["bos_token_id"] = vocab.prefix[0]
        if vocab.suffix:
            cfg["eos_token_id"] = vocab.suffix[-1]
        cfg = validate_config(cfg, f"preset {preset!r} config")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            module = GPT2LMHeadModel._from_config(gpt2_config(cfg), attn_implementation="sdpa")
        # the layout of the official pytorch_model.bin (torch.save of a transformers-4.x state dict): the
        # tied lm_head shares storage with wte, and each layer's causal-mask buffers are included
        state: dict[str, Any] = {}
        n_pos = int(cfg["n_positions"])
        causal = torch.tril(torch.ones((n_pos, n_pos), dtype=torch.uint8)).view(1, 1, n_pos, n_pos)
        for key, val in module.state_dict().items():
            state[key] = val.detach()
            m = re.match(r"^transformer\.h\.(\d+)\.ln_1\.weight$", key)
            if m:
                state[f"transformer.h.{m.group(1)}.attn.bias"] = causal.clone()
                state[f"transformer.h.{m.group(1)}.attn.masked_bias"] = torch.tensor(-1e4)
        assert state[_LM_HEAD].data_ptr() == state["transformer.wte.weight"].data_ptr()
        with atomic_file(out_dir / TORCH_FILE) as tmp:
            torch.save(state, tmp)
        write_json(out_dir / CONFIG_FILE, cfg)
        cls.mark_random(out_dir, preset, tokenizer=tokenizer_note)
        n_params = sum(math.prod(p.shape) for p in module.parameters())
        log.info("tgpt: wrote random %s checkpoint (%.1fM parameters; tokenizer %s) to %s", preset, n_params / 1e6,
                 tokenizer_note, out_dir)
        return out_dir


def write_standin_tokenizer(out_dir: Path, genes: list[str] | None = None) -> int:
    """Write tokenizer files with the official structure (WordLevel, Whitespace, ``</b> $A </s>``,
    ``<pad>``/``</b>``/``</s>``/``<unk>`` = 0-3) over ``genes`` or org.Hs.eg.db's symbols with an Ensembl ID;
    returns the number of gene tokens. For tests and demos without the (GPL-3) official tokenizer."""
    if genes is None:  # the symbols of genes with an Ensembl ID: ~36,600, about the real vocabulary's size
        genes = gene_table().dropna(subset=["ensembl_id"])["symbol"].dropna().tolist()
    words = sorted({rewrite_symbol(str(g).strip()) for g in genes if _present(g)})
    words = [w for w in words if re.fullmatch(r"\w+", w) and w not in SPECIALS.values()]
    if not words:
        raise UserError("tgpt stand-in tokenizer: the genes list has no usable gene symbol")
    specials = [SPECIALS["pad"], SPECIALS["bos"], SPECIALS["eos"], SPECIALS["unk"]]
    vocab = {tok: i for i, tok in enumerate([*specials, *words])}
    doc = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "special": True, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False}
            for i, t in enumerate(specials)
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": SPECIALS["bos"], "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": SPECIALS["eos"], "type_id": 0}},
            ],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {t: {"id": t, "ids": [vocab[t]], "tokens": [t]} for t in specials},
        },
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": SPECIALS["unk"]},
    }
    (out_dir / TOKENIZER_FILE).write_text(json.dumps(doc, ensure_ascii=False))
    token_map = {"bos_token": SPECIALS["bos"], "eos_token": SPECIALS["eos"], "unk_token": SPECIALS["unk"],
                 "pad_token": SPECIALS["pad"]}
    write_json(out_dir / SPECIAL_TOKENS_FILE, token_map)
    write_json(out_dir / TOKENIZER_CONFIG_FILE,
               {**token_map, "model_max_length": 1024, "tokenizer_class": "PreTrainedTokenizerFast"})
    return len(words)
