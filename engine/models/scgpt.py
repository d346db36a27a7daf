"""scGPT (whole-human ``TransformerModel``) cell embeddings.

What the original does (bowang-lab/scGPT 0.2.x: ``scgpt/tasks/cell_emb.py`` ``embed_data`` ->
``get_batch_cell_embeddings``, ``scgpt/data_collator.py`` ``DataCollator``, ``scgpt/preprocess.py``
``binning`` / ``_digitize``, ``scgpt/model/model.py`` ``TransformerModel._encode``):

* Checkpoint directory: ``best_model.pt`` (``torch.save`` of a plain state dict), ``args.json``
  (hyperparameters: ``embsize``, ``nheads``, ``d_hid``, ``nlayers``, ``n_layers_cls``, ``pad_token``,
  ``pad_value``, ``n_bins``, ``max_seq_len``, ...) and ``vocab.json`` (gene symbol -> id);
  ``<pad>``, ``<cls>``, ``<eoc>`` are appended to the vocabulary when missing.
* Genes: the data's gene symbols (``gene_col``) that are in the vocabulary; the other columns are
  dropped. Columns with the same symbol are all kept (they get the same token id).
* Values: ``adata.X`` as given (the tutorials pass raw counts, or ``normalize_total(1e4)`` + ``log1p``).
  Per cell: the non-zero genes in the data's column order, ``<cls>`` first with value ``pad_value``
  (-2); then the collator's ``binning`` of the non-zero values into ``n_bins`` (51): 50 edges =
  ``np.quantile(values, linspace(0, 1, 50))``; a value's bin is ``np.digitize`` of it, and a value equal
  to one or more edges (ties: very common with counts) gets a bin drawn uniformly at random between
  ``digitize(right=True) + 1`` and ``digitize(right=False)`` (``_digitize(side="both")`` with
  ``np.random.rand``). Bins are 1..50 for non-zero values. Because the bins only depend on the order of a
  cell's values, raw counts and normalised + log1p values give the same tokens.
* Length: cells with more than ``max_length`` tokens (1,200 incl. ``<cls>``) keep ``<cls>`` and a random
  sample of ``max_length - 1`` genes (``torch.randperm``, after binning); shorter cells are padded to
  the longest cell of the batch with ``<pad>`` and value ``pad_value``.
* Model: ``GeneEncoder`` (embedding + LayerNorm) + ``ContinuousValueEncoder`` (clamp at 512, Linear(1,
  d) -> ReLU -> Linear(d, d) -> LayerNorm), summed, then ``nlayers`` encoder layers (flash-attn
  ``FlashMHA`` or ``nn.TransformerEncoderLayer``: post-norm, ReLU, feed-forward ``d_hid``; no final norm)
  with ``src_key_padding_mask = ids == <pad>``.
* Cell embedding: the encoder output at position 0 (``<cls>``), 512-d for the whole-human model; then
  every embedding is divided by its L2 norm (end of ``get_batch_cell_embeddings``).

Where this file follows it: all of the above, with the official key names (``self_attn.Wqkv.*``, flash-
attn's names in the released ``best_model.pt``; the ``self_attn.in_proj_*`` names scGPT's own loader
renames them to are accepted too).

Where it differs, and why:

* Randomness (binning ties, sampling of long cells) comes from a generator seeded per cell from a hash
  of its cell id (``sha256(f"{seed}:{cell_id}")``, option ``seed``), not from the global NumPy / torch
  generators: a cell's tokens and embedding never depend on which other cells share its batch, and
  reruns are identical. The random choices have the same distributions as the original's.
* Sampled genes keep the data's column order (the original keeps ``randperm`` order); the model has no
  positional encoding, so order changes only floating-point summation order.
* The number of bins comes from ``args.json`` ``n_bins`` (the original collator hard-codes 51, which is
  what the released checkpoints use).
* Option ``normalize="log1p"`` applies ``normalize_total(1e4)`` + ``log1p`` before binning, as some
  tutorials do beforehand; as said above this gives the same bins as the default (values as given).
  Highly-variable-gene subsetting (done by some fine-tuning tutorials, not by ``embed_data``) is a
  data-set-level choice and is not done here: a cell's tokens depend on that cell only.
* Attention runs through ``F.scaled_dot_product_attention`` in this file's own ``SelfAttention``
  module (no flash-attn, no ``nn.MultiheadAttention``): its ``Wqkv`` and ``out_proj`` are ``nn.Linear``
  modules really called in forward, so LoRA can act on them (``lora_targets``; the suffixes ``linear1`` /
  ``linear2`` also match the value encoder's two Linear layers, which forward calls too).
* Input check: raw counts and non-count stores are both accepted (``requires_counts`` is False: the
  bins are the same for counts and normalised / log1p values), but a store whose first cells hold
  negative values (scaled or z-scored data) is refused; the original would bin those silently.
* A cell with no gene in the vocabulary is ``<cls>`` alone (the original's ``binning`` fails on it).
  ``l2_normalize`` maps an all-zero embedding to zeros instead of NaN.
* Only the encoder is built (all a cell embedding uses); every encoder tensor is loaded strictly (a
  missing one is a one-line error naming it). The released ``best_model.pt`` holds the encoder plus the
  heads of generative pretraining (``flag_encoder``, ``decoder`` expression decoder, ``mvc_decoder``) and
  NO ``cls_decoder`` (``released_shapes``); a file saved from a fine-tuned ``TransformerModel`` has
  ``cls_decoder`` of any size. Those modules (``SKIPPED_MODULES``) are skipped and named in one log line,
  as embed_data's non-strict loader skips them silently; any other extra key (e.g. a 13th layer) is an
  error. ``init_random`` writes the released key set, so the tests load what users download.
* ``input_emb_style`` other than ``continuous`` is refused: ``embed_data`` always builds the continuous
  value encoder (the released checkpoints use it).
* ``args.json`` ``pre_norm`` (absent in the released args: post-norm) selects scGPT's "pre" scheme when
  true; ``embed_data`` always builds post-norm, which would be wrong for such a checkpoint.
* Precision: the original runs under CUDA autocast (fp16). Option ``dtype: upstream`` (the default) casts
  the weights to float16 on a GPU (autocast keeps LayerNorm/softmax in fp32, a cast does not: close, not
  bit-equal) and float32 on CPU; ``dtype: engine`` takes the pipeline's bfloat16; the embedding is returned
  in float32.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..fsutil import atomic_file, write_json
from .attention import EncoderLayer, SdpaSelfAttention
from .base import CellTokenizer, FoundationModel, pad_ragged, register
from .checkpoint import check_state, load_weights_file, materialize, short_keys
from .contract import AttributionAdapter, check_coverage, tokenizer_lookup

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "best_model.pt"
ARGS_FILE = "args.json"
VOCAB_FILE = "vocab.json"
#: appended to the vocabulary in this order when missing (as embed_data does)
SPECIAL_TOKENS = ("<pad>", "<cls>", "<eoc>")
CLS_TOKEN = "<cls>"
RESOURCES = Path(__file__).parent / "resources" / "scgpt"
CENSUS_VOCAB_FILE = RESOURCES / "default_census_vocab.json.gz"
HUMAN_ARGS_FILE = RESOURCES / "scGPT_human_args.json"
#: ContinuousValueEncoder clamps values at this maximum
MAX_VALUE = 512
NORMALIZE_TARGET = 1e4

_IN_PROJ = re.compile(r"^(transformer_encoder\.layers\.\d+\.self_attn\.)in_proj_(weight|bias)$")
#: newer scGPT wraps its flash-attn module (``self_attn._impl.Wqkv`` / ``self_attn._impl.out_proj``)
_IMPL = re.compile(r"^(transformer_encoder\.layers\.\d+\.self_attn\.)_impl\.(Wqkv|out_proj)\.(weight|bias)$")
#: modules of released / fine-tuned scGPT files that a cell embedding never runs (embed_data builds none
#: of them or does not call them in ``_encode``): pretraining heads (``flag_encoder``: the generative
#: "unknown gene" flag; ``decoder``: expression decoder; ``mvc_decoder``), the classifier (absent from
#: the released pretrained files) and fine-tuning modules (batch labels, domain-specific batch norm,
#: adversarial discriminator). Skipped and named in one log line; any other extra key is an error.
SKIPPED_MODULES = (
    r"flag_encoder\.", r"decoder\.", r"cls_decoder\.", r"mvc_decoder\.", r"batch_encoder\.", r"dsbn\.",
    r"bn\.", r"grad_reverse_discriminator\.",
)


# --------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ScGPTConfig:
    """What the embedding path needs from ``args.json`` (names as scGPT's TransformerModel)."""

    d_model: int
    nhead: int
    d_hid: int
    nlayers: int
    nlayers_cls: int
    n_bins: int
    pad_token: str
    pad_value: float
    max_seq_len: int
    dropout: float
    pre_norm: bool
    do_mvc: bool
    explicit_zero_prob: bool


def _arg(args: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
    if key not in args:
        if default is None:
            raise UserError(
                f"scGPT {ARGS_FILE} has no {key!r}; is this the args.json of an official scGPT checkpoint "
                "(embsize, nheads, d_hid, nlayers, n_layers_cls, pad_token, pad_value, ...)?"
            )
        return default
    val = args[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(val, kinds) or (isinstance(val, bool) and bool not in kinds):
        raise UserError(f"scGPT {ARGS_FILE}: {key!r} = {val!r} has the wrong type")
    return val


def config_from_args(args: dict[str, Any]) -> ScGPTConfig:
    """The model config of an ``args.json`` dict, checked; a UserError says what is wrong."""
    if not isinstance(args, dict):
        raise UserError(f"scGPT {ARGS_FILE} must hold a JSON object of hyperparameters")
    style = _arg(args, "input_emb_style", str, "continuous")
    if style != "continuous":
        raise UserError(
            f"scGPT checkpoints with input_emb_style={style!r} are not supported: scGPT's embed_data (and this "
            "package) builds the continuous value encoder that the released checkpoints use"
        )
    cfg = ScGPTConfig(
        d_model=_arg(args, "embsize", int),
        nhead=_arg(args, "nheads", int),
        d_hid=_arg(args, "d_hid", int),
        nlayers=_arg(args, "nlayers", int),
        nlayers_cls=_arg(args, "n_layers_cls", int, 3),
        n_bins=_arg(args, "n_bins", int, 51),
        pad_token=_arg(args, "pad_token", str, "<pad>"),
        pad_value=float(_arg(args, "pad_value", (int, float))),
        max_seq_len=_arg(args, "max_seq_len", int, 1200),
        dropout=float(_arg(args, "dropout", (int, float), 0.2)),
        pre_norm=_arg(args, "pre_norm", bool, False),
        do_mvc=_arg(args, "MVC", bool, True),
        explicit_zero_prob=_arg(args, "explicit_zero_prob", bool, False),
    )
    for key in ("d_model", "nhead", "d_hid", "nlayers", "nlayers_cls"):
        if getattr(cfg, key) <= 0:
            raise UserError(f"scGPT {ARGS_FILE}: {key} must be positive")
    if cfg.d_model % cfg.nhead:
        raise UserError(f"scGPT {ARGS_FILE}: embsize {cfg.d_model} is not divisible by nheads {cfg.nhead}")
    if cfg.n_bins < 3:
        raise UserError(f"scGPT {ARGS_FILE}: n_bins must be at least 3, got {cfg.n_bins}")
    if cfg.max_seq_len < 2:
        raise UserError(f"scGPT {ARGS_FILE}: max_seq_len must be at least 2 (<cls> and one gene)")
    if cfg.pad_token not in SPECIAL_TOKENS:
        raise UserError(f"scGPT {ARGS_FILE}: pad_token {cfg.pad_token!r} is not one of {', '.join(SPECIAL_TOKENS)}")
    return cfg


def load_census_vocab() -> dict[str, int]:
    """The whole-human gene vocabulary (60,694 symbols, without special tokens), vendored."""
    with gzip.open(CENSUS_VOCAB_FILE, "rt", encoding="utf-8") as fh:
        return json.load(fh)


def human_args() -> dict[str, Any]:
    """The scGPT_human checkpoint's args.json (vendored)."""
    return json.loads(HUMAN_ARGS_FILE.read_text())


def complete_vocab(vocab: dict[str, int]) -> dict[str, int]:
    """Check a token -> id mapping (ids must be 0..n-1, as scGPT's GeneVocab requires) and append the
    missing special tokens in embed_data's order."""
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        raise UserError(
            f"scGPT {VOCAB_FILE} ids must be the consecutive integers 0..{len(ids) - 1} (scGPT's GeneVocab requires it)"
        )
    out = dict(vocab)
    for tok in SPECIAL_TOKENS:
        if tok not in out:
            out[tok] = len(out)
    return out


def read_vocab(path: Path) -> dict[str, int]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read scGPT vocabulary {path}: {str(err).splitlines()[0][:120]}") from None
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in raw.items()
    ):
        raise UserError(f"scGPT vocabulary {path} must be a JSON object of gene symbol -> integer id")
    return complete_vocab(raw)


def read_args(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read scGPT {ARGS_FILE} {path}: {str(err).splitlines()[0][:120]}") from None


# --------------------------------------------------------------------------------------------- shapes


def official_encoder_shapes(cfg: ScGPTConfig, ntoken: int) -> dict[str, tuple[int, ...]]:
    """Official keys (flash-attn ``Wqkv`` names) and shapes of what a cell embedding uses."""
    d, h = cfg.d_model, cfg.d_hid
    out: dict[str, tuple[int, ...]] = {
        "encoder.embedding.weight": (ntoken, d),
        "encoder.enc_norm.weight": (d,),
        "encoder.enc_norm.bias": (d,),
        "value_encoder.linear1.weight": (d, 1),
        "value_encoder.linear1.bias": (d,),
        "value_encoder.linear2.weight": (d, d),
        "value_encoder.linear2.bias": (d,),
        "value_encoder.norm.weight": (d,),
        "value_encoder.norm.bias": (d,),
    }
    for i in range(cfg.nlayers):
        p = f"transformer_encoder.layers.{i}."
        out[p + "self_attn.Wqkv.weight"] = (3 * d, d)
        out[p + "self_attn.Wqkv.bias"] = (3 * d,)
        out[p + "self_attn.out_proj.weight"] = (d, d)
        out[p + "self_attn.out_proj.bias"] = (d,)
        out[p + "linear1.weight"] = (h, d)
        out[p + "linear1.bias"] = (h,)
        out[p + "linear2.weight"] = (d, h)
        out[p + "linear2.bias"] = (d,)
        for norm in ("norm1", "norm2"):
            out[p + f"{norm}.weight"] = (d,)
            out[p + f"{norm}.bias"] = (d,)
    return out


def official_head_shapes(cfg: ScGPTConfig, n_cls: int = 1) -> dict[str, tuple[int, ...]]:
    """The heads TransformerModel builds beside the encoder (as embed_data builds it: no batch labels,
    inner-product MVC decoder); a cell embedding never runs them, so a loader skips them (and names
    them). ``decoder`` (ExprDecoder), ``cls_decoder`` (ClsDecoder with ``n_layers_cls - 1``
    Linear/ReLU/LayerNorm blocks) and, when args ``MVC`` is true, ``mvc_decoder``; with args
    ``explicit_zero_prob`` also their zero-probability layers. The RELEASED pretrained files hold
    ``released_head_shapes`` instead (no classifier, plus ``flag_encoder``)."""
    d = cfg.d_model
    out: dict[str, tuple[int, ...]] = {}
    mlp = {"0": (d, d), "2": (d, d), "4": (1, d)}
    for name in ("fc", "zero_logit") if cfg.explicit_zero_prob else ("fc",):
        for idx, shape in mlp.items():
            out[f"decoder.{name}.{idx}.weight"] = shape
            out[f"decoder.{name}.{idx}.bias"] = (shape[0],)
    for i in range(cfg.nlayers_cls - 1):
        out[f"cls_decoder._decoder.{3 * i}.weight"] = (d, d)
        out[f"cls_decoder._decoder.{3 * i}.bias"] = (d,)
        out[f"cls_decoder._decoder.{3 * i + 2}.weight"] = (d,)
        out[f"cls_decoder._decoder.{3 * i + 2}.bias"] = (d,)
    out["cls_decoder.out_layer.weight"] = (n_cls, d)
    out["cls_decoder.out_layer.bias"] = (n_cls,)
    if cfg.do_mvc:
        out["mvc_decoder.gene2query.weight"] = (d, d)
        out["mvc_decoder.gene2query.bias"] = (d,)
        out["mvc_decoder.W.weight"] = (d, d)
        if cfg.explicit_zero_prob:
            out["mvc_decoder.W_zero_logit.weight"] = (d, d)
            out["mvc_decoder.W_zero_logit.bias"] = (d,)
    return out


def official_shapes(cfg: ScGPTConfig, ntoken: int, n_cls: int = 1) -> dict[str, tuple[int, ...]]:
    """Every key of a ``TransformerModel`` as embed_data instantiates it (a fine-tuned file saved from
    it has these), with its shape, in TransformerModel's order."""
    return {**official_encoder_shapes(cfg, ntoken), **official_head_shapes(cfg, n_cls)}


def released_head_shapes(cfg: ScGPTConfig) -> dict[str, tuple[int, ...]]:
    """The non-encoder tensors of the RELEASED pretrained ``best_model.pt`` (scGPT_human and the other
    whole-body/organ models, trained with generative pretraining): ``flag_encoder`` (nn.Embedding(2, d)),
    the expression decoder and the MVC decoder; NO ``cls_decoder`` (the classifier is not pretrained;
    bowang-lab/scGPT issue #78, RCHENLAB/scGPT_fineTune_protocol issue #2 list the mismatch)."""
    heads = {k: v for k, v in official_head_shapes(cfg).items() if not k.startswith("cls_decoder.")}
    return {"flag_encoder.weight": (2, cfg.d_model), **heads}


def released_shapes(cfg: ScGPTConfig, ntoken: int) -> dict[str, tuple[int, ...]]:
    """Every key of a released pretrained ``best_model.pt`` (FlashMHA ``Wqkv`` names) with its shape."""
    return {**official_encoder_shapes(cfg, ntoken), **released_head_shapes(cfg)}


# --------------------------------------------------------------------------------------------- modules


class GeneEncoder(nn.Module):
    """Gene token embedding + LayerNorm (official names ``embedding``, ``enc_norm``)."""

    def __init__(self, ntoken: int, d_model: int, padding_idx: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(ntoken, d_model, padding_idx=padding_idx)
        self.enc_norm = nn.LayerNorm(d_model)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.enc_norm(self.embedding(ids))


class ContinuousValueEncoder(nn.Module):
    """Value -> clamp(max 512) -> Linear(1, d) -> ReLU -> Linear(d, d) -> LayerNorm -> dropout."""

    def __init__(self, d_model: int, dropout: float) -> None:
        super().__init__()
        self.linear1 = nn.Linear(1, d_model)
        self.linear2 = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        x = values.to(self.linear1.weight.dtype).unsqueeze(-1).clamp(max=MAX_VALUE)
        return self.dropout(self.norm(self.linear2(F.relu(self.linear1(x)))))


class SelfAttention(SdpaSelfAttention):
    """Multi-head self-attention with flash-attn FlashMHA's parameters (``Wqkv``: q, k, v stacked, heads
    contiguous inside each, as ``nn.MultiheadAttention.in_proj``; ``out_proj``), computed by SDPA
    (scale 1/sqrt(head_dim), padded keys masked). Both projections are called in forward (LoRA targets)."""

    qkv_name = "Wqkv"


class TransformerEncoder(nn.Module):
    """``layers.<i>`` as torch's nn.TransformerEncoder (no final norm, as scGPT builds it)."""

    def __init__(self, cfg: ScGPTConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderLayer(cfg.d_model, cfg.nhead, cfg.d_hid, cfg.dropout, SelfAttention, cfg.pre_norm)
            for _ in range(cfg.nlayers)
        )

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # keys only: padded keys are never attended to; no mask at all when nothing is padded, so the
        # fastest SDPA kernel can run
        attn_mask = None if bool(attention_mask.all()) else attention_mask[:, None, None, :]
        for layer in self.layers:
            x = layer(x, attn_mask)
        return x


class ScGPTEncoder(nn.Module):
    """TransformerModel._encode: gene + value embeddings -> transformer; hidden states out."""

    def __init__(self, cfg: ScGPTConfig, ntoken: int, pad_id: int) -> None:
        super().__init__()
        self.config = cfg
        self.d_model = cfg.d_model
        self.encoder = GeneEncoder(ntoken, cfg.d_model, pad_id)
        self.value_encoder = ContinuousValueEncoder(cfg.d_model, cfg.dropout)
        self.transformer_encoder = TransformerEncoder(cfg)

    def forward(self, input_ids: torch.Tensor, values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.encoder(input_ids) + self.value_encoder(values)
        return self.transformer_encoder(x, attention_mask)


# --------------------------------------------------------------------------------------------- tokenizer


def cell_rng(cell_id: str, seed: int = 0) -> np.random.Generator:
    """The generator of one cell's random choices: seeded from sha256(f"{seed}:{cell_id}")."""
    digest = hashlib.sha256(f"{seed}:{cell_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def bin_values(values: np.ndarray, n_bins: int, rng: np.random.Generator) -> np.ndarray:
    """scGPT's per-cell ``binning`` (int64 bins): non-zero values into 1..n_bins-1 by the quantile edges
    of the cell's non-zero values, ties with edges spread uniformly at random (``_digitize`` "both");
    zeros stay 0. Draws exactly one uniform number per non-zero value from ``rng``."""
    x = np.asarray(values, dtype=np.float32)
    out = np.zeros(len(x), dtype=np.int64)
    if len(x) == 0 or x.max() == 0:  # the original returns zeros for a row of zeros (no draws)
        return out
    nz = np.flatnonzero(x)
    v = x[nz]
    edges = np.quantile(v, np.linspace(0, 1, n_bins - 1))
    left = np.digitize(v, edges)
    right = np.digitize(v, edges, right=True)
    draws = rng.random(len(v))
    out[nz] = np.ceil(draws * (right - left) + left).astype(np.int64)
    return out


class ScGPTTokenizer(CellTokenizer):
    """Store cells -> scGPT input: ``input_ids`` (int32: ``<cls>`` then the vocabulary ids of the cell's
    non-zero genes in store order) and ``values`` (float32: ``pad_value`` for ``<cls>``, then the genes'
    bins). At most ``max_length`` tokens: longer cells keep a random (per-cell seeded) sample of genes."""

    def __init__(
        self,
        genes: pd.DataFrame,
        vocab: dict[str, int],
        *,
        n_bins: int,
        max_length: int,
        pad_value: float,
        seed: int = 0,
        normalize: str = "none",
    ) -> None:
        ordered = genes.sort_values("position")
        positions = ordered["position"].to_numpy(dtype=np.int64)
        symbols = ordered["symbol"].tolist()
        n_positions = int(positions.max()) + 1 if len(positions) else 0
        self.lookup = np.full(n_positions, -1, dtype=np.int32)
        specials = set(SPECIAL_TOKENS)
        for pos, sym in zip(positions, symbols, strict=True):
            # every store column whose symbol is in the vocabulary, duplicates included (as embed_data)
            if isinstance(sym, str) and sym in vocab and sym not in specials:
                self.lookup[pos] = vocab[sym]
        matched = self.lookup[self.lookup >= 0]
        self.n_store_genes = len(genes)
        self.n_matched = len(matched)
        self.coverage = self.n_matched / self.n_store_genes if self.n_store_genes else 0.0
        n_vocab_genes = sum(1 for t in vocab if t not in specials)
        #: fraction of the vocabulary's genes that the store has
        self.vocab_coverage = len(np.unique(matched)) / max(n_vocab_genes, 1)
        self.cls_id = vocab[CLS_TOKEN]
        self.n_bins = n_bins
        self.max_length = max_length
        self.pad_value = float(pad_value)
        self.seed = seed
        self.normalize = normalize
        check_coverage(self.coverage, self.n_store_genes,
                       f"are in scGPT's vocabulary of {n_vocab_genes} human gene symbols", symbols,
                       "scGPT needs human gene symbols (mouse genes or Ensembl IDs without symbols do not match): "
                       "convert the data with human symbols")

    def cell(self, cell_id: str, gene_index: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids int32, values float32) of one cell."""
        vals = np.asarray(values, dtype=np.float32)
        if self.normalize == "log1p":
            total = float(vals.astype(np.float64).sum())  # over all genes, before the vocabulary filter
            scaled = vals.astype(np.float64) / total * NORMALIZE_TARGET if total > 0 else vals
            vals = np.log1p(scaled).astype(np.float32)
        vid = self.lookup[np.asarray(gene_index, dtype=np.int64)]
        keep = (vid >= 0) & (vals != 0)  # embed_data takes np.nonzero of each row of the vocabulary genes
        vid, vals = vid[keep], vals[keep]
        rng = cell_rng(str(cell_id), self.seed)
        bins = bin_values(vals, self.n_bins, rng)  # binning sees every gene, sampling comes after
        n_keep = self.max_length - 1
        if len(vid) > n_keep:
            chosen = np.sort(rng.permutation(len(vid))[:n_keep])
            vid, bins = vid[chosen], bins[chosen]
        ids = np.concatenate([[self.cls_id], vid]).astype(np.int32)
        out_vals = np.concatenate([[self.pad_value], bins]).astype(np.float32)
        return ids, out_vals

    def __call__(
        self, cell_ids: np.ndarray, gene_index: list[np.ndarray], values: list[np.ndarray]
    ) -> dict[str, list[np.ndarray]]:
        out: dict[str, list[np.ndarray]] = {"input_ids": [], "values": []}
        for cid, gi, v in zip(cell_ids, gene_index, values, strict=True):
            ids, vals = self.cell(cid, gi, v)
            out["input_ids"].append(ids)
            out["values"].append(vals)
        return out


# --------------------------------------------------------------------------------------------- checkpoint


def check_checkpoint_dir(path: Path) -> None:
    missing = [f for f in (CHECKPOINT_FILE, ARGS_FILE, VOCAB_FILE) if not (path / f).is_file()]
    if missing:
        found = ", ".join(sorted(p.name for p in path.iterdir())) if path.is_dir() else "nothing"
        raise UserError(
            f"{path} is not an scGPT checkpoint directory: it needs {CHECKPOINT_FILE}, {ARGS_FILE} and {VOCAB_FILE} "
            f"(as the official scGPT_human download); missing {', '.join(missing)}; found: {found or 'nothing'}"
        )


def canonical_keys(state: dict[str, Any], path: Path) -> dict[str, Any]:
    """Official flash-attn names: ``self_attn.in_proj_weight|bias`` (scGPT's renamed form, and
    ``nn.MultiheadAttention``'s) and ``self_attn._impl.Wqkv|out_proj.*`` (newer scGPT's wrapped flash-attn
    module) -> ``self_attn.Wqkv|out_proj.*``; two names of one tensor in the same file is an error."""
    out: dict[str, Any] = {}
    for key, val in state.items():
        canon = _IMPL.sub(r"\1\2.\3", _IN_PROJ.sub(r"\1Wqkv.\2", key))
        if canon in out:
            raise UserError(f"{path} holds both {canon} and {key} (the same weight under two names); keep one")
        out[canon] = val
    return out


def read_checkpoint(ckpt_dir: Path) -> tuple[ScGPTConfig, dict[str, int], dict[str, torch.Tensor]]:
    """(config, vocabulary, encoder state dict in this module's names) of an scGPT checkpoint
    directory. Every encoder tensor must be there with its shape; the heads (``SKIPPED_MODULES``) are
    skipped and named in one log line; any other key is an error."""
    check_checkpoint_dir(ckpt_dir)
    cfg = config_from_args(read_args(ckpt_dir / ARGS_FILE))
    vocab = read_vocab(ckpt_dir / VOCAB_FILE)
    path = ckpt_dir / CHECKPOINT_FILE
    raw = load_weights_file(path, "save the model's state dict only (torch.save(model.state_dict(), 'best_model.pt'))")
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise UserError(
            f"{path} is not an official scGPT best_model.pt: expected a plain state dict (parameter name -> "
            f"tensor); found {type(raw).__name__}"
        )
    if raw and not any(isinstance(v, torch.Tensor) for v in raw.values()):
        raise UserError(
            f"{path} is not an official scGPT best_model.pt: expected a plain state dict (parameter name -> "
            f"tensor); found a dict with keys {short_keys(list(raw))}"
        )
    state = canonical_keys(raw, path)
    expected = official_encoder_shapes(cfg, len(vocab))
    emb = state.get("encoder.embedding.weight")
    if isinstance(emb, torch.Tensor) and tuple(emb.shape) != expected["encoder.embedding.weight"]:
        raise UserError(f"{path}: key encoder.embedding.weight has shape {tuple(emb.shape)}, {ARGS_FILE}/{VOCAB_FILE} "
                        f"need {expected['encoder.embedding.weight']} ({VOCAB_FILE} has {len(vocab)} tokens incl. "
                        "special tokens)")
    encoder = check_state(state, expected, str(path), f"the scGPT encoder of its {ARGS_FILE} ({cfg.nlayers} layers, "
                          f"d {cfg.d_model})", f"{ARGS_FILE}/{VOCAB_FILE}", skip=SKIPPED_MODULES)
    return cfg, vocab, encoder


# --------------------------------------------------------------------------------------------- the model


_TINY_OVERRIDES: dict[str, Any] = {"nlayers": 2, "nheads": 4, "embsize": 64, "d_hid": 64, "n_bins": 51}
_NORMALIZE = ("none", "log1p")


@register
class ScGPTModel(FoundationModel):
    """scGPT cell embeddings (``best_model.pt`` + ``args.json`` + ``vocab.json``); options:
    ``l2_normalize`` (default true, as get_batch_cell_embeddings), ``normalize`` (none | log1p: values as
    given, or normalize_total 1e4 + log1p before binning; same bins either way), ``max_length`` (default
    args max_seq_len, 1,200 incl. <cls>), ``seed`` (mixed into each cell's random generator)."""

    name = "scgpt"
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "tiny": {**human_args(), **_TINY_OVERRIDES},
        "human": human_args(),
    }
    lora_targets: ClassVar[list[str]] = ["self_attn.Wqkv", "self_attn.out_proj", "linear1", "linear2"]
    #: gene-as-token: the gene-token embedding; baseline = the padding token at every gene token
    attribution_adapter = AttributionAdapter(layer=lambda m: m.encoder.embedding, lookup=tokenizer_lookup)
    #: get_batch_cell_embeddings runs under torch.cuda.amp.autocast (float16) on a GPU
    upstream_gpu_dtype = "float16"
    #: binning is by rank within a cell, so counts and normalised + log1p data give the same tokens
    requires_counts = False
    default_options: ClassVar[dict[str, Any]] = {
        "checkpoint": None,
        "preset": None,
        "l2_normalize": True,
        "normalize": "none",
        "max_length": None,
        "seed": 0,
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        opts = self.options
        if not isinstance(opts["l2_normalize"], bool):
            raise UserError(f"scgpt option l2_normalize={opts['l2_normalize']!r}: use true or false")
        if opts["normalize"] not in _NORMALIZE:
            raise UserError(
                f"scgpt option normalize={opts['normalize']!r}: use none (values as given) or log1p "
                "(normalize_total 1e4 + log1p before binning)"
            )
        ml = opts["max_length"]
        if ml is not None and (isinstance(ml, bool) or not isinstance(ml, int) or ml < 2):
            raise UserError(f"scgpt option max_length={ml!r}: use an integer >= 2 (tokens incl. <cls>) or null")
        if isinstance(opts["seed"], bool) or not isinstance(opts["seed"], int):
            raise UserError(f"scgpt option seed={opts['seed']!r}: use an integer")
        self._meta: tuple[ScGPTConfig, dict[str, int]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_meta"] = None  # re-read on the other side instead of shipping a 60k-entry vocabulary
        return state

    def checkpoint_meta(self) -> tuple[ScGPTConfig, dict[str, int]]:
        """(config, vocabulary) of the checkpoint directory, read once."""
        if self._meta is None:
            path = self.checkpoint_dir()
            check_checkpoint_dir(path)
            self._meta = (config_from_args(read_args(path / ARGS_FILE)), read_vocab(path / VOCAB_FILE))
        return self._meta

    def check_store(self, store: Any) -> None:
        """Counts and normalised data embed alike; negative values (scaled / z-scored data) have no
        'expressed' meaning for scGPT's binning of non-zero values and are refused."""
        if store.is_counts:
            return
        seen = 0
        for batch in store.iter_batches(batch_size=2048, columns=["value"]):
            flat = batch.column("value").flatten().to_numpy(zero_copy_only=False)
            if len(flat) and float(np.min(flat)) < 0:
                raise UserError(
                    f"{store.path} holds negative values (scaled or z-scored data); scGPT bins each cell's "
                    "expressed (non-zero) values by rank and needs raw counts or normalised/log1p values: convert "
                    "the counts layer (scdrugmap-ray convert ... --layer counts)"
                )
            seen += batch.num_rows
            if seen >= 2048:  # scaled data has negatives in every cell: a first block tells
                break
        log.info("scgpt: %s holds non-count values; binning is per-cell by rank, so they are used as given", store.path)

    @property
    def max_length(self) -> int:
        ml = self.options["max_length"]
        return int(ml) if ml is not None else self.checkpoint_meta()[0].max_seq_len

    @property
    def embedding_dim(self) -> int:
        return self.checkpoint_meta()[0].d_model

    def make_tokenizer(self, genes: pd.DataFrame) -> ScGPTTokenizer:
        cfg, vocab = self.checkpoint_meta()
        tok = ScGPTTokenizer(
            genes,
            vocab,
            n_bins=cfg.n_bins,
            max_length=self.max_length,
            pad_value=cfg.pad_value,
            seed=self.options["seed"],
            normalize=self.options["normalize"],
        )
        tok.log_coverage("scgpt", "the vocabulary")
        return tok

    def collate(self, rows: dict[str, list[np.ndarray]], pad_to: int | None = None) -> dict[str, Any]:
        cfg, vocab = self.checkpoint_meta()
        ids, lengths = pad_ragged(rows["input_ids"], vocab[cfg.pad_token], np.int64, pad_to)
        vals, _ = pad_ragged(rows["values"], cfg.pad_value, np.float32, pad_to)
        input_ids, values = torch.from_numpy(ids), torch.from_numpy(vals)
        mask = torch.from_numpy(np.arange(ids.shape[1]) < lengths[:, None])
        return {"input_ids": input_ids, "values": values, "attention_mask": mask}

    def load(self, device: str = "cpu", dtype: Any = None) -> ScGPTEncoder:
        dtype = self.weights_dtype(device, dtype)  # option dtype: upstream precision by default
        cfg, vocab, state = read_checkpoint(self.checkpoint_dir())
        self._meta = (cfg, vocab)
        return materialize(lambda: ScGPTEncoder(cfg, len(vocab), vocab[cfg.pad_token]), state, device, dtype)

    def embed(self, module: ScGPTEncoder, batch: dict[str, Any]) -> torch.Tensor:
        hidden = module(batch["input_ids"], batch["values"], batch["attention_mask"])
        cell = hidden[:, 0, :].float()  # the <cls> position
        return F.normalize(cell, p=2.0, dim=1) if self.options["l2_normalize"] else cell

    @classmethod
    def init_random(cls, out_dir: Path, preset: str = "tiny", config: dict[str, Any] | None = None) -> Path:
        if preset not in cls.presets:
            raise UserError(f"model 'scgpt' has no preset {preset!r}; presets: {', '.join(cls.presets)}")
        args = {**copy.deepcopy(cls.presets[preset]), **copy.deepcopy(config or {})}
        cfg = config_from_args(args)
        vocab = complete_vocab(load_census_vocab())
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same preset always gives the same file (stable cache keys)
            module = ScGPTEncoder(cfg, len(vocab), vocab[cfg.pad_token])
            # TransformerModel.init_weights: gene embeddings uniform in [-0.1, 0.1]
            nn.init.uniform_(module.encoder.embedding.weight, -0.1, 0.1)
            state: dict[str, torch.Tensor] = dict(module.state_dict())
            # the RELEASED file's key set: heads of generative pretraining, no classifier
            for key, shape in released_head_shapes(cfg).items():
                state[key] = _random_head_tensor(key, shape)
        ordered = {k: state[k].contiguous() for k in released_shapes(cfg, len(vocab))}
        with atomic_file(out_dir / CHECKPOINT_FILE) as tmp:
            torch.save(ordered, tmp)
        write_json(out_dir / ARGS_FILE, args)
        write_json(out_dir / VOCAB_FILE, vocab)
        cls.mark_random(out_dir, preset)
        return out_dir


def _random_head_tensor(key: str, shape: tuple[int, ...]) -> torch.Tensor:
    if key.endswith(".bias"):
        return torch.zeros(shape)
    if len(shape) == 1:  # LayerNorm weights of the classifier
        return torch.ones(shape)
    return torch.randn(shape) * 0.02
