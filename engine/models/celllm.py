"""CellLM (OpenBioMed, PharMolix) cell embeddings.

What the original does (PharMolix/OpenBioMed, commit ce3ccab: ``open_biomed/models/cell/performer_celllm.py``
``PerformerLM_CellLM``, ``open_biomed/feature/cell_featurizer.py`` ``CellFullseqFeaturizer``,
``open_biomed/datasets/ctc_dataset.py``, ``open_biomed/models/task_model/ctc_model.py``,
``configs/ctc/cellLM.json``):

* Config (``configs/ctc/cellLM.json`` ``network.structure``): num_tokens 8, dim 512, depth 10, heads 16,
  max_seq_len 6,000, gene_num 19,379, local_attn_heads 0, g2v_position_emb true, gene2vec
  ``gene2vec_19379_512.npy``, checkpoint ``ckpts/cell_ckpts/celllm/checkpoint4_fixed.pth`` read with
  ``torch.load`` and ``ckpt["model_state_dict"]`` (``param_key``), loaded with strict ``load_state_dict``.
  Not in the config, so PerformerLM_CellLM's defaults: dim_head 64 (inner width 16 x 64 = 1,024),
  qkv_bias False, ff_mult 4 (GELU), nb_features int(64 ln 64) = 266, tie_embed False. That makes 51.9M
  parameters (the paper: "over 50 million").
* Featurizer ``Fullseq``: a cell is its dense row over the 19,379 genes of the h5ad the user prepared
  (``zheng68k_hgnc.h5ad`` in the docs), values used as stored. The encoder's forward then keeps values > 0
  in gene-index order, caps them at ``cls_token_id - 1`` = 5 and truncates to integers (``.long()``):
  expression tokens 0..5 (a value in (0, 1) is token 0). It prepends CLS (token ``num_tokens - 2`` = 6,
  gene ``gene_num`` = 19,379), keeps the first ``max_seq_len`` = 6,000 entries (CLS + the first 5,999
  expressed genes in gene order, not the most expressed ones) and pads every cell to 6,000 with token 7
  (``num_tokens - 1``) at gene ``gene_num + 1``.
* Embedding: ``token_emb(token) + pos_emb(gene)``; pos_emb is gene2vec (19,379 x 512) plus a row of ones
  (CLS) and a row of zeros (PAD), a frozen ``nn.Embedding.from_pretrained`` of the float64 array. Then 10
  pre-LayerNorm Performer blocks (FAVOR+ softmax-kernel linear attention, no positional term inside the
  layers; padded values are zeroed before attention, padded keys are not) and a final LayerNorm.
* The model has no cell-embedding head: OpenBioMed's downstream models (CTCModel, the drug-response
  ConvPooler) map each gene token's 512-d output to one number with a Conv2d and scatter those into a
  19,380-wide vector. scDrugMap (QSong-github/scDrugMap ``code/cellLM/benchmarking_main_EBD.py`` trains a
  512-input MLP on stored embeddings; its ``get_ebd.py`` is not in that repository, a public copy of it calls
  ``CTCModel(config["network"], 2)(cell)`` on batches of 48 cells) does not say which 512-d vector it stored:
  as published that call returns CTCModel's 2-class logits from a randomly initialised head. Its LoRA runs
  target ``to_q``, ``to_k``, ``to_v``.

Checkpoint directory (what ``load`` reads; ``init_random`` writes the same): ``cellLM.json`` (optional,
OpenBioMed's config format; without it the released config above is assumed), the weights file its
``ckpt_path`` names (else the directory's only ``*.pth`` / ``*.pt``), and ``gene_list.txt`` (below).

Where this file follows it: the same token rules (cap, truncation, CLS first, gene order, 6,000 limit),
the same modules and official state-dict keys (``token_emb``, ``pos_emb.emb``,
``performer.net.layers.{i}.{0,1}...``, ``performer.calls_since_last_redraw``, ``norm``, ``to_out``), the
same FAVOR+ math, and the checkpoint container (``{"model_state_dict": state}``; ``init_random`` writes it,
with ``cellLM.json`` in the official config format). The Performer blocks are performer-pytorch's own
``SelfAttention`` / ``PreLayerNorm`` / ``Chunk`` / ``FeedForward`` modules (identical parameters and names
to OpenBioMed's copy); only the attention core is computed here, see below.

Where it differs, and why:

* Cell embedding: the final-LayerNorm output at the CLS token (512-d). The original defines none (above);
  the model prepends a dedicated CLS token (gene2vec row of ones) for its contrastive pre-training, so CLS is
  the natural cell vector. ``pool: mean`` gives the mean over the cell's gene tokens instead. Not
  verified against the authors' embeddings.
* Padding: the original pads every cell to 6,000 and its padded keys enter the attention normaliser. All
  padded tokens of a cell are identical at every layer (same input, attention has no positions), so this
  file appends ONE pad token per cell that stands for all of them: its key counts ``6000 - length`` times
  in the normaliser, its value is zeroed as the original's. Cells are then padded only to the longest cell
  of a batch (weight 0, excluded everywhere). Same result as padding to 6,000, at a fraction of the cost;
  the test checks it against a literal 6,000-token computation.
* Key stabiliser: the original's key kernel subtracts ``torch.max(data_dash)`` over the WHOLE batch (all
  cells, heads, positions) before adding eps = 1e-4, so a cell's embedding depends on its batch-mates
  through that eps; performer-pytorch 1.1.4 subtracts a per-(cell, head) max instead. Here it is the max
  over one cell's heads, positions and features: exactly the original run on a batch of one cell, and
  batch-independent. This is the one place the attention differs from performer-pytorch, so
  ``performer_pytorch.softmax_kernel`` is reused for queries (per-row max, same in all three) and only the
  key side and the pad-weighted sums are written here (in place under inference, to keep one
  [cells, heads, tokens, 266] tensor alive instead of three).
* Input values: OpenBioMed uses the h5ad values as stored. Stores hold raw counts, so by default
  (``normalize: log2``) they become scBERT's preprocessing, which CellLM's 5-bin scheme and Zheng68k data
  come from: ``log2(1 + count / total x 1e4)``, total over the cell's genes in the 19,379-gene list (as
  scBERT normalises after mapping to its gene list). Not verified for CellLM: ``normalize: ln`` (natural
  log) or ``none`` (values as stored, e.g. a store of already normalised values) reproduce other choices.
* Gene list: the 19,379 gene names are not public (only the gene2vec matrix's shape is); the checkpoint
  directory must hold them as ``gene_list.txt`` (one symbol per line, gene2vec row order). Store genes match
  by exact symbol; a symbol occurring twice in the store uses its first occurrence. ``init_random`` writes a
  stand-in list (19,379 human symbols in Entrez order from ``engine/data/resources/human_genes.tsv.gz``).
* pos_emb is used in float32 (the original keeps float64 and adds it into float32 in place: same result to
  float32 rounding). ``gene2vec_19379_512.npy`` is not read: the checkpoint holds the same rows as
  ``pos_emb.emb.weight``.
* The language-model head ``to_out`` is skipped and named in one log line (never run; a file without it
  loads too); every other key is loaded strictly. LoRA targets are the
  q/k/v/out projections and both feed-forward layers (scDrugMap's q/k/v only: ``lora.targets`` narrows it).
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..data.gene_ids import gene_table
from ..errors import UserError
from ..fsutil import atomic_file, write_json
from .base import CellTokenizer, FoundationModel, pad_ragged, register
from .checkpoint import check_state, load_weights_file, short_keys
from .contract import AttributionAdapter, check_coverage, tokenizer_lookup
from .performer import performer_layer_shapes

log = logging.getLogger(__name__)

CONFIG_FILE = "cellLM.json"
GENE_LIST_FILE = "gene_list.txt"
#: the official config's checkpoint file name (configs/ctc/cellLM.json ckpt_path)
DEFAULT_WEIGHTS_FILE = "checkpoint4_fixed.pth"
PARAM_KEY = "model_state_dict"
KERNEL_EPS = 1e-4  # softmax_kernel's eps

# configs/ctc/cellLM.json network.structure, plus the PerformerLM_CellLM defaults it relies on
_STRUCTURE_REAL: dict[str, Any] = {
    "name": "celllm",
    "num_tokens": 8,
    "dim": 512,
    "depth": 10,
    "max_seq_len": 6000,
    "gene_num": 19379,
    "heads": 16,
    "local_attn_heads": 0,
    "g2v_position_emb": True,
}
_STRUCTURE_TINY: dict[str, Any] = {**_STRUCTURE_REAL, "dim": 32, "depth": 2, "heads": 2, "dim_head": 16}
_DEFAULTS: dict[str, Any] = {"dim_head": 64, "qkv_bias": False, "ff_mult": 4, "nb_features": None}


# --------------------------------------------------------------------------------------------- config


def resolve_config(structure: dict[str, Any]) -> dict[str, Any]:
    """The architecture from an official ``network.structure`` dict (defaults filled), validated."""
    cfg = {**_DEFAULTS, **structure}
    for key in ("num_tokens", "dim", "depth", "heads", "dim_head", "max_seq_len", "gene_num", "ff_mult"):
        val = cfg.get(key)
        if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
            raise UserError(f"CellLM config {key} = {val!r} must be a positive integer")
    if cfg["num_tokens"] < 3:
        raise UserError(f"CellLM config num_tokens = {cfg['num_tokens']} leaves no expression token (needs >= 3)")
    if cfg["dim"] % cfg["heads"]:
        raise UserError(f"CellLM config dim {cfg['dim']} is not divisible by heads {cfg['heads']}")
    if cfg.get("local_attn_heads", 0) not in (0, [0], (0,)):
        raise UserError("CellLM config local_attn_heads must be 0 (the released model has no local attention)")
    if cfg.get("g2v_position_emb", True) is not True:
        raise UserError("CellLM config g2v_position_emb must be true (the released model uses gene2vec)")
    if cfg["nb_features"] is None:
        cfg["nb_features"] = int(cfg["dim_head"] * math.log(cfg["dim_head"]))
    return cfg


#: the language-model head of PerformerLM_CellLM (official key prefix)
HEAD_PREFIX = "to_out."


def official_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every key of PerformerLM_CellLM's state dict with its shape, in registration order."""
    d, inner, nt = cfg["dim"], cfg["heads"] * cfg["dim_head"], cfg["num_tokens"]
    out: dict[str, tuple[int, ...]] = {
        "token_emb.weight": (nt, d),
        "pos_emb.emb.weight": (cfg["gene_num"] + 2, d),
    }
    out.update(performer_layer_shapes("performer.", d, cfg["depth"], inner, cfg["dim_head"], cfg["nb_features"],
                                      cfg["ff_mult"], qkv_bias=cfg["qkv_bias"]))
    out["performer.calls_since_last_redraw"] = ()
    out["norm.weight"] = (d,)
    out["norm.bias"] = (d,)
    out["to_out.weight"] = (nt, d)
    out["to_out.bias"] = (nt,)
    return out


# --------------------------------------------------------------------------------------------- modules


class _Gene2Vec(nn.Module):
    """Holds ``emb`` (official key ``pos_emb.emb.weight``): gene2vec rows, then CLS (ones), PAD (zeros)."""

    def __init__(self, n_rows: int, dim: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(n_rows, dim)
        self.emb.weight.requires_grad_(False)  # from_pretrained: frozen in the original


class _Block(nn.ModuleList):
    """One Performer layer, ``[PreLayerNorm(SelfAttention), PreLayerNorm(Chunk(FeedForward))]`` as the
    original's ``net.layers[i]`` (same keys), with a forward: the residual attention and feed-forward steps
    (so gradient checkpointing can wrap a whole layer)."""

    def forward(self, x: torch.Tensor, weight: torch.Tensor, value_mask: torch.Tensor) -> torch.Tensor:
        x = x + _attention(self[0], x, weight, value_mask)
        return x + self[1](x)


class _PerformerStack(nn.Module):
    """The parameter layout of the original's ``Performer`` (``net.layers`` + ``calls_since_last_redraw``),
    built from performer-pytorch's blocks. performer_pytorch.Performer itself is not used: it names the
    redraw counter ``proj_updater.calls_since_last_redraw`` and registers the layers a second time under
    ``proj_updater.instance``, which would not match the official keys. Projection matrices are never
    redrawn (the original redraws them every 1,000 training calls only)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        from performer_pytorch.performer_pytorch import Chunk, FeedForward, PreLayerNorm, SelfAttention

        super().__init__()
        d = cfg["dim"]
        self.net = nn.Module()
        self.net.layers = nn.ModuleList(
            _Block(
                [
                    PreLayerNorm(
                        d,
                        SelfAttention(
                            d,
                            heads=cfg["heads"],
                            dim_head=cfg["dim_head"],
                            nb_features=cfg["nb_features"],
                            qkv_bias=cfg["qkv_bias"],
                        ),
                    ),
                    PreLayerNorm(d, Chunk(1, FeedForward(d, mult=cfg["ff_mult"]), along_dim=1)),
                ]
            )
            for _ in range(cfg["depth"])
        )
        self.register_buffer("calls_since_last_redraw", torch.tensor(0))


def _key_features(k: torch.Tensor, projection: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """FAVOR+ positive features of keys [b, h, n, e] -> [b, h, n, m], stabilised by the max of
    ``data_dash`` over one cell's heads, positions (those in ``key_mask`` [b, n]) and features: the
    original's global max when it embeds one cell at a time (see the module docstring)."""
    normalizer = k.shape[-1] ** -0.25
    ratio = projection.shape[0] ** -0.5
    dash = torch.einsum("bhne,me->bhnm", normalizer * k, projection.type_as(k))
    diag = (k**2).sum(-1, keepdim=True) * (normalizer**2 / 2.0)
    per_key = dash.detach().amax(dim=-1).masked_fill(~key_mask[:, None, :], float("-inf"))  # [b, h, n]
    stab = per_key.amax(dim=(1, 2))[:, None, None, None]
    stab = torch.where(torch.isfinite(stab), stab, torch.zeros_like(stab))  # a cell with no key at all
    if torch.is_grad_enabled():
        return ratio * (torch.exp(dash - diag - stab) + KERNEL_EPS)
    # inference: in place, so one [b, h, n, features] tensor is alive instead of three
    return dash.sub_(diag).sub_(stab).exp_().add_(KERNEL_EPS).mul_(ratio)


def _attention(block: nn.Module, x: torch.Tensor, weight: torch.Tensor, value_mask: torch.Tensor) -> torch.Tensor:
    """One PreLayerNorm(SelfAttention) block of performer-pytorch, with pad-count weights on the keys.
    ``weight`` [b, n]: 1 for real tokens, the number of padded positions it stands for on the pad token,
    0 on batch padding; ``value_mask`` [b, n]: real tokens (the original zeroes padded values)."""
    from performer_pytorch.performer_pytorch import softmax_kernel

    attn = block.fn
    h = block.norm(x)
    b, n, _ = h.shape
    heads = attn.heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, n, heads, -1).transpose(1, 2)

    q, k, v = split(attn.to_q(h)), split(attn.to_k(h)), split(attn.to_v(h))
    v = v * value_mask[:, None, :, None].to(v.dtype)
    projection = attn.fast_attention.projection_matrix
    qf = softmax_kernel(q, projection_matrix=projection, is_query=True)  # per-row max: batch-independent
    kf = _key_features(k, projection, weight > 0) * weight[:, None, :, None].to(k.dtype)
    k_sum = kf.sum(dim=-2)
    context = torch.einsum("bhnm,bhne->bhme", kf, v)
    out = torch.einsum("bhnm,bhme->bhne", qf, context) / torch.einsum("bhnm,bhm->bhn", qf, k_sum).unsqueeze(-1)
    out = out.transpose(1, 2).reshape(b, n, -1)
    return attn.dropout(attn.to_out(out))


class CellLMEncoder(nn.Module):
    """PerformerLM_CellLM with the official parameter names; forward returns the final-LayerNorm output."""

    def __init__(self, cfg: dict[str, Any], head: bool = True) -> None:
        super().__init__()
        self.cfg = dict(cfg)
        d = cfg["dim"]
        self.token_emb = nn.Embedding(cfg["num_tokens"], d)
        self.pos_emb = _Gene2Vec(cfg["gene_num"] + 2, d)
        self.performer = _PerformerStack(cfg)
        self.norm = nn.LayerNorm(d)
        if head:  # the LM head: in the official file (init_random writes it), never run for an embedding
            self.to_out = nn.Linear(d, cfg["num_tokens"])

    def forward(
        self, gene_ids: torch.Tensor, tokens: torch.Tensor, weight: torch.Tensor, value_mask: torch.Tensor
    ) -> torch.Tensor:
        x = self.token_emb(tokens) + self.pos_emb.emb(gene_ids).to(self.token_emb.weight.dtype)
        for layer in self.performer.net.layers:
            x = layer(x, weight, value_mask)
        return self.norm(x)


# --------------------------------------------------------------------------------------------- tokenizer


def read_gene_list(path: Path, gene_num: int) -> list[str]:
    if not path.is_file():
        raise UserError(
            f"{path} not found: a CellLM checkpoint directory must hold the model's {gene_num:,} gene symbols "
            f"as {GENE_LIST_FILE} (one per line, in the order of the gene2vec rows / the model's gene positions)"
        )
    genes = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(genes) != gene_num:
        raise UserError(f"{path} lists {len(genes):,} genes but the CellLM config has gene_num {gene_num:,}")
    return genes


class CellLMTokenizer(CellTokenizer):
    """Store cells -> ``input_ids`` (int32 gene positions, CLS = gene_num first) and ``tokens`` (int32
    expression tokens 0..num_tokens-3, CLS = num_tokens-2), genes in the model's gene order, at most
    max_seq_len entries."""

    def __init__(self, genes: pd.DataFrame, gene_list: list[str], cfg: dict[str, Any], normalize: str) -> None:
        index = {g: i for i, g in enumerate(gene_list)}
        ordered = genes.sort_values("position")
        positions = ordered["position"].to_numpy()
        self.lookup = np.full(int(positions.max()) + 1 if len(positions) else 0, -1, dtype=np.int32)
        taken: set[int] = set()
        for pos, sym in zip(positions, ordered["symbol"].tolist(), strict=True):
            vid = index.get(sym) if isinstance(sym, str) else None
            if vid is not None and vid not in taken:  # duplicated store symbols: the first occurrence only
                self.lookup[pos] = vid
                taken.add(vid)
        self.n_store_genes = len(genes)
        self.n_matched = len(taken)
        self.coverage = self.n_matched / self.n_store_genes if self.n_store_genes else 0.0
        self.gene_num = cfg["gene_num"]
        self.cls_token = cfg["num_tokens"] - 2
        self.max_bin = self.cls_token - 1
        self.max_seq_len = cfg["max_seq_len"]
        self.normalize = normalize
        check_coverage(self.coverage, self.n_store_genes, f"are in CellLM's {self.gene_num:,}-gene list",
                       ordered["symbol"].tolist(), "CellLM needs the gene symbols its gene list uses (human "
                       "symbols): convert the data with those")

    def values(self, raw: np.ndarray) -> np.ndarray:
        """The values the original's dense input row would hold (float32, as scanpy's)."""
        if self.normalize == "none":
            return raw.astype(np.float32)
        raw = raw.astype(np.float32)
        total = np.float32(raw.sum(dtype=np.float64))  # integer counts: exact in float32 below 2**24
        if total <= 0:
            return raw
        logged = np.log1p(raw * (np.float32(1.0) / (total / np.float32(1e4))))  # scanpy's float32 arithmetic
        return (logged / np.float32(np.log(2.0)) if self.normalize == "log2" else logged).astype(np.float32)

    def tokenize_cell(self, gene_index: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        vid = self.lookup[np.asarray(gene_index, dtype=np.int64)]
        keep = vid >= 0
        vid, raw = vid[keep], np.asarray(values)[keep]
        order = np.argsort(vid, kind="stable")  # the dense row's gene order
        vid, vals = vid[order], self.values(raw[order])
        pos = vals > 0  # the original keeps values > 0 only
        vid, vals = vid[pos], vals[pos]
        bins = np.minimum(vals, np.float32(self.max_bin)).astype(np.int32)  # cap, then .long() truncation
        ids = np.concatenate([[self.gene_num], vid])[: self.max_seq_len].astype(np.int32)
        toks = np.concatenate([[self.cls_token], bins])[: self.max_seq_len].astype(np.int32)
        return ids, toks

    def __call__(
        self, cell_ids: np.ndarray, gene_index: list[np.ndarray], values: list[np.ndarray]
    ) -> dict[str, list[np.ndarray]]:
        out: dict[str, list[np.ndarray]] = {"input_ids": [], "tokens": []}
        for gi, v in zip(gene_index, values, strict=True):
            ids, toks = self.tokenize_cell(gi, v)
            out["input_ids"].append(ids)
            out["tokens"].append(toks)
        return out


# --------------------------------------------------------------------------------------------- checkpoint


def read_config(ckpt_dir: Path) -> tuple[dict[str, Any], Path]:
    """(architecture, weights file) of a checkpoint directory: ``cellLM.json`` (OpenBioMed's config format,
    ``network.structure``) when present, else the released config; the weights file is the one the config's
    ``ckpt_path`` names, else the directory's only ``*.pth`` / ``*.pt`` file."""
    structure: dict[str, Any] = dict(_STRUCTURE_REAL)
    weights_name: str | None = None
    cfg_path = ckpt_dir / CONFIG_FILE
    if cfg_path.is_file():
        try:
            obj = json.loads(cfg_path.read_text())
            structure = dict(obj["network"]["structure"])
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(
                f"{cfg_path} is not an OpenBioMed CellLM config (expected network.structure as in "
                f"configs/ctc/cellLM.json): {type(err).__name__}: {err}"
            ) from None
        if isinstance(structure.get("ckpt_path"), str):
            weights_name = Path(structure["ckpt_path"]).name
    cfg = resolve_config(
        {k: v for k, v in structure.items() if k not in ("ckpt_path", "gene2vec_path", "name")}
        | {"param_key": structure.get("param_key", PARAM_KEY)}
    )
    if weights_name and (ckpt_dir / weights_name).is_file():
        return cfg, ckpt_dir / weights_name
    found = sorted(p for p in ckpt_dir.iterdir() if p.suffix in (".pth", ".pt") and p.is_file())
    if len(found) != 1:
        listing = ", ".join(sorted(p.name for p in ckpt_dir.iterdir())) or "nothing"
        raise UserError(
            f"{ckpt_dir}: expected one CellLM weights file (*.pth, e.g. {DEFAULT_WEIGHTS_FILE}"
            f"{', or ' + weights_name + ' named by ' + CONFIG_FILE if weights_name else ''}); found: {listing}"
        )
    return cfg, found[0]


def read_state(path: Path, cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The state dict of the weights file (``obj[param_key]``, or a plain state dict when param_key is
    empty, as the original's loader): every encoder key with its shape, the ``to_out`` LM head skipped
    (named in a log line), nothing else."""
    obj = load_weights_file(path, f"re-save it as {{'{cfg['param_key'] or 'name'}': ...}} of tensors only")
    key = cfg["param_key"]
    if key:
        if not isinstance(obj, dict) or key not in obj:
            found = short_keys([str(k) for k in obj]) if isinstance(obj, dict) else type(obj).__name__
            raise UserError(f"{path} has no {key!r} entry (the CellLM param_key); found {found}")
        obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: the CellLM weights must be a state dict of tensors")
    expected = {k: v for k, v in official_shapes(cfg).items() if not k.startswith(HEAD_PREFIX)}
    # the language-model head is never run by an embedding: skipped and named in one log line
    return check_state(obj, expected, str(path), "the CellLM architecture of its config", "the config",
                       skip=lambda k: k.startswith(HEAD_PREFIX))


def stand_in_gene_list(n: int) -> list[str]:
    """n human gene symbols (with an Ensembl ID, in Entrez order) from the package's gene table: only for
    random-weight checkpoints, since CellLM's own list is not public."""
    t = gene_table().dropna(subset=["ensembl_id"]).drop_duplicates("symbol")
    t = t.assign(entrez_num=pd.to_numeric(t["entrez"], errors="coerce")).sort_values("entrez_num", kind="stable")
    symbols = t["symbol"].tolist()
    if len(symbols) < n:
        raise UserError(f"the package gene table has {len(symbols)} symbols; a CellLM stand-in needs {n}")
    return symbols[:n]


# --------------------------------------------------------------------------------------------- the model


@register
class CellLMModel(FoundationModel):
    """CellLM cell embeddings (OpenBioMed ``PerformerLM_CellLM``); options: ``pool`` (cls: the CLS token,
    default | mean: mean of the gene tokens), ``normalize`` (log2: scBERT's log2(1 + count/total x 1e4),
    default | ln | none: store values as they are)."""

    name = "celllm"
    presets: ClassVar[dict[str, dict[str, Any]]] = {"tiny": _STRUCTURE_TINY, "celllm": _STRUCTURE_REAL}
    lora_targets: ClassVar[list[str]] = ["fn.to_q", "fn.to_k", "fn.to_v", "fn.to_out", "fn.fn.w1", "fn.fn.w2"]
    #: position-identified genes: the expression-value embedding; baseline = "not expressed"
    attribution_adapter = AttributionAdapter(layer=lambda m: m.token_emb, lookup=tokenizer_lookup, key="tokens",
                                            baseline=0)
    default_options: ClassVar[dict[str, Any]] = {"checkpoint": None, "preset": None, "pool": "cls", "normalize": "log2"}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.options["pool"] not in ("cls", "mean"):
            raise UserError(f"celllm option pool={self.options['pool']!r}: use cls or mean")
        if self.options["normalize"] not in ("log2", "ln", "none"):
            raise UserError(
                f"celllm option normalize={self.options['normalize']!r}: use log2 (scBERT's log2(1 + count/total "
                "x 1e4)), ln (natural log) or none (store values as they are)"
            )
        self._cfg: dict[str, Any] | None = None

    def check_store(self, store: Any) -> None:
        if self.options["normalize"] != "none":
            super().check_store(store)

    def config(self) -> dict[str, Any]:
        if self._cfg is None:
            self._cfg = read_config(self.checkpoint_dir())[0]
        return self._cfg

    @property
    def max_length(self) -> int:
        return int(self.config()["max_seq_len"])

    def make_tokenizer(self, genes: pd.DataFrame) -> CellLMTokenizer:
        cfg = self.config()
        gene_list = read_gene_list(self.checkpoint_dir() / GENE_LIST_FILE, cfg["gene_num"])
        tok = CellLMTokenizer(genes, gene_list, cfg, self.options["normalize"])
        log.info(
            "celllm: %d of the store's %d genes are in the %d-gene list (%.1f%%)",
            tok.n_matched,
            tok.n_store_genes,
            cfg["gene_num"],
            100 * tok.coverage,
        )
        return tok

    def collate(self, rows: dict[str, list[np.ndarray]], pad_to: int | None = None) -> dict[str, Any]:
        cfg = self.config()
        pad_gene, pad_token, max_len = cfg["gene_num"] + 1, cfg["num_tokens"] - 1, cfg["max_seq_len"]
        # each cell gets one pad token standing for its (max_len - length) padded positions
        ids = [np.append(c, pad_gene) for c in rows["input_ids"]]
        toks = [np.append(c, pad_token) for c in rows["tokens"]]
        gene_ids, lengths = pad_ragged(ids, pad_gene, np.int64, None if pad_to is None else pad_to + 1)
        tokens, _ = pad_ragged(toks, pad_token, np.int64, None if pad_to is None else pad_to + 1)
        n_real = lengths - 1
        pos = np.arange(gene_ids.shape[1])[None, :]
        weight = (pos < n_real[:, None]).astype(np.float32)
        weight[np.arange(len(n_real)), n_real] = np.maximum(max_len - n_real, 0)
        return {
            "gene_ids": torch.from_numpy(gene_ids),
            "tokens": torch.from_numpy(tokens),
            "weight": torch.from_numpy(weight),
            "value_mask": torch.from_numpy(pos < n_real[:, None]),
        }

    def load(self, device: str = "cpu", dtype: Any = None) -> CellLMEncoder:
        dtype = self.weights_dtype(device, dtype)  # option dtype: upstream precision by default
        cfg, path = read_config(self.checkpoint_dir())
        state = read_state(path, cfg)
        # built on the CPU, not the meta device: performer-pytorch draws its projection matrices with .cpu()
        module = CellLMEncoder(cfg, head=False)
        module.load_state_dict(state, strict=True, assign=True)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        module = module.to(device=device, dtype=torch.float32 if dtype is None else dtype)
        module.pos_emb.emb.weight.requires_grad_(False)
        return module.eval()

    def embed(self, module: CellLMEncoder, batch: dict[str, Any]) -> torch.Tensor:
        dev = module.token_emb.weight.device
        b = {k: v.to(dev) for k, v in batch.items()}
        hidden = module(b["gene_ids"], b["tokens"], b["weight"], b["value_mask"])
        if self.options["pool"] == "cls":
            return hidden[:, 0].float()
        genes = b["value_mask"].clone()
        genes[:, 0] = False  # CLS is not a gene
        count = genes.sum(1, keepdim=True).clamp(min=1)
        return ((hidden * genes.unsqueeze(-1).to(hidden.dtype)).sum(1) / count).float()

    @classmethod
    def init_random(cls, out_dir: Path, preset: str = "tiny", config: dict[str, Any] | None = None) -> Path:
        if preset not in cls.presets:
            raise UserError(f"model 'celllm' has no preset {preset!r}; presets: {', '.join(cls.presets)}")
        structure = {**copy.deepcopy(cls.presets[preset]), **(config or {})}
        cfg = resolve_config({k: v for k, v in structure.items() if k != "name"} | {"param_key": PARAM_KEY})
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same preset always gives the same files (stable cache keys)
            state = CellLMEncoder(cfg).state_dict()
            g2v = torch.randn(cfg["gene_num"], cfg["dim"], dtype=torch.float64) * 0.1
            # as Gene2VecPositionalEmbedding builds it: float64 gene2vec rows, CLS = ones, PAD = zeros
            state["pos_emb.emb.weight"] = torch.cat(
                [g2v, torch.ones(1, cfg["dim"], dtype=torch.float64), torch.zeros(1, cfg["dim"], dtype=torch.float64)]
            )
        ordered = {k: state[k].contiguous() for k in official_shapes(cfg)}
        with atomic_file(out_dir / DEFAULT_WEIGHTS_FILE) as tmp:
            torch.save({PARAM_KEY: ordered}, tmp)
        official = {
            "model": "celllm",
            "data": {"cell": {"modality": ["structure"], "featurizer": {"structure": {"name": "Fullseq"}}}},
            "network": {
                "structure": {
                    **structure,
                    "gene2vec_path": f"../assets/gene2vec_{cfg['gene_num']}_{cfg['dim']}.npy",
                    "ckpt_path": f"../ckpts/cell_ckpts/celllm/{DEFAULT_WEIGHTS_FILE}",
                    "param_key": PARAM_KEY,
                },
                "pred_head": {"hidden_size": [512, 128], "dropout": 0},
            },
        }
        write_json(out_dir / CONFIG_FILE, official)
        with atomic_file(out_dir / GENE_LIST_FILE) as tmp:
            Path(tmp).write_text("\n".join(stand_in_gene_list(cfg["gene_num"])) + "\n")
        cls.mark_random(out_dir, preset,
                        "random weights, not pretrained; gene_list.txt is a stand-in, not CellLM's own list")
        return out_dir
