"""Geneformer (HF ``BertForMaskedLM``) cell embeddings, V1 (gc30M) and V2 (gc104M).

What the original does (ctheodoris/Geneformer: ``geneformer/tokenizer.py`` ``TranscriptomeTokenizer``
with ``tokenize_anndata``, ``geneformer/emb_extractor.py`` ``EmbExtractor`` / ``get_embs``,
``geneformer/perturber_utils.py``; read in the public mirrors of the gc104M-era code):

* Genes: ``var["ensembl_id"]`` is upper-cased and mapped through ``ensembl_mapping_dict`` (filtered to
  values in the token dictionary). For V2 that dictionary also has upper-cased gene SYMBOLS as keys, so
  symbols in the ``ensembl_id`` column work there; V1's is the identity on its 25,424 IDs. When two
  input genes map to one ID their counts are summed (``collapse_gene_ids=True``). Genes without a
  token are dropped.
* Rank value encoding per cell: ``X / obs["n_counts"] * 10,000 / gene_median`` (``n_counts`` is the
  cell's total count, over all genes, given by the user), non-zero genes only, ranked by that value
  descending (``np.argsort(-values)``), mapped to token ids, truncated to ``model_input_size`` (V1:
  2,048, no special tokens; V2: 4,096 including ``<cls>`` first and ``<eos>`` last, i.e. 4,094 genes).
  Cells without any known gene are dropped with a warning.
* Embedding: ``BertForMaskedLM.from_pretrained(..., output_hidden_states=True)``, eval mode, batches
  padded with ``<pad>`` (0) to the longest cell of the mini-batch, with an attention mask;
  ``hidden_states[n_layers + emb_layer]`` (``emb_layer`` -1 = the second-to-last layer, the default;
  0 = the last layer). ``emb_mode="cell"``: mean over the non-pad tokens, excluding ``<cls>`` and
  ``<eos>`` when the token dictionary has them (V2); ``emb_mode="cls"``: the ``<cls>`` token's state.

Where this file follows it: the same dictionaries (converted once from the official pickles into
``resources/geneformer/*.json.gz`` by ``tools/convert_geneformer_dictionaries.py``; see the README
there), the same normalisation (float64, same operation order), ranking, truncation, special tokens,
layer choice, masks and pooling, and the official checkpoint files (``config.json`` +
``model.safetensors`` or ``pytorch_model.bin``, keys of ``BertForMaskedLM``).

Where it differs, and why:

* Store genes: the store's ``ensembl_id`` (upper-cased, a version suffix such as ``.12`` removed) goes
  through ``ensembl_mapping`` as in the original. Genes with NO Ensembl ID in the store are looked up
  by symbol: upper-cased in ``ensembl_mapping`` (what V2 does with symbols), then through Geneformer's
  own ``gene_name_id_dict``. A gene whose Ensembl ID is not in the vocabulary is dropped even if its
  symbol is known, as the original would.
* Duplicates: store genes that resolve to one token are always summed (the original sums them only
  when some collapse is needed and otherwise keeps both, giving a token twice); the summed genes are
  ranked as columns after the unique ones, as the original's collapse branch lays them out.
* Ties (exactly equal normalised values) keep that column order (stable sort); numpy's default
  ``argsort`` in the original orders ties in an implementation- and CPU-dependent way.
* ``n_counts`` is the store's total of the cell's values (all genes), what ``obs["n_counts"]`` is by
  convention.
* A cell with no known gene is kept (one output row per cell): it gets a zero embedding for mean
  pooling (V2 ``cls`` pooling still returns the ``<cls>`` state of ``[<cls>, <eos>]``).
* Only the first ``n_layers + emb_layer`` layers are run (a view of the module, no copy of weights):
  the requested hidden state is the same, the unused last layer costs nothing. Attention runs through
  PyTorch SDPA (``attn_implementation="sdpa"``) instead of the eager softmax: the same math.
* ``emb_layer`` may be any of ``-n_layers .. 0`` (the original allows -1 and 0). ``pooling="auto"`` (the
  default) is what ``EmbExtractor`` does by default: ``emb_mode="cls"`` for V2, switched to ``"cell"``
  (mean over genes) for V1; ``pooling: mean`` gives the mean for V2 too (the default before issue 15).
* Loading is strict where it matters (``from_pretrained`` silently fills missing keys with random
  values): every ``bert.*`` key of the encoder (what a cell embedding runs) must be in the file with its
  shape. What the released ``BertForMaskedLM`` files carry beside it (the MLM head ``cls.predictions.*``,
  with or without the tied decoder), what fine-tuned ``BertForSequenceClassification`` files carry
  (``bert.pooler.*``, ``classifier.*``: EmbExtractor's "CellClassifier" models) and the legacy buffers of
  old (transformers 4.6) files are skipped and named in one log line; any other key is an error. The
  module loaded is the ``BertModel`` (no pooler).
"""

from __future__ import annotations

import copy
import functools
import gzip
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

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

RESOURCES = Path(__file__).parent / "resources" / "geneformer"
CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
TORCH_FILE = "pytorch_model.bin"
DICTIONARY_FILES = {"V1": "geneformer_gc30M.json.gz", "V2": "geneformer_gc104M.json.gz"}
#: official vocabulary sizes (token dictionary incl. special tokens) -> model version
VOCAB_VERSIONS = {25_426: "V1", 20_275: "V2"}
TARGET_SUM = 10_000.0
#: tied to word embeddings / the MLM bias: present in torch.save files, dropped by save_pretrained
TIED_KEYS = {
    "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
    "cls.predictions.decoder.bias": "cls.predictions.bias",
}
#: persistent buffers of old transformers versions (the V1 models were saved with 4.6): ignored
LEGACY_BUFFERS = ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids")
ENCODER_PREFIX = "bert."
#: what released / fine-tuned Geneformer files carry that a cell embedding never runs: the MLM head
#: (``cls.predictions.*``, tied decoder included: pretrained BertForMaskedLM files), the pooler and the
#: classifier (BertForSequenceClassification files, EmbExtractor's model_type "CellClassifier") and legacy
#: buffers. Skipped and named in one log line (checkpoint.check_state); any other key is an error.
SKIPPED_KEYS = (r"cls\.", r"bert\.pooler\.", r"classifier\.", *(re.escape(k) + "$" for k in LEGACY_BUFFERS))
_VERSION_SUFFIX = re.compile(r"^(ENS[A-Z]*\d+)\.\d+$")


def _read_json(path: Path) -> dict[str, Any]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return json.load(fh)


def _official_config(file: str) -> dict[str, Any]:
    return _read_json(RESOURCES / file)


def _tiny(base: dict[str, Any]) -> dict[str, Any]:
    # the real vocabulary and input size, a toy encoder: tests run in seconds on a CPU
    return {**base, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}


_V1_10M = _official_config("Geneformer-V1-10M.config.json")
_V2_104M = _official_config("Geneformer-V2-104M.config.json")


# ----------------------------------------------------------------------------------------- dictionaries


@dataclass(frozen=True)
class GeneDictionaries:
    """Geneformer's tokenizer dictionaries of one model version (see resources/geneformer/README.md)."""

    version: str
    tokens: dict[str, int]  # Ensembl ID or special token -> token id
    median: dict[str, float]  # Ensembl ID -> non-zero median (gene normalisation factor)
    mapping: dict[str, str]  # upper-cased Ensembl ID (V2: or symbol) -> Ensembl ID in `tokens`
    name_id: dict[str, str]  # gene symbol -> Ensembl ID

    @property
    def special(self) -> bool:
        return "<cls>" in self.tokens and "<eos>" in self.tokens

    @property
    def pad_id(self) -> int:
        return self.tokens["<pad>"]


@functools.lru_cache(maxsize=2)
def load_dictionaries(version: str) -> GeneDictionaries:
    doc = _read_json(RESOURCES / DICTIONARY_FILES[version])
    return GeneDictionaries(
        version=version,
        tokens={k: int(v) for k, v in doc["token_dictionary"].items()},
        median={k: float(v) for k, v in doc["gene_median"].items()},
        mapping=dict(doc["ensembl_mapping"]),
        name_id=dict(doc["gene_name_id"]),
    )


def _present(x: Any) -> bool:
    return isinstance(x, str) and bool(x.strip())


def resolve_genes(genes: pd.DataFrame, dicts: GeneDictionaries) -> tuple[np.ndarray, list[str | None], np.ndarray]:
    """Per store gene (position order): its position, the Ensembl ID of its token (None: not in the
    vocabulary) and how it was found (0 none, 1 Ensembl ID, 2 symbol)."""
    table = genes.sort_values("position")
    positions = table["position"].to_numpy(dtype=np.int64)
    ens_col = table["ensembl_id"] if "ensembl_id" in table else pd.Series([None] * len(table))
    resolved: list[str | None] = []
    via = np.zeros(len(table), dtype=np.int8)
    for i, (eid, sym) in enumerate(zip(ens_col.tolist(), table["symbol"].tolist(), strict=True)):
        target = None
        if _present(eid):
            key = eid.strip().upper()
            m = _VERSION_SUFFIX.match(key)
            target = dicts.mapping.get(m.group(1) if m else key)
            via[i] = 1 if target else 0
        elif _present(sym):
            sym = sym.strip()
            target = dicts.mapping.get(sym.upper())
            if target is None and sym in dicts.name_id:
                target = dicts.mapping.get(dicts.name_id[sym].upper())
            via[i] = 2 if target else 0
        resolved.append(target)
    return positions, resolved, via


# ------------------------------------------------------------------------------------------- tokenizer


class GeneformerTokenizer(CellTokenizer):
    """Store cells -> Geneformer rank value encoding: ``input_ids`` (int32 token ids, highest
    normalised expression first; V2 wrapped in ``<cls>`` ... ``<eos>``)."""

    def __init__(self, genes: pd.DataFrame, dicts: GeneDictionaries, model_input_size: int,
                 min_coverage: float = MIN_COVERAGE) -> None:
        positions, resolved, via = resolve_genes(genes, dicts)
        n_positions = int(positions.max()) + 1 if len(positions) else 0
        # Columns in the original's collapsed layout: genes with a token of their own in store order,
        # then one summed column per token that several store genes share (first-occurrence order).
        hits: dict[str, list[int]] = {}
        for pos, ens in zip(positions.tolist(), resolved, strict=True):
            if ens is not None:
                hits.setdefault(ens, []).append(pos)
        unique = sorted((p[0], e) for e, p in hits.items() if len(p) == 1)
        shared = sorted((p[0], e) for e, p in hits.items() if len(p) > 1)
        self.col_of_pos = np.full(n_positions, -1, dtype=np.int32)
        col_ens: list[str] = []
        for pos, ens in unique:
            self.col_of_pos[pos] = len(col_ens)
            col_ens.append(ens)
        for _, ens in shared:
            self.col_of_pos[hits[ens]] = len(col_ens)
            col_ens.append(ens)
        self.has_shared = bool(shared)
        self.col_token = np.array([dicts.tokens[e] for e in col_ens], dtype=np.int32)
        self.col_median = np.array([dicts.median[e] for e in col_ens], dtype=np.float64)
        self.version = dicts.version
        self.special = dicts.special
        self.cls_id = dicts.tokens.get("<cls>", -1)
        self.eos_id = dicts.tokens.get("<eos>", -1)
        self.model_input_size = int(model_input_size)
        self.n_genes_max = self.model_input_size - 2 if self.special else self.model_input_size
        n = len(positions)
        n_known = int((via > 0).sum())
        self.coverage = n_known / n if n else 0.0
        self.report = {
            "version": dicts.version,
            "n_store_genes": n,
            "n_in_vocabulary": n_known,
            "coverage": self.coverage,
            "via_ensembl_id": int((via == 1).sum()),
            "via_symbol": int((via == 2).sum()),
            "n_tokens": len(col_ens),
            "n_summed_tokens": len(shared),
            "vocabulary_size": len(dicts.tokens),
        }
        head = genes.sort_values("position").head(3)
        examples = [f"{s}/{e}" if _present(e) else str(s)
                    for s, e in zip(head["symbol"], head.get("ensembl_id", head["symbol"]), strict=True)]
        check_coverage(self.coverage, n, f"are in Geneformer's {dicts.version} vocabulary", examples,
                       "Geneformer needs human genes with Ensembl IDs (ENSG...) or HGNC symbols: mouse data or "
                       "another gene ID type does not match", min_coverage)

    def tokenize_cell(self, gene_index: np.ndarray, values: np.ndarray) -> np.ndarray:
        x_all = np.asarray(values, dtype=np.float64)
        n_counts = float(x_all.sum())  # the cell's total over ALL genes, as obs["n_counts"]
        col = self.col_of_pos[np.asarray(gene_index, dtype=np.int64)]
        keep = (col >= 0) & (x_all != 0)
        col, x = col[keep], x_all[keep]
        if self.has_shared and len(col):
            order = np.argsort(col, kind="stable")
            col, x = col[order], x[order]
            starts = np.flatnonzero(np.r_[True, col[1:] != col[:-1]])
            x = np.add.reduceat(x, starts)
            col = col[starts]
        if len(col) and n_counts > 0:
            norm = x / n_counts * TARGET_SUM / self.col_median[col]  # the original's operation order
            ranked = col[np.lexsort((col, -norm))]  # descending value; ties in column order
            tokens = self.col_token[ranked[: self.n_genes_max]]
        else:
            tokens = np.zeros(0, dtype=np.int32)
        if self.special:
            tokens = np.concatenate([[self.cls_id], tokens, [self.eos_id]])
        return tokens.astype(np.int32, copy=False)

    def __call__(
        self, cell_ids: np.ndarray, gene_index: list[np.ndarray], values: list[np.ndarray]
    ) -> dict[str, list[np.ndarray]]:
        return {"input_ids": [self.tokenize_cell(gi, v) for gi, v in zip(gene_index, values, strict=True)]}


# ---------------------------------------------------------------------------------------------- config


def validate_config(cfg: dict[str, Any], where: str = "config.json") -> dict[str, Any]:
    """Check a Geneformer (BERT) config dict; returns it."""
    if cfg.get("model_type", "bert") != "bert":
        raise UserError(
            f"{where}: model_type {cfg.get('model_type')!r} is not 'bert'; a Geneformer checkpoint is a Hugging Face "
            "BertForMaskedLM folder (e.g. Geneformer-V1-10M/ of ctheodoris/Geneformer)"
        )
    archs = cfg.get("architectures")
    if archs and "BertForMaskedLM" not in archs:
        raise UserError(
            f"{where}: architectures {archs} do not include BertForMaskedLM; only the pretrained Geneformer models "
            "(not fine-tuned classifiers) are supported"
        )
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings"):
        positive_int(cfg, key, "Geneformer config.json")
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise UserError(
            f"{where}: hidden_size {cfg['hidden_size']} is not divisible by num_attention_heads "
            f"{cfg['num_attention_heads']}"
        )
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise UserError(f"{where}: position_embedding_type {cfg['position_embedding_type']!r} is not 'absolute'")
    if cfg.get("is_decoder"):
        raise UserError(f"{where}: is_decoder is true; Geneformer is a bidirectional encoder")
    return cfg


def bert_config(cfg: dict[str, Any]) -> Any:
    from transformers import BertConfig

    conf = BertConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version")})
    conf._attn_implementation = "sdpa"  # torch SDPA, no flash-attn dependency
    return conf


def build_module(cfg: dict[str, Any]) -> Any:
    """A randomly initialised BertForMaskedLM for a config (the global RNG is left untouched)."""
    import torch
    from transformers import BertForMaskedLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return BertForMaskedLM(bert_config(cfg))


def build_encoder(cfg: dict[str, Any]) -> Any:
    """The BertModel (no pooler) a cell embedding runs: the ``bert.*`` part of every Geneformer file."""
    import torch
    from transformers import BertModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return BertModel(bert_config(cfg), add_pooling_layer=False)


def encoder_shapes(encoder: Any) -> dict[str, tuple[int, ...]]:
    """Official keys (``bert.`` prefix, as in BertForMaskedLM / BertForSequenceClassification files) and
    shapes of what a cell embedding runs."""
    return {ENCODER_PREFIX + k: tuple(v.shape) for k, v in encoder.state_dict().items()}


def _truncated_bert(bert: Any, n_layers: int) -> Any:
    """A view of a BertModel that runs only its first ``n_layers`` layers (shared weights; the module
    itself is not changed, so LoRA wrappers and other users of it see no difference)."""
    from torch import nn

    if n_layers == len(bert.encoder.layer):
        return bert
    view = copy.copy(bert)
    view.__dict__["_modules"] = dict(bert._modules)
    encoder = copy.copy(bert.encoder)
    encoder.__dict__["_modules"] = dict(bert.encoder._modules)
    encoder._modules["layer"] = nn.ModuleList(list(bert.encoder.layer)[:n_layers])
    view._modules["encoder"] = encoder
    return view


# ----------------------------------------------------------------------------------------------- model


def geneformer_lookup(fm: Any, tok: Any) -> np.ndarray:
    """Store position -> the token of its collapsed column (-1: not in the vocabulary)."""
    return np.where(tok.col_of_pos >= 0, tok.col_token[np.maximum(tok.col_of_pos, 0)], -1)


def geneformer_attention(fm: Any, module: Any, batch: dict[str, Any]) -> Any:
    """Attention each token receives in the last layer feeding the embedding (eager softmax)."""
    bert = getattr(module, "bert", module)
    with eager_attention(bert.config):
        out = bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_attentions=True)
    # the last layer that feeds the embedding (option emb_layer; hidden_states[k] is layer k's output)
    return received_attention(out.attentions[max(fm.layer_index, 1) - 1].float(), batch["attention_mask"])


@register
class GeneformerModel(FoundationModel):
    """Geneformer V1 / V2: rank value encoding of raw counts, BERT encoder, mean (or CLS) pooling."""

    name: ClassVar[str] = "geneformer"
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": _tiny(_V1_10M),
        "tiny-v2": _tiny(_V2_104M),
        "v1-10m": _V1_10M,
        "v2-104m": _V2_104M,
    }
    # PEFT matches these as module-name suffixes: bert.encoder.layer.N.attention.self.{query,key,value}
    lora_targets: ClassVar[list[str]] = ["query", "key", "value"]
    #: gene-as-token: the gene-token embedding; baseline = the padding token at every gene token
    attribution_adapter = AttributionAdapter(
        layer=lambda m: getattr(m, "bert", m).embeddings.word_embeddings, lookup=geneformer_lookup,
        attention=geneformer_attention)
    default_options: ClassVar[dict[str, Any]] = {
        "checkpoint": None,
        "preset": None,
        "version": "auto",  # auto (from vocab_size) | V1 | V2
        "emb_layer": -1,  # as EmbExtractor: -1 second-to-last layer, 0 last layer
        "pooling": "auto",  # auto (EmbExtractor's default: cls for V2, mean for V1) | mean | cls (V2 only)
        "min_coverage": MIN_COVERAGE,
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        version = str(o["version"]).upper() if o["version"] is not None else "AUTO"
        if version not in ("AUTO", "V1", "V2"):
            raise UserError(f"geneformer option version={o['version']!r}: use auto, V1 or V2")
        o["version"] = "auto" if version == "AUTO" else version
        if isinstance(o["emb_layer"], bool) or not isinstance(o["emb_layer"], int) or o["emb_layer"] > 0:
            raise UserError(
                f"geneformer option emb_layer={o['emb_layer']!r}: use 0 (last layer), -1 (second-to-last, the "
                "default) or another non-positive integer"
            )
        if o["pooling"] not in ("auto", "mean", "cls"):
            raise UserError(f"geneformer option pooling={o['pooling']!r}: use auto (cls for V2, mean for V1), mean "
                            "or cls (V2 only)")
        mc = o["min_coverage"]
        if isinstance(mc, bool) or not isinstance(mc, int | float) or not 0 <= mc <= 1:
            raise UserError(f"geneformer option min_coverage={mc!r}: use a fraction between 0 and 1")
        self._config: dict[str, Any] | None = None

    # -- checkpoint facts -------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """The checkpoint's config.json (validated)."""
        if self._config is None:
            ckpt = self.checkpoint_dir()
            path = ckpt / CONFIG_FILE
            if not path.is_file():
                raise UserError(self._format_hint(ckpt))
            try:
                cfg = json.loads(path.read_text())
            except (OSError, ValueError) as err:
                raise UserError(f"Geneformer {path} is not readable JSON ({err})") from None
            if not isinstance(cfg, dict):
                raise UserError(f"Geneformer {path} does not hold a JSON object")
            self._config = validate_config(cfg, str(path))
        return self._config

    @staticmethod
    def _format_hint(ckpt: Path) -> str:
        found = ", ".join(sorted(p.name for p in ckpt.iterdir())[:8]) or "nothing"
        return (
            f"{ckpt} is not a Geneformer checkpoint: expected {CONFIG_FILE} and {SAFETENSORS_FILE} (or {TORCH_FILE}), "
            f"as in ctheodoris/Geneformer's model folders (e.g. Geneformer-V1-10M/); found: {found}"
        )

    @property
    def version(self) -> str:
        """V1 (gc30M dictionaries, no special tokens) or V2 (gc104M, <cls>/<eos>)."""
        vocab = self.config()["vocab_size"]
        version = self.options["version"]
        if version == "auto":
            if vocab not in VOCAB_VERSIONS:
                raise UserError(
                    f"Geneformer checkpoint {self.checkpoint_dir()} has vocab_size {vocab}, neither V1 (25426) nor "
                    "V2 (20275); set the model option version: V1 or V2"
                )
            version = VOCAB_VERSIONS[vocab]
        n_tokens = len(load_dictionaries(version).tokens)
        if vocab < n_tokens:
            raise UserError(
                f"Geneformer checkpoint has vocab_size {vocab}, smaller than the {version} token dictionary "
                f"({n_tokens} tokens); this checkpoint is not a Geneformer {version} model"
            )
        if self.options["pooling"] == "cls" and version == "V1":  # "auto" resolves to mean for V1
            raise UserError("geneformer pooling: cls needs a V2 model (V1 has no <cls> token); use pooling: mean")
        return version

    @property
    def pooling(self) -> str:
        """``cls`` or ``mean``: option ``pooling``, with ``auto`` resolved as EmbExtractor does (its default
        ``emb_mode="cls"``, switched to ``"cell"``, the mean over genes, for V1 models, which have no <cls>)."""
        if self.options["pooling"] != "auto":
            return str(self.options["pooling"])
        return "cls" if self.version == "V2" else "mean"

    def identity(self) -> dict[str, Any]:
        ident = super().identity()
        ident["resolved"] = {"pooling": self.pooling, "version": self.version}  # what "auto" meant: in the manifest
        return ident

    @property
    def max_length(self) -> int:
        return int(self.config()["max_position_embeddings"])

    @property
    def embedding_dim(self) -> int:
        return int(self.config()["hidden_size"])

    @property
    def layer_index(self) -> int:
        """Index into hidden_states (0 = embedding output, n_layers = last layer)."""
        n_layers = int(self.config()["num_hidden_layers"])
        index = n_layers + int(self.options["emb_layer"])
        if index < 0:
            raise UserError(
                f"geneformer option emb_layer={self.options['emb_layer']} is below -{n_layers} (the model has "
                f"{n_layers} layers)"
            )
        return index

    # -- tokenizer -------------------------------------------------------------------------------

    def make_tokenizer(self, genes: pd.DataFrame) -> GeneformerTokenizer:
        tok = GeneformerTokenizer(
            genes, load_dictionaries(self.version), self.max_length, float(self.options["min_coverage"])
        )
        r = tok.report
        log.info(
            "geneformer %s: %d of %d store genes in the vocabulary (%.1f%%; %d by Ensembl ID, %d by symbol, "
            "%d tokens summed from several genes)",
            r["version"], r["n_in_vocabulary"], r["n_store_genes"], 100 * r["coverage"], r["via_ensembl_id"],
            r["via_symbol"], r["n_summed_tokens"],
        )
        return tok

    def vocabulary_coverage(self, genes: pd.DataFrame) -> dict[str, Any]:
        """How a store's genes meet the vocabulary (coverage, matches by ID / symbol, summed tokens),
        without the coverage threshold."""
        return GeneformerTokenizer(genes, load_dictionaries(self.version), self.max_length, 0.0).report

    # -- batches ---------------------------------------------------------------------------------

    def collate(self, rows: dict[str, list[np.ndarray]], pad_to: int | None = None) -> dict[str, Any]:
        return pad_tokens(rows["input_ids"], load_dictionaries(self.version).pad_id, pad_to)

    # -- weights ---------------------------------------------------------------------------------

    def load(self, device: str = "cpu", dtype: Any = None) -> Any:
        import torch

        dtype = self.weights_dtype(device, dtype)  # option dtype: upstream precision by default
        ckpt = self.checkpoint_dir()
        cfg = self.config()
        _ = self.version, self.layer_index  # refuse bad options before reading weights
        if (ckpt / SAFETENSORS_FILE).is_file():
            path = ckpt / SAFETENSORS_FILE
        elif (ckpt / TORCH_FILE).is_file():
            path = ckpt / TORCH_FILE
        else:
            raise UserError(self._format_hint(ckpt))
        state = read_state_dict(path)
        with torch.device("meta"):  # shapes only
            shapes = encoder_shapes(build_encoder(cfg))
        kept = check_state(state, shapes, str(path), f"Geneformer's BERT encoder of its {CONFIG_FILE}", CONFIG_FILE,
                           skip=SKIPPED_KEYS)
        return materialize(lambda: build_encoder(cfg), {k[len(ENCODER_PREFIX):]: v for k, v in kept.items()}, device,
                           dtype)

    def embed(self, module: Any, batch: dict[str, Any]) -> Any:
        import torch

        bert = getattr(module, "bert", module)
        view = _truncated_bert(bert, self.layer_index)
        hidden = view(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        hidden = hidden.float()
        if self.pooling == "cls":  # V2 only (checked by `version`)
            return hidden[:, 0].contiguous()
        lengths = batch["lengths"].to(hidden.device)
        special = load_dictionaries(self.version).special
        start = 1 if special else 0
        n_genes = (lengths - 2 * start).clamp(min=0)
        pos = torch.arange(hidden.shape[1], device=hidden.device)
        genes = (pos[None, :] >= start) & (pos[None, :] < (start + n_genes)[:, None])
        summed = (hidden * genes[..., None].to(hidden.dtype)).sum(dim=1)
        # a cell without genes gets zeros (the original drops such cells)
        return summed / n_genes.clamp(min=1)[:, None].to(hidden.dtype)

    # -- random checkpoints ----------------------------------------------------------------------

    @classmethod
    def init_random(cls, out_dir: Path, preset: str = "tiny", config: dict[str, Any] | None = None) -> Path:
        from safetensors.torch import save_file

        if preset not in cls.presets:
            raise UserError(f"model 'geneformer' has no preset {preset!r}; presets: {', '.join(cls.presets)}")
        cfg = validate_config({**copy.deepcopy(cls.presets[preset]), **(config or {})}, f"preset {preset!r} config")
        if cfg["vocab_size"] not in VOCAB_VERSIONS:
            raise UserError(
                f"geneformer init_random: vocab_size {cfg['vocab_size']} must be a real vocabulary's, 25426 (V1) or "
                "20275 (V2), so the checkpoint works with Geneformer's token dictionaries"
            )
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        module = build_module(cfg)
        # what save_pretrained writes: tied aliases dropped, every tensor contiguous
        state = {k: v.detach().contiguous() for k, v in module.state_dict().items() if k not in TIED_KEYS}
        with atomic_file(out_dir / SAFETENSORS_FILE) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        write_json(out_dir / CONFIG_FILE, cfg)  # indent 2, sorted keys: the layout of the official files
        cls.mark_random(out_dir, preset)
        n_params = sum(math.prod(v.shape) for v in state.values())
        log.info("geneformer: wrote random %s checkpoint (%.1fM parameters) to %s", preset, n_params / 1e6, out_dir)
        return out_dir
