"""scFoundation (xTrimoGene ``MaeAutobin``) cell embeddings.

What the original does (biomap-research/scFoundation, ``model/get_embedding.py`` with
``--input_type singlecell --output_type cell``, ``model/load.py``, ``model/pretrainmodels/*``):

* Input: one cell = a vector over the fixed 19,264-gene order of ``OS_scRNA_gene_index.19264.tsv``
  (``main_gene_selection``: genes of the data that are not in the list are dropped, missing ones are
  zero-filled). With ``--pre_normalized F`` the values are ``log1p(x / sum(x) * 1e4)`` and the total
  count is ``sum(x)`` over those 19,264 genes; with ``T`` the values are used as given and the total
  is their sum.
* Two values are appended: T (``--tgthighres``: ``t<v>`` -> T = v, ``f<v>`` -> T = log10(total * v),
  ``a<v>`` -> T = log10(total) + v; default ``t4``) and S = log10(total). Position ids are 0..19,265
  (T at 19,264, S at 19,265).
* ``gatherData``: only values > 0 go to the encoder, in ascending position order (so T and S come
  last); the reference script embeds one cell at a time, so there is no padding.
* ``token_emb`` (auto-discretization: Linear(1, bins) -> LeakyReLU(0.1) -> alpha * h + Linear(bins,
  bins)(h) -> softmax -> weights @ bin embeddings; the mask / pad values are replaced by ``emb_mask`` /
  ``emb_pad``) + ``pos_emb(position ids)`` -> encoder = 12 post-norm ``nn.TransformerEncoderLayer``
  (ReLU, ff 4 x d) + a final LayerNorm.
* Cell embedding (``--pool_type all``): ``concat(h[:, -1], h[:, -2], max(h[:, :-2]), mean(h[:, :-2]))``
  = S token, T token, max and mean over the gene tokens: 4 x 768 = 3,072-d for the 100M model;
  ``--pool_type max``: max over all tokens (768-d).
* Checkpoint ``models.ckpt``: ``torch.save`` of a dict with sub-models ``gene``, ``cell`` and ``rde``,
  each a Lightning-style ``{"config": {"model": "mae_autobin", "model_config": {"mae_autobin": {...}},
  "dataset_config": {"rnaseq": {...}}}, "state_dict": {"model.<name>": tensor}}``; ``load_model_frommmf``
  flattens the config (dataset values override model values) and strips ``model.``. Cell embeddings use
  sub-model ``cell`` (``--version ce``, the default) or ``rde`` (``--version rde``, read-depth
  enhancement).

Where this file follows it: the same gene order (vendored, see ``resources/scfoundation/README.md``), the
same normalisation, T/S rules, token order, embedding modules and pooling, and the same checkpoint
container (read with ``torch.load(weights_only=True)``; ``init_random`` writes that container with the
official key names and shapes of ``../shared/assets/manifests/scfoundation.json``).

Where it differs, and why:

* Batching: cells are padded to the longest cell of a batch and the padding is masked in attention and
  excluded from the pooling, so a cell's embedding equals the one-cell-at-a-time result (within float
  tolerance); the T / S outputs are taken at each cell's own last two real tokens.
* Attention runs through ``F.scaled_dot_product_attention``; the fused q/k/v projection is an
  ``nn.Linear`` named ``self_attn.in_proj`` (official keys ``self_attn.in_proj_weight`` /
  ``in_proj_bias`` are renamed on load and on write), so LoRA can act on it.
* Only the encoder side is built (it is all a cell embedding uses). The decoder's official keys
  (``decoder_embed.*``, ``norm.*``, ``to_final.*``, ``decoder.*``: see ``official_decoder_shapes``) must be
  present with the right shapes and are then dropped; any other key is an error.
* Store genes are matched to the list by exact symbol (as ``main_gene_selection``); when a symbol occurs
  more than once in the store, its first occurrence is used (what scanpy's ``var_names_make_unique``
  followed by the original selection gives).
* Degenerate cells the original cannot embed (fewer than 3 tokens, e.g. one count in total) get zeros for
  the parts that do not exist instead of an exception.
"""

from __future__ import annotations

import copy
import gzip
import logging
import math
import re
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..fsutil import atomic_file
from .attention import EncoderLayer, SdpaSelfAttention
from .base import CellTokenizer, FoundationModel, pad_ragged, register
from .checkpoint import check_state, load_weights_file, materialize, short_keys
from .contract import AttributionAdapter, check_coverage, tokenizer_lookup
from .performer import performer_layer_shapes

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "models.ckpt"
GENE_LIST_FILE = Path(__file__).parent / "resources" / "scfoundation" / "OS_scRNA_gene_index.19264.tsv.gz"
N_GENES = 19_264
T_POSITION = N_GENES  # the T (target resolution) token
S_POSITION = N_GENES + 1  # the S (total count) token
SEQ_LEN = N_GENES + 2
#: padded positions use pos_emb's spare last row (index seq_len), as the original's getEncoerDecoderData
PAD_POSITION = SEQ_LEN
#: sub-model of models.ckpt used for cell embeddings, by the original's --version
VERSION_KEYS = {"ce": "cell", "rde": "rde"}
SUBMODELS = ("gene", "cell", "rde")
STATE_PREFIX = "model."

_IN_PROJ_OFFICIAL = re.compile(r"^(encoder\.transformer_encoder\.\d+\.self_attn\.)in_proj_(weight|bias)$")
_IN_PROJ_MODULE = re.compile(r"^(encoder\.transformer_encoder\.\d+\.self_attn\.)in_proj\.(weight|bias)$")
_TGT_RE = re.compile(r"^([tfa])(\d+(?:\.\d*)?|\.\d+)$")

# The 100M model (manifest config_used: encoder transformer 768 x 12 x 12, decoder performer 512 x 6 x 8).
_CONFIG_100M: dict[str, Any] = {
    "model": "mae_autobin",
    "n_class": 104,
    "seq_len": SEQ_LEN,
    "bin_num": 100,
    "bin_alpha": 1.0,
    "pad_token_id": 103,
    "mask_token_id": 102,
    "encoder": {"hidden_dim": 768, "depth": 12, "heads": 12, "dim_head": 64, "module_type": "transformer"},
    "decoder": {"hidden_dim": 512, "depth": 6, "heads": 8, "dim_head": 64, "module_type": "performer"},
}
_CONFIG_TINY: dict[str, Any] = {
    **copy.deepcopy(_CONFIG_100M),
    "encoder": {"hidden_dim": 64, "depth": 2, "heads": 4, "dim_head": 16, "module_type": "transformer"},
    "decoder": {"hidden_dim": 32, "depth": 1, "heads": 2, "dim_head": 16, "module_type": "performer"},
}
# dataset_config.rnaseq of the pretraining run (model/training_hyperparameter.txt)
_DATASET_CONFIG: dict[str, Any] = {
    "bin_type": "auto_bin",
    "value_mask_prob": 0.3,
    "zero_mask_prob": 0.03,
    "replace_prob": 0.8,
    "random_token_prob": 0.1,
}


# --------------------------------------------------------------------------------------------- config


def _need(cfg: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in cfg:
        raise UserError(f"scFoundation checkpoint config has no {where}{key!r}; is this an official models.ckpt?")
    val = cfg[key]
    if isinstance(val, bool) or not isinstance(val, kind):
        raise UserError(f"scFoundation checkpoint config {where}{key!r} = {val!r} has the wrong type")
    return val


def validate_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Check a flattened scFoundation config (as ``load_model_frommmf`` builds it); returns it."""
    if cfg.get("model") != "mae_autobin":
        raise UserError(
            f"scFoundation checkpoint model type {cfg.get('model')!r} is not supported; only 'mae_autobin' "
            "(the released models.ckpt) is"
        )
    for key in ("seq_len", "bin_num", "pad_token_id", "mask_token_id", "n_class"):
        _need(cfg, key, int, "")
    _need(cfg, "bin_alpha", (int, float), "")
    if cfg["seq_len"] != SEQ_LEN:
        raise UserError(
            f"scFoundation checkpoint has seq_len {cfg['seq_len']}, but the 19,264-gene order needs {SEQ_LEN} "
            "(19,264 genes + T + S); this checkpoint is not for that gene list"
        )
    for side in ("encoder", "decoder"):
        sub = _need(cfg, side, dict, "")
        for key in ("hidden_dim", "depth", "heads"):
            if _need(sub, key, int, f"{side}.") <= 0:
                raise UserError(f"scFoundation checkpoint config {side}.{key} must be positive")
        mtype = _need(sub, "module_type", str, f"{side}.")
        if mtype not in ("transformer", "performer") or (side == "encoder" and mtype != "transformer"):
            raise UserError(
                f"scFoundation checkpoint {side} module_type {mtype!r} is not supported (encoder: transformer; "
                "decoder: transformer or performer)"
            )
        if mtype == "performer":
            _need(sub, "dim_head", int, f"{side}.")
    enc = cfg["encoder"]
    if enc["hidden_dim"] % enc["heads"]:
        raise UserError(f"scFoundation encoder hidden_dim {enc['hidden_dim']} is not divisible by heads {enc['heads']}")
    return cfg


def flatten_config(container_config: Any) -> dict[str, Any]:
    """The flat config of one sub-model, as the original's ``convertconfig`` builds it: the model's
    ``model_config`` entries, then ``dataset_config.rnaseq`` entries (these win), plus ``model``."""
    try:
        mtype = container_config["model"]
        flat = dict(container_config["model_config"][mtype])
        flat.update(dict(container_config["dataset_config"]["rnaseq"]))
        # the original's select_model reads config["model"] from inside model_config[model]
        flat.setdefault("model", mtype)
    except (KeyError, TypeError) as err:
        raise UserError(
            f"scFoundation checkpoint config lacks {err}: expected config['model'], config['model_config'][model] "
            "and config['dataset_config']['rnaseq'] as in the official models.ckpt"
        ) from None
    flat["encoder"] = dict(flat.get("encoder", {}) or {})
    flat["decoder"] = dict(flat.get("decoder", {}) or {})
    return flat


def container_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The nested (on-disk) config of one sub-model for a flat config."""
    model_cfg = copy.deepcopy(cfg)  # keeps "model": select_model reads it from the flattened config
    return {
        "model": cfg["model"],
        "model_config": {cfg["model"]: model_cfg},
        "dataset_config": {"rnaseq": {"bin_num": cfg["bin_num"], **_DATASET_CONFIG}},
    }


def _transformer_shapes(prefix: str, dim: int, depth: int, ff_mult: int = 4) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for i in range(depth):
        p = f"{prefix}transformer_encoder.{i}."
        out[p + "self_attn.in_proj_weight"] = (3 * dim, dim)
        out[p + "self_attn.in_proj_bias"] = (3 * dim,)
        out[p + "self_attn.out_proj.weight"] = (dim, dim)
        out[p + "self_attn.out_proj.bias"] = (dim,)
        out[p + "linear1.weight"] = (ff_mult * dim, dim)
        out[p + "linear1.bias"] = (ff_mult * dim,)
        out[p + "linear2.weight"] = (dim, ff_mult * dim)
        out[p + "linear2.bias"] = (dim,)
        for norm in ("norm1", "norm2"):
            out[p + f"{norm}.weight"] = (dim,)
            out[p + f"{norm}.bias"] = (dim,)
    out[prefix + "norm.weight"] = (dim,)
    out[prefix + "norm.bias"] = (dim,)
    return out


def _performer_shapes(
    prefix: str, dim: int, depth: int, heads: int, dim_head: int, ff_mult: int = 4
) -> dict[str, tuple[int, ...]]:
    # PerformerModule(qkv_bias=True), FastAttention's nb_features = int(dim_head * ln(dim_head))
    nb_features = int(dim_head * math.log(dim_head))
    out: dict[str, tuple[int, ...]] = {prefix + "performer.calls_since_last_redraw": ()}
    out.update(performer_layer_shapes(prefix + "performer.", dim, depth, heads * dim_head, dim_head, nb_features,
                                      ff_mult, qkv_bias=True))
    out[prefix + "norm.weight"] = (dim,)
    out[prefix + "norm.bias"] = (dim,)
    return out


def official_encoder_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Official state-dict keys (without ``model.``) and shapes of what a cell embedding uses."""
    enc = cfg["encoder"]
    d = enc["hidden_dim"]
    out: dict[str, tuple[int, ...]] = {
        "token_emb.mlp.weight": (cfg["bin_num"], 1),
        "token_emb.mlp.bias": (cfg["bin_num"],),
        "token_emb.mlp2.weight": (cfg["bin_num"], cfg["bin_num"]),
        "token_emb.mlp2.bias": (cfg["bin_num"],),
        "token_emb.emb.weight": (cfg["bin_num"], d),
        "token_emb.emb_mask.weight": (1, d),
        "token_emb.emb_pad.weight": (1, d),
        "pos_emb.weight": (cfg["seq_len"] + 1, d),
    }
    out.update(_transformer_shapes("encoder.", d, enc["depth"]))
    return out


def official_decoder_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The official decoder-side keys: required in a checkpoint (shape-checked), then dropped, since a
    cell embedding never runs the decoder."""
    d, dec = cfg["encoder"]["hidden_dim"], cfg["decoder"]
    dd = dec["hidden_dim"]
    out: dict[str, tuple[int, ...]] = {
        "decoder_embed.weight": (dd, d),
        "decoder_embed.bias": (dd,),
        "norm.weight": (dd,),
        "norm.bias": (dd,),
        "to_final.weight": (1, dd),
        "to_final.bias": (1,),
    }
    if dec["module_type"] == "performer":
        out.update(_performer_shapes("decoder.", dd, dec["depth"], dec["heads"], dec["dim_head"]))
    else:
        out.update(_transformer_shapes("decoder.", dd, dec["depth"]))
    return out


def official_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every key of an official sub-model state dict (without the ``model.`` prefix) with its shape, in
    the official order (MaeAutobin registers token_emb, pos_emb, decoder_embed, norm, to_final, then the
    encoder and decoder modules that select_model attaches)."""
    enc, dec = official_encoder_shapes(cfg), official_decoder_shapes(cfg)
    first = [k for k in enc if not k.startswith("encoder.")] + [k for k in dec if not k.startswith("decoder.")]
    rest = [k for k in enc if k.startswith("encoder.")] + [k for k in dec if k.startswith("decoder.")]
    both = {**enc, **dec}
    return {k: both[k] for k in first + rest}


def _to_module_key(key: str) -> str:
    return _IN_PROJ_OFFICIAL.sub(r"\1in_proj.\2", key)


def _to_official_key(key: str) -> str:
    return _IN_PROJ_MODULE.sub(r"\1in_proj_\2", key)


# --------------------------------------------------------------------------------------------- modules


class AutoDiscretizationEmbedding(nn.Module):
    """Value -> soft mixture of ``bin_num`` bin embeddings (official names: mlp, mlp2, emb, emb_mask, emb_pad)."""

    def __init__(self, dim: int, bin_num: int, bin_alpha: float, mask_token_id: int) -> None:
        super().__init__()
        self.bin_alpha = bin_alpha
        self.mask_token_id = mask_token_id
        self.mlp = nn.Linear(1, bin_num)
        self.mlp2 = nn.Linear(bin_num, bin_num)
        self.emb = nn.Embedding(bin_num, dim)
        self.emb_mask = nn.Embedding(1, dim)
        self.emb_pad = nn.Embedding(1, dim)

    def forward(self, values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = values.to(self.mlp.weight.dtype).unsqueeze(-1)
        h = F.leaky_relu(self.mlp(x), 0.1)
        h = self.bin_alpha * h + self.mlp2(h)
        out = torch.softmax(h, dim=-1) @ self.emb.weight
        # the original swaps in emb_mask / emb_pad for tokens whose value equals the mask / pad id;
        # padding here is known from the mask, so a real value can never be taken for padding
        out = torch.where((values == self.mask_token_id).unsqueeze(-1), self.emb_mask.weight[0], out)
        return torch.where(attention_mask.unsqueeze(-1), out, self.emb_pad.weight[0])


class SelfAttention(SdpaSelfAttention):
    """Multi-head self-attention with the math of ``nn.MultiheadAttention`` through SDPA; the stacked
    projection is stored under the official keys self_attn.in_proj_weight / in_proj_bias."""

    qkv_name = "in_proj"


class TransformerEncoder(nn.Module):
    """Official names: ``transformer_encoder.<i>`` layers and a final ``norm``."""

    def __init__(self, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        # the original's nn.TransformerEncoderLayer(dim, heads) defaults: feed-forward 4 x dim, dropout 0.1
        self.transformer_encoder = nn.ModuleList(
            EncoderLayer(dim, heads, 4 * dim, 0.1, SelfAttention) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        attn_mask = attention_mask[:, None, None, :]  # keys only: padded keys are never attended to
        for layer in self.transformer_encoder:
            x = layer(x, attn_mask)
        return self.norm(x)


class ScFoundationEncoder(nn.Module):
    """The encoder side of MaeAutobin: ``token_emb`` + ``pos_emb`` -> ``encoder``; hidden states out."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        enc = cfg["encoder"]
        d = enc["hidden_dim"]
        self.config = copy.deepcopy(cfg)
        self.hidden_dim = d
        self.token_emb = AutoDiscretizationEmbedding(d, cfg["bin_num"], float(cfg["bin_alpha"]), cfg["mask_token_id"])
        self.pos_emb = nn.Embedding(cfg["seq_len"] + 1, d)
        self.encoder = TransformerEncoder(d, enc["depth"], enc["heads"])

    def forward(self, input_ids: torch.Tensor, values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.token_emb(values, attention_mask) + self.pos_emb(input_ids)
        return self.encoder(x, attention_mask)


def pool_cells(hidden: torch.Tensor, attention_mask: torch.Tensor, pool_type: str = "all") -> torch.Tensor:
    """The original's cell embedding from hidden states [n, L, d] of cells padded at the end.

    ``all``: concat(last token (S), second-to-last token (T), max and mean over the other tokens),
    each taken at the cell's own length; ``max``: max over all real tokens. Parts a cell has no tokens
    for (fewer than 3 tokens) are zeros.
    """
    hidden = hidden.float()
    n, length, _ = hidden.shape
    lengths = attention_mask.sum(1)
    pos = torch.arange(length, device=hidden.device)
    zero = hidden.new_zeros(())
    neg_inf = hidden.new_tensor(float("-inf"))

    def masked_max(keep: torch.Tensor) -> torch.Tensor:
        out = torch.where(keep.unsqueeze(-1), hidden, neg_inf).amax(1)
        return torch.where(keep.any(1, keepdim=True), out, zero)

    if pool_type == "max":
        return masked_max(pos[None, :] < lengths[:, None])
    rows = torch.arange(n, device=hidden.device)

    def token(back: int) -> torch.Tensor:
        idx = (lengths - back).clamp(min=0)
        return torch.where((lengths >= back).unsqueeze(-1), hidden[rows, idx], zero)

    genes = pos[None, :] < (lengths - 2)[:, None]
    count = genes.sum(1, keepdim=True)
    mean = torch.where(genes.unsqueeze(-1), hidden, zero).sum(1) / count.clamp(min=1)
    return torch.cat([token(1), token(2), masked_max(genes), mean], dim=1)


# --------------------------------------------------------------------------------------------- tokenizer


def load_gene_list() -> list[str]:
    """The 19,264 gene symbols in the model's order (vendored ``OS_scRNA_gene_index.19264.tsv``)."""
    with gzip.open(GENE_LIST_FILE, "rt") as fh:
        df = pd.read_csv(fh, sep="\t", dtype={"gene_name": str, "index": np.int64})
    if len(df) != N_GENES or not np.array_equal(df["index"].to_numpy(), np.arange(N_GENES)):
        raise RuntimeError(f"{GENE_LIST_FILE} is damaged: expected {N_GENES} genes indexed 0..{N_GENES - 1}")
    return df["gene_name"].tolist()


def parse_tgthighres(spec: str) -> tuple[str, float]:
    m = _TGT_RE.match(str(spec))
    if not m:
        raise UserError(
            f"scfoundation option tgthighres={spec!r} is invalid: use t<number> (T = number, default t4), "
            "f<number> (T = log10(total x number)) or a<number> (T = log10(total) + number)"
        )
    return m.group(1), float(m.group(2))


class ScFoundationTokenizer(CellTokenizer):
    """Store cells -> scFoundation encoder input: ``input_ids`` (int32 position ids: gene index in the
    19,264 order, then 19,264 = T and 19,265 = S) and ``values`` (float32), non-zero entries only, in
    ascending position order (the original's gatherData order)."""

    def __init__(self, genes: pd.DataFrame, tgthighres: str = "t4", pre_normalized: str = "F") -> None:
        gene_list = load_gene_list()
        index = {g: i for i, g in enumerate(gene_list)}
        symbols = genes.sort_values("position")["symbol"].tolist()
        positions = genes.sort_values("position")["position"].to_numpy()
        n_positions = int(positions.max()) + 1 if len(positions) else 0
        self.lookup = np.full(n_positions, -1, dtype=np.int32)
        taken: set[int] = set()
        for pos, sym in zip(positions, symbols, strict=True):
            vid = index.get(sym) if isinstance(sym, str) else None
            if vid is not None and vid not in taken:  # duplicated symbols: the first occurrence only
                self.lookup[pos] = vid
                taken.add(vid)
        self.n_store_genes = len(genes)
        self.n_matched = len(taken)
        self.coverage = self.n_matched / self.n_store_genes if self.n_store_genes else 0.0
        #: fraction of the model's 19,264 genes that the store has
        self.vocab_coverage = self.n_matched / N_GENES
        self.tgt_mode, self.tgt_value = parse_tgthighres(tgthighres)
        self.pre_normalized = pre_normalized
        check_coverage(self.coverage, self.n_store_genes, "are in scFoundation's 19,264 human gene symbols",
                       symbols, "scFoundation needs human gene symbols (mouse genes or Ensembl IDs without symbols "
                       "do not match): convert the data with human symbols")

    def tokenize_cell(self, gene_index: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        vid = self.lookup[np.asarray(gene_index, dtype=np.int64)]
        keep = vid >= 0
        vid = vid[keep]
        raw = np.asarray(values, dtype=np.float64)[keep]
        order = np.argsort(vid, kind="stable")
        vid, raw = vid[order], raw[order]
        total = float(raw.sum())
        with np.errstate(divide="ignore", invalid="ignore"):
            expr = np.log1p(raw / total * 1e4) if self.pre_normalized == "F" else raw
            s = np.log10(total)
            if self.tgt_mode == "t":
                t = self.tgt_value
            elif self.tgt_mode == "f":
                t = np.log10(total * self.tgt_value)
            else:
                t = np.log10(total) + self.tgt_value
        ids = np.concatenate([vid, [T_POSITION, S_POSITION]]).astype(np.int32)
        vals = np.concatenate([expr, [t, s]])  # float64, as the original's input vector
        nonzero = vals > 0  # gatherData: only values > 0 reach the encoder (NaN and -inf drop out too)
        return ids[nonzero], vals[nonzero].astype(np.float32)  # token_emb's .float()

    def __call__(
        self, cell_ids: np.ndarray, gene_index: list[np.ndarray], values: list[np.ndarray]
    ) -> dict[str, list[np.ndarray]]:
        out: dict[str, list[np.ndarray]] = {"input_ids": [], "values": []}
        for gi, v in zip(gene_index, values, strict=True):
            ids, vals = self.tokenize_cell(gi, v)
            out["input_ids"].append(ids)
            out["values"].append(vals)
        return out


# --------------------------------------------------------------------------------------------- checkpoint


def _read_container(path: Path) -> Any:
    """torch.load with weights_only=True (memory-mapped when the file is a zip archive: only the chosen
    sub-model's tensors are read). Every failure is a UserError naming the file."""
    if not path.is_file():
        raise UserError(
            f"{path} not found: a scFoundation checkpoint directory holds {CHECKPOINT_FILE} (the official "
            f"file from biomap-research/scFoundation model/models/); found: "
            f"{', '.join(sorted(p.name for p in path.parent.iterdir())) or 'nothing'}"
        )
    return load_weights_file(
        path,
        "re-save it as plain dicts of tensors, strings and numbers with the same structure "
        "({'gene'|'cell'|'rde': {'config': dict, 'state_dict': {name: tensor}}})",
    )


def read_submodel(path: Path, key: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(flat config, encoder state dict in this module's names) of sub-model ``key`` of models.ckpt: every
    encoder key with its shape; the decoder's keys skipped (named in a log line); nothing else."""
    obj = _read_container(path)
    if not isinstance(obj, dict) or not any(k in obj for k in SUBMODELS):
        found = short_keys([str(k) for k in obj]) if isinstance(obj, dict) else type(obj).__name__
        raise UserError(
            f"{path} is not an official scFoundation models.ckpt: expected a dict with sub-models "
            f"{', '.join(SUBMODELS)} (each {{'config', 'state_dict'}}); found {found}"
        )
    if key not in obj:
        raise UserError(
            f"{path} has no sub-model {key!r} (it has {', '.join(str(k) for k in obj)}); choose the matching "
            "'version' option (ce -> cell, rde -> rde)"
        )
    sub = obj[key]
    if not isinstance(sub, dict) or "config" not in sub or "state_dict" not in sub:
        found = short_keys([str(k) for k in sub]) if isinstance(sub, dict) else type(sub).__name__
        raise UserError(f"{path}: sub-model {key!r} must hold 'config' and 'state_dict'; found {found}")
    cfg = validate_config(flatten_config(sub["config"]))
    raw = sub["state_dict"]
    unprefixed = [str(k) for k in raw if not str(k).startswith(STATE_PREFIX)]
    state = {str(k)[len(STATE_PREFIX) :]: v for k, v in raw.items() if str(k).startswith(STATE_PREFIX)}
    expected = official_shapes(cfg)
    if unprefixed:  # keys outside the model. prefix are not the model's
        raise UserError(f"{path} sub-model {key!r} does not match the scFoundation architecture of its config; "
                        f"unexpected keys: {short_keys(unprefixed)}")
    enc_keys = official_encoder_shapes(cfg)
    # the MAE decoder (decoder_embed, decoder.*, norm, to_final) is never run by get_embedding's cell
    # embedding: skipped and named in one log line; a file without it (encoder only) loads too
    decoder = set(expected) - set(enc_keys)
    kept = check_state(state, enc_keys, f"{path} sub-model {key!r}", "the scFoundation architecture of its config",
                       "the config", prefix=STATE_PREFIX, skip=lambda k: k in decoder)
    return cfg, {_to_module_key(k): v for k, v in kept.items()}


# --------------------------------------------------------------------------------------------- the model


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


@register
class ScFoundationModel(FoundationModel):
    """scFoundation cell embeddings (``models.ckpt``); options: ``version`` (ce | rde: sub-model cell or
    rde), ``tgthighres`` (T token rule, default t4), ``pool_type`` (all: 4 x d | max: d),
    ``pre_normalized`` (F: raw counts, normalised here | T: values already log1p-normalised)."""

    name = "scfoundation"
    presets: ClassVar[dict[str, dict[str, Any]]] = {"tiny": _CONFIG_TINY, "100m": _CONFIG_100M}
    lora_targets: ClassVar[list[str]] = ["self_attn.in_proj", "self_attn.out_proj", "linear1", "linear2"]
    #: position-identified genes: the expression-value embedding; baseline = "not expressed"
    attribution_adapter = AttributionAdapter(layer=lambda m: m.token_emb, lookup=tokenizer_lookup, key="values",
                                            baseline=0.0)
    default_options: ClassVar[dict[str, Any]] = {
        "checkpoint": None,
        "preset": None,
        "version": "ce",
        "tgthighres": "t4",
        "pool_type": "all",
        "pre_normalized": "F",
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.options["version"] not in VERSION_KEYS:
            raise UserError(f"scfoundation option version={self.options['version']!r}: use ce (cell) or rde")
        if self.options["pool_type"] not in ("all", "max"):
            raise UserError(f"scfoundation option pool_type={self.options['pool_type']!r}: use all or max")
        if self.options["pre_normalized"] not in ("F", "T"):
            raise UserError(
                f"scfoundation option pre_normalized={self.options['pre_normalized']!r}: use F (raw counts) "
                "or T (values already normalised to 1e4 and log1p)"
            )
        parse_tgthighres(self.options["tgthighres"])

    def check_store(self, store: Any) -> None:
        if self.options["pre_normalized"] == "F":
            super().check_store(store)

    @property
    def max_length(self) -> int:
        return SEQ_LEN

    def make_tokenizer(self, genes: pd.DataFrame) -> ScFoundationTokenizer:
        tok = ScFoundationTokenizer(genes, self.options["tgthighres"], self.options["pre_normalized"])
        tok.log_coverage("scfoundation", "the 19,264-gene list")
        return tok

    def collate(self, rows: dict[str, list[np.ndarray]], pad_to: int | None = None) -> dict[str, Any]:
        ids, lengths = pad_ragged(rows["input_ids"], PAD_POSITION, np.int64, pad_to)
        vals, _ = pad_ragged(rows["values"], 0.0, np.float32, pad_to)
        input_ids, values = torch.from_numpy(ids), torch.from_numpy(vals)
        mask = torch.from_numpy(np.arange(ids.shape[1]) < lengths[:, None])
        return {"input_ids": input_ids, "values": values, "attention_mask": mask}

    def load(self, device: str = "cpu", dtype: Any = None) -> ScFoundationEncoder:
        dtype = self.weights_dtype(device, dtype)  # option dtype: upstream precision by default
        path = self.checkpoint_dir() / CHECKPOINT_FILE
        cfg, state = read_submodel(path, VERSION_KEYS[self.options["version"]])
        return materialize(lambda: ScFoundationEncoder(cfg), state, device, dtype)

    def embed(self, module: ScFoundationEncoder, batch: dict[str, Any]) -> torch.Tensor:
        mask = batch["attention_mask"]
        hidden = module(batch["input_ids"], batch["values"], mask)
        return pool_cells(hidden, mask, self.options["pool_type"]).float()

    @classmethod
    def init_random(cls, out_dir: Path, preset: str = "tiny", config: dict[str, Any] | None = None) -> Path:
        if preset not in cls.presets:
            raise UserError(f"model 'scfoundation' has no preset {preset!r}; presets: {', '.join(cls.presets)}")
        cfg = validate_config(_deep_merge(cls.presets[preset], config or {}))
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same preset always gives the same file (stable cache keys)
            enc_state = ScFoundationEncoder(cfg).state_dict()
            state: dict[str, torch.Tensor] = {_to_official_key(k): v for k, v in enc_state.items()}
            for k, shape in official_decoder_shapes(cfg).items():
                state[k] = _random_decoder_tensor(k, shape)
        ordered = {STATE_PREFIX + k: state[k].contiguous() for k in official_shapes(cfg)}
        sub_config = container_config(cfg)
        # the same tensors under every sub-model: torch.save stores each storage once
        container = {k: {"config": copy.deepcopy(sub_config), "state_dict": dict(ordered)} for k in SUBMODELS}
        with atomic_file(out_dir / CHECKPOINT_FILE) as tmp:
            torch.save(container, tmp)
        cls.mark_random(out_dir, preset)
        return out_dir


def _random_decoder_tensor(key: str, shape: tuple[int, ...]) -> torch.Tensor:
    if key.endswith("calls_since_last_redraw"):
        return torch.tensor(0)
    if key.endswith("projection_matrix"):
        return torch.randn(shape)
    is_norm = key.split(".")[-2].startswith("norm") or key.startswith("norm.")
    if key.endswith(".bias"):
        return torch.zeros(shape)
    if is_norm:
        return torch.ones(shape)
    return torch.randn(shape) * 0.02
