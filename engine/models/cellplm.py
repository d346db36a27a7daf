"""CellPLM (``OmicsFormer``, the released 85M checkpoint) cell embeddings.

What the original does (OmicsML/CellPLM, PyPI ``cellplm`` 0.1.0.post2: ``pipeline/__init__.py``
``load_pretrain``, ``pipeline/cell_embedding.py`` ``CellEmbeddingPipeline``, ``model/cellformer.py``,
``embedder/omics.py``, ``layer/flowformer.py``, ``latent/autoencoders.py``, ``utils/data.py``):

* Checkpoint: a directory with ``<prefix>.config.json`` (the ``OmicsFormer`` keyword arguments, including
  ``gene_list``: 19,374 Ensembl IDs) and ``<prefix>.best.ckpt`` = ``torch.save({"model_state_dict":
  state, ...})`` of the whole pretraining model (embedder, encoder, latent, NB-MLP decoder). The pipeline
  builds the model with ``head_type="embedder"`` (no decoder) and copies every checkpoint tensor whose
  key and shape match, silently keeping random values for anything missing.
* Genes: ``adata.var`` names must be Ensembl IDs of ``gene_list`` (symbols are converted online with
  mygene, then ``var_names_make_unique``); only those genes are kept. Input values are used as given
  (raw counts; no library-size normalisation).
* Embedder: ``x = log1p(counts)`` (float32, sparse) and ``feat = x @ emb[genes]`` (gene embedding table
  ``[19374, 1024]``, so a cell is the log1p-weighted sum of its genes' embeddings); the positional
  encoding is added as the constant 0 (``pe = 0.``: only spatial data would use it); then
  ``extra_linear`` = Linear -> ReLU -> Dropout -> GroupNorm(4 groups).
* Encoder: 4 pre-norm Flowformer layers (LayerNorm, flow attention with 8 heads and sigmoid feature
  maps, feed-forward Linear(d, 2d) -> GELU -> Linear(2d, d)). The attention runs ACROSS CELLS: a batch
  of cells is one sequence, each cell a token (``x.unsqueeze(0)``), so a cell's embedding depends on
  the other cells of its batch. ``CellEmbeddingPipeline.predict`` groups cells by ``obs['batch']``
  (all cells together when there is none) and cuts each group into chunks of
  ``inference_config['batch_size']`` cells (default 0 = the whole group in one pass).
* Then ``pre_latent_norm`` (LayerNorm) and the GMVAE latent layer in eval mode: cluster logits ->
  ``y`` = hard Gumbel-softmax SAMPLE (one-hot of ``argmax(logits + Gumbel noise)``) -> ``mean =
  mu(ReLU(Linear(cat(h, y))))``; the embedder head returns that mean: 512-d per cell.

Where this file follows it: the same gene list (from the checkpoint's config), log1p of raw counts, the
log1p-weighted sum of gene embeddings (``F.embedding_bag``), ``extra_linear``, the Flowformer layers
(same math and official module names, so the state dict loads by its official keys), the pre-latent
LayerNorm and the GMVAE mean; ``init_random`` writes the official container (``<prefix>.config.json`` +
``<prefix>.best.ckpt`` with ``model_state_dict``, every key of the pretraining model) that the reference
``load_pretrain`` loads, and the tests check the embeddings against the ``cellplm`` package itself.

Where it differs, and why:

* Cell-cell attention: every cell is embedded as its own one-cell sequence, which is the original with
  ``inference_config={"batch_size": 1}``. The original's default (one pass over all cells of a sample)
  makes a cell's embedding depend on which cells are stored with it, which a cached, fold-independent,
  streaming embedding cannot honour; with one cell per pass the result never depends on the batch. The
  module keeps the joint mode (``forward(..., joint=True)``) so the tests can check the flow attention
  across cells against the original too. In a one-cell sequence the flow attention of each head reduces
  to about ``sigmoid(1) * V`` (its normalisers cancel), so no information from other cells enters; the
  pretrained weights saw whole batches, so these embeddings differ from the original's default batched pass.
* The flow attention multiplies ``(q k^T) v`` when the sequence is shorter than the head dimension and
  ``q (k^T v)`` otherwise (the original always the latter): the same value, far less memory per cell.
* The GMVAE cluster ``y`` is the mode, ``one_hot(argmax(logits))``, instead of a Gumbel sample: the
  original's eval embedding is random (a cell near a cluster boundary can get a different embedding on
  every call); the mode is what the sample concentrates on and is reproducible.
* Genes are matched through the store's ``ensembl_id`` column (filled from org.Hs.eg.db when the input
  had symbols) instead of an online mygene query. When several store genes carry the same Ensembl ID
  (a symbol -> Ensembl table can send an antisense gene to its host's ID), one gene counts, as after the
  original's ``var_names_make_unique``: the one whose symbol is that ID's own symbol in the project's
  org.Hs.eg.db table, else the first in store order.
* Strict loading instead of the original's silent partial load: every key the embedding model has
  (``head_type="embedder"``) and runs must be present with its shape; ``decoder.*`` keys (the pretraining
  decoder, which the original drops too) and the keys the embedding never uses (``embedder.norm0``, the
  positional-encoding tables, the GMVAE variance and prior layers) are skipped and named in one log line
  (``checkpoint.check_state``); anything else is an error.
* Only the configuration of the released checkpoint family is supported (flowformer encoder, gmvae
  latent, sinusoidal PE added as 0, no covariates, group or layer norm); other settings are a UserError.
"""

from __future__ import annotations

import copy
import gzip
import json
import logging
import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..data.gene_ids import ensembl_to_symbols
from ..errors import UserError
from ..fsutil import atomic_file
from .base import CellTokenizer, FoundationModel, pad_ragged, register
from .checkpoint import check_state, load_weights_file, materialize, short_keys
from .contract import AttributionAdapter, check_coverage, positive_int, tokenizer_lookup

log = logging.getLogger(__name__)

CONFIG_SUFFIX = ".config.json"
CKPT_SUFFIX = ".best.ckpt"
STATE_KEY = "model_state_dict"
OFFICIAL_CONFIG_FILE = Path(__file__).parent / "resources" / "cellplm" / "20230926_85M.config.json.gz"
#: keys of the pretraining model that the embedding model (head_type="embedder") does not have
DECODER_PREFIX = "decoder."
GMVAE = "latent.layers.1.inference."
GMVAE_HIDDEN = 512  # fixed inside the original's InferenceNet
PE_SIZE = 100  # Sinusoidal2dPE height = width
NB_DEC_1 = 128  # the NB output layer's hidden size
NORMS = ("groupnorm", "layernorm")
GROUPNORM_GROUPS = 4

# The released 85M checkpoint's config (../shared/assets/cellplm/20230926_85M.config.json) without its
# gene_list, which every preset takes from the vendored file.
_CONFIG_85M: dict[str, Any] = {
    "name": "20230926_75M_50M",
    "enc_mod": "flowformer",
    "enc_hid": 1024,
    "enc_layers": 4,
    "latent_mod": "gmvae",
    "lamda": 5.0,
    "post_latent_dim": 512,
    "dec_mod": "nbmlp",
    "dec_hid": 1024,
    "dec_layers": 2,
    "model_dropout": 0.2,
    "mask_node_rate": 0.75,
    "mask_feature_rate": 0.25,
    "drop_node_rate": 0.3,
    "norm": "groupnorm",
    "dataset": "HLCA",
    "architecture": "OmicsFormer",
    "epochs": 200,
    "lr": 0.0002,
    "wd": 1e-08,
    "w_li": 5.0,
    "w_en": 5.0,
    "num_clusters": 16,
    "out_dim": 19374,
    "ddp": True,
    "cat_pe": False,
    "val_num": 10,
    "max_batch_size": 4000,
    "dar": False,
    "input_covariate": False,
    "beta": [2.0, 1.5],
    "batch_mixing": False,
    "ecs": False,
    "dsbn": False,
    "dae": True,
    "batch_flip": True,
    "mask_beta": True,
    "batch_num": 12596,
    "dataset_num": 484,
}
# Same format and full gene list, small dimensions (the gene table is 19,374 x 32).
_CONFIG_TINY: dict[str, Any] = {
    **copy.deepcopy(_CONFIG_85M),
    "name": "cellplm_tiny",
    "enc_hid": 32,
    "enc_layers": 2,
    "post_latent_dim": 16,
    "dec_hid": 32,
    "num_clusters": 4,
    "batch_num": 3,
    "dataset_num": 2,
}
_PREFIXES = {"tiny": "cellplm_tiny", "85m": "20230926_85M"}

# OmicsFormer's defaults for keys the released config leaves out
_DEFAULTS: dict[str, Any] = {
    "enc_head": 8,
    "pe_type": "sin",
    "cat_pe": True,
    "mask_type": "input",
    "input_covariate": False,
    "dsbn": False,
    "dar": False,
    "ecs": False,
    "norm": "layernorm",
    "latent_mod": "vae",
    "platform_num": 0,
    "batch_num": 0,
    "dataset_num": 0,
}


# --------------------------------------------------------------------------------------------- config


def official_gene_list() -> list[str]:
    with gzip.open(OFFICIAL_CONFIG_FILE, "rt") as fh:
        return list(json.load(fh)["gene_list"])


def validate_config(raw: Any) -> dict[str, Any]:
    """The config with OmicsFormer's defaults filled in; a UserError for anything this file does not
    implement faithfully."""
    if not isinstance(raw, dict):
        raise UserError(f"CellPLM config must be a JSON object, not {type(raw).__name__}")
    cfg = {**_DEFAULTS, **raw}
    genes = cfg.get("gene_list")
    if not isinstance(genes, list) or not genes or not all(isinstance(g, str) for g in genes):
        raise UserError("CellPLM config has no 'gene_list' (a non-empty list of Ensembl gene IDs)")
    if len(set(genes)) != len(genes):
        raise UserError("CellPLM config 'gene_list' has duplicate genes")
    for key in ("enc_hid", "enc_layers", "enc_head", "post_latent_dim", "num_clusters"):
        positive_int(cfg, key, "CellPLM config")
    wanted = {"enc_mod": "flowformer", "latent_mod": "gmvae"}
    for key, val in wanted.items():
        if cfg[key] != val:
            raise UserError(f"CellPLM config {key}={cfg[key]!r} is not supported; only {val!r} (the released model)")
    if cfg["norm"] not in NORMS:
        raise UserError(f"CellPLM config norm={cfg['norm']!r} is not supported; use one of {', '.join(NORMS)}")
    if cfg["pe_type"] not in ("sin", "sinu", "sinusoidal"):
        raise UserError(f"CellPLM config pe_type={cfg['pe_type']!r} is not supported; only 'sin' (the released model)")
    for key in ("cat_pe", "input_covariate", "dsbn", "dar", "ecs"):
        if cfg[key]:
            raise UserError(f"CellPLM config {key}=true is not supported (the released model has false)")
    d = cfg["enc_hid"]
    if d % cfg["enc_head"] or d % 4 or (cfg["norm"] == "groupnorm" and d % GROUPNORM_GROUPS):
        raise UserError(f"CellPLM config enc_hid={d} must be divisible by enc_head={cfg['enc_head']} and by 4")
    return cfg


def _norm_shapes(prefix: str, dim: int) -> dict[str, tuple[int, ...]]:
    return {prefix + "weight": (dim,), prefix + "bias": (dim,)}


def _linear_shapes(prefix: str, n_in: int, n_out: int) -> dict[str, tuple[int, ...]]:
    return {prefix + "weight": (n_out, n_in), prefix + "bias": (n_out,)}


def official_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every key (and shape) of the embedding model the original builds (``head_type="embedder"``), in
    its state-dict order: all of them must be in a checkpoint."""
    d, g, c, z = cfg["enc_hid"], len(cfg["gene_list"]), cfg["num_clusters"], cfg["post_latent_dim"]
    out: dict[str, tuple[int, ...]] = {}
    out.update(_norm_shapes("embedder.norm0.", d))
    out.update(_linear_shapes("embedder.extra_linear.0.", d, d))
    out.update(_norm_shapes("embedder.extra_linear.3.", d))
    out["embedder.pe_enc.missing_pe"] = (d,)
    out["embedder.pe_enc.pe_enc.weight"] = (PE_SIZE * PE_SIZE, d)
    out["embedder.feat_enc.emb"] = (g, d)
    for i in range(cfg["enc_layers"]):
        p = f"encoder.layers.{i}."
        for name in ("query", "key", "value", "out"):
            out.update(_linear_shapes(f"{p}self_attn.{name}_projection.", d, d))
        out.update(_linear_shapes(p + "_ff_block.0.", d, 2 * d))
        out.update(_linear_shapes(p + "_ff_block.3.", 2 * d, d))
        out.update(_norm_shapes(p + "norm1.", d))
        out.update(_norm_shapes(p + "norm2.", d))
    out.update(_linear_shapes(GMVAE + "inference_qyx.0.logits.", d, c))
    out.update(_linear_shapes(GMVAE + "inference_qzyx.0.", d + c, GMVAE_HIDDEN))
    out.update(_linear_shapes(GMVAE + "inference_qzyx.2.mu.", GMVAE_HIDDEN, z))
    out.update(_linear_shapes(GMVAE + "inference_qzyx.2.var.", GMVAE_HIDDEN, z))
    out.update(_linear_shapes(GMVAE + "y_mu.", c, z))
    out.update(_linear_shapes(GMVAE + "y_var.", c, z))
    out.update(_norm_shapes("pre_latent_norm.norm.", d))
    return out


#: official keys the embedding never reads: shape-checked, then dropped
def _unused(key: str) -> bool:
    return key.startswith(("embedder.norm0.", "embedder.pe_enc.")) or key.startswith(
        tuple(GMVAE + s for s in ("inference_qzyx.2.var.", "y_mu.", "y_var."))
    )


def decoder_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The NB-MLP pretraining decoder's keys (what init_random writes; a checkpoint may have them)."""
    if cfg.get("dec_mod") != "nbmlp":
        return {}
    h, g, n_layers = (positive_int(cfg, "dec_hid", "CellPLM config"), len(cfg["gene_list"]),
                      positive_int(cfg, "dec_layers", "CellPLM config"))
    covariates = {k: cfg.get(f"{k}_num") or 0 for k in ("batch", "dataset", "platform")}
    layers: dict[str, tuple[int, ...]] = {}
    cov: dict[str, tuple[int, ...]] = {}
    for i in range(n_layers - 1):
        p = f"decoder.layers.{i}."
        layers.update(_linear_shapes(p + "0.", cfg["post_latent_dim"] if i == 0 else h, h))
        layers[p + "1.weight"] = (1,)  # PReLU
        layers.update(_norm_shapes(p + "3.", h))
        for name, num in covariates.items():
            if num:
                q = f"decoder.covariate_layers.{i}.{name}."
                cov[q + "0.weight"] = (num, h)
                cov[q + "1.weight"] = (1,)
                cov.update(_norm_shapes(q + "2.", h))
    out = {**layers, **cov, "decoder.out_layer.dec_disp": (g,)}
    out.update(_linear_shapes("decoder.out_layer.dec_1.", h, NB_DEC_1))
    out.update(_linear_shapes("decoder.out_layer.dec_mean.0.", NB_DEC_1, g))
    return out


def sinusoidal_2d_table(dim: int, size: int = PE_SIZE) -> torch.Tensor:
    """The original's fixed 2-D sinusoidal table ``[size * size, dim]`` (entry = row * size + col): the
    first half of the channels encode col, the second half row, alternating sin / cos. Stored in every official
    checkpoint (never used for single-cell data)."""
    half = dim // 2
    freq = torch.exp(torch.arange(0.0, half, 2) * -(math.log(10000.0) / half))
    pos = torch.arange(0.0, size)[:, None] * freq  # [size, half / 2]
    table = torch.zeros(size, size, dim)
    table[:, :, 0:half:2] = torch.sin(pos)[None, :, :]  # [row, col, channel]: first half encodes the column
    table[:, :, 1:half:2] = torch.cos(pos)[None, :, :]
    table[:, :, half::2] = torch.sin(pos)[:, None, :]  # second half the row
    table[:, :, half + 1 :: 2] = torch.cos(pos)[:, None, :]
    return table.reshape(size * size, dim)


# --------------------------------------------------------------------------------------------- modules


def _holder(**children: nn.Module) -> nn.Module:
    """A plain container, so module paths (and state-dict keys) are the official ones."""
    mod = nn.Module()
    for name, child in children.items():
        mod.add_module(name, child)
    return mod


def _make_norm(kind: str, dim: int) -> nn.Module:
    return nn.GroupNorm(GROUPNORM_GROUPS, dim) if kind == "groupnorm" else nn.LayerNorm(dim)


class FlowAttention(nn.Module):
    """Flow attention (Flowformer, non-causal) over the sequence axis of ``[batch, seq, dim]``: sigmoid
    feature maps, incoming / outgoing flow normalisation, softmax competition over sources and sigmoid
    allocation of sinks; linear in the sequence length."""

    def __init__(self, dim: int, heads: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.heads, self.eps = heads, eps
        self.query_projection = nn.Linear(dim, dim)
        self.key_projection = nn.Linear(dim, dim)
        self.value_projection = nn.Linear(dim, dim)
        self.out_projection = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # [b, h, n, dh]

        q = torch.sigmoid(heads(self.query_projection(x)))
        k = torch.sigmoid(heads(self.key_projection(x)))
        v = heads(self.value_projection(x))
        eps = self.eps
        incoming = 1.0 / ((q + eps) * (k.sum(2, keepdim=True) + eps)).sum(-1)  # per sink [b, h, n]
        outgoing = 1.0 / ((k + eps) * (q.sum(2, keepdim=True) + eps)).sum(-1)  # per source
        conserved_sink = ((q + eps) * ((k * outgoing[..., None]).sum(2, keepdim=True) + eps)).sum(-1)
        conserved_source = ((k + eps) * ((q * incoming[..., None]).sum(2, keepdim=True) + eps)).sum(-1)
        conserved_source = conserved_source.clamp(-1.0, 1.0)
        allocation = torch.sigmoid(conserved_sink)  # the original scales by n_queries / n_keys = 1
        competition = torch.softmax(conserved_source, dim=-1) * n
        q, v = q * incoming[..., None], v * competition[..., None]
        # (q k^T) v == q (k^T v): the cheaper order; one-cell sequences need no [dh, dh] state per cell
        out = (q @ k.transpose(-2, -1)) @ v if n <= d // self.heads else q @ (k.transpose(-2, -1) @ v)
        out = out * allocation[..., None]
        return self.out_projection(out.transpose(1, 2).reshape(b, n, d))


class FlowformerLayer(nn.Module):
    """Pre-norm block: x + attn(LN(x)), then x + ff(LN(x)); ff = Linear(d, 2d) -> GELU -> Linear(2d, d)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = FlowAttention(dim, heads)
        # indices 0 and 3 are the official keys (_ff_block.0 / _ff_block.3)
        self._ff_block = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x))
        return x + self._ff_block(self.norm2(x))


class CellPLMEncoder(nn.Module):
    """What a CellPLM cell embedding runs, with the official module paths: embedder (gene table +
    extra_linear), flowformer encoder, pre-latent LayerNorm, and the GMVAE mean."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        d, c, z = cfg["enc_hid"], cfg["num_clusters"], cfg["post_latent_dim"]
        dropout = float(cfg.get("model_dropout", 0.0))
        feat_enc = nn.Module()
        feat_enc.emb = nn.Parameter(torch.randn(len(cfg["gene_list"]), d) * 0.005)  # the original's init
        extra = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Dropout(dropout), _make_norm(cfg["norm"], d))
        self.embedder = _holder(feat_enc=feat_enc, extra_linear=extra)
        self.encoder = _holder(
            layers=nn.ModuleList(FlowformerLayer(d, cfg["enc_head"], dropout) for _ in range(cfg["enc_layers"]))
        )
        self.pre_latent_norm = _holder(norm=nn.LayerNorm(d))
        # nn.Sequential, never called as a whole: only for the official key names (and so that the encoder's
        # layers stay the longest nn.ModuleList, which gradient checkpointing takes as the layer stack)
        inference = _holder(
            inference_qyx=nn.Sequential(_holder(logits=nn.Linear(d, c))),
            inference_qzyx=nn.Sequential(
                nn.Linear(d + c, GMVAE_HIDDEN), nn.ReLU(), _holder(mu=nn.Linear(GMVAE_HIDDEN, z))
            ),
        )
        # latent.layers.0 is the original's parameter-free placeholder
        self.latent = _holder(layers=nn.ModuleList([nn.Identity(), _holder(inference=inference)]))
        self.n_clusters = c

    def forward(self, input_ids: torch.Tensor, weights: torch.Tensor, joint: bool = False) -> torch.Tensor:
        """``input_ids`` [n, L] gene-list indices, ``weights`` [n, L] log1p counts (0 on padding) -> [n, z].
        Each cell is its own one-token sequence (``joint=False``), or all n cells are one sequence as
        the original's batched pass (``joint=True``, batch-dependent by design: tests only)."""
        emb = self.embedder.feat_enc.emb
        h = F.embedding_bag(input_ids, emb, per_sample_weights=weights.to(emb.dtype), mode="sum")
        h = self.embedder.extra_linear(h)
        x = h.unsqueeze(0) if joint else h.unsqueeze(1)
        for layer in self.encoder.layers:
            x = layer(x)
        h = self.pre_latent_norm.norm(x.reshape(h.shape))
        inference = self.latent.layers[1].inference
        logits = inference.inference_qyx[0].logits(h)
        y = F.one_hot(logits.argmax(-1), self.n_clusters).to(h.dtype)  # the mode of the Gumbel sample
        qzyx = inference.inference_qzyx
        return qzyx[2].mu(qzyx[1](qzyx[0](torch.cat([h, y], dim=1))))


# --------------------------------------------------------------------------------------------- tokenizer


class CellPLMTokenizer(CellTokenizer):
    """Store genes -> positions in the checkpoint's ``gene_list`` by Ensembl ID; values -> log1p(count)."""

    def __init__(self, genes: pd.DataFrame, gene_list: list[str]) -> None:
        vocab = {g: i for i, g in enumerate(gene_list)}
        positions = genes["position"].to_numpy(dtype=np.int64)
        size = int(positions.max()) + 1 if len(positions) else 0
        self.lookup = np.full(size, -1, dtype=np.int32)
        candidates: dict[int, list[int]] = {}  # gene-list index -> store rows with that Ensembl ID
        ensembl = genes["ensembl_id"].to_numpy(dtype=object)
        symbols = genes["symbol"].to_numpy(dtype=object)
        for row in np.argsort(positions, kind="stable"):
            gid = ensembl[row]
            idx = vocab.get(gid.split(".")[0]) if isinstance(gid, str) and gid else None
            if idx is not None:
                candidates.setdefault(idx, []).append(int(row))
        repeated = [i for i, rows in candidates.items() if len(rows) > 1]
        canonical = dict(zip(repeated, ensembl_to_symbols([gene_list[i] for i in repeated]), strict=True))
        for idx, rows in candidates.items():
            # one gene per ID: the one whose symbol is the ID's own (e.g. MCL1, not an antisense gene that a
            # symbol -> Ensembl table sent to the same ID), else the first in store order
            row = next((r for r in rows if symbols[r] == canonical.get(idx)), rows[0])
            self.lookup[positions[row]] = idx
        self.n_repeated = len(repeated)
        self.n_store_genes = len(genes)
        self.n_matched = len(candidates)
        self.coverage = self.n_matched / max(1, self.n_store_genes)
        self.vocab_coverage = self.n_matched / len(gene_list)
        check_coverage(self.coverage, self.n_store_genes, f"have an Ensembl ID in CellPLM's {len(gene_list)}-gene list",
                       genes.sort_values("position")["symbol"].tolist(), "CellPLM needs human genes with Ensembl IDs "
                       "(the store's ensembl_id column; convert human data with symbols or Ensembl IDs)")

    def __call__(
        self, cell_ids: np.ndarray, gene_index: list[np.ndarray], values: list[np.ndarray]
    ) -> dict[str, list[np.ndarray]]:
        out: dict[str, list[np.ndarray]] = {"input_ids": [], "values": []}
        for gi, v in zip(gene_index, values, strict=True):
            vid = self.lookup[np.asarray(gi, dtype=np.int64)]
            keep = vid >= 0
            vid = vid[keep]
            order = np.argsort(vid, kind="stable")
            counts = np.asarray(v, dtype=np.float32)[keep][order]
            out["input_ids"].append(vid[order].astype(np.int32))
            out["values"].append(np.log1p(counts))  # float32, as the original's log1p of its float tensor
        return out


# --------------------------------------------------------------------------------------------- checkpoint


def find_prefix(directory: Path, prefix: str | None) -> str:
    """The checkpoint prefix: the given one, or the only ``<prefix>.config.json`` with a ``<prefix>.best.ckpt``."""
    if prefix is not None:
        names = (f"{prefix}{CONFIG_SUFFIX}", f"{prefix}{CKPT_SUFFIX}")
        if not all((directory / n).is_file() for n in names):
            raise UserError(f"{directory} has no {prefix}{CONFIG_SUFFIX} and {prefix}{CKPT_SUFFIX} (option 'prefix')")
        return prefix
    found = sorted(
        p.name[: -len(CONFIG_SUFFIX)]
        for p in directory.glob(f"*{CONFIG_SUFFIX}")
        if (directory / (p.name[: -len(CONFIG_SUFFIX)] + CKPT_SUFFIX)).is_file()
    )
    if len(found) != 1:
        names = ", ".join(sorted(p.name for p in directory.iterdir())) or "nothing"
        what = f"none (found: {names})"
        if found:
            what = "several: " + ", ".join(found) + " (choose one with option 'prefix')"
        raise UserError(
            f"{directory}: a CellPLM checkpoint directory holds <prefix>{CONFIG_SUFFIX} and <prefix>{CKPT_SUFFIX} "
            f"(e.g. 20230926_85M); {what}"
        )
    return found[0]


def read_config(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"CellPLM config {path} cannot be read as JSON ({type(err).__name__})") from None
    return validate_config(raw)


def read_checkpoint(path: Path, cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The embedding module's state dict from ``<prefix>.best.ckpt``; strict (see the module docstring)."""
    obj = load_weights_file(path, "re-save it as {'model_state_dict': {name: tensor}}")
    if not isinstance(obj, dict) or STATE_KEY not in obj or not isinstance(obj[STATE_KEY], dict):
        found = short_keys([str(k) for k in obj]) if isinstance(obj, dict) else type(obj).__name__
        raise UserError(
            f"{path} is not an official CellPLM checkpoint: expected a dict with {STATE_KEY!r} "
            f"(torch.save of {{'{STATE_KEY}': state_dict, ...}}); found {found}"
        )
    state = {str(k): v for k, v in obj[STATE_KEY].items()}
    expected = official_shapes(cfg)
    # the pretraining decoder and the modules the embedder head never runs: skipped and named in one line
    return check_state(state, {k: v for k, v in expected.items() if not _unused(k)}, str(path),
                       "the CellPLM architecture of its config", "the config",
                       skip=lambda k: k.startswith(DECODER_PREFIX) or _unused(k))


# --------------------------------------------------------------------------------------------- the model


@register
class CellPLMModel(FoundationModel):
    """CellPLM cell embeddings (512-d for the 85M model); options: ``prefix`` (the checkpoint's file
    prefix, e.g. 20230926_85M, when its directory holds several)."""

    name = "cellplm"
    presets: ClassVar[dict[str, dict[str, Any]]] = {"tiny": _CONFIG_TINY, "85m": _CONFIG_85M}
    lora_targets: ClassVar[list[str]] = [
        "self_attn.query_projection",
        "self_attn.key_projection",
        "self_attn.value_projection",
        "self_attn.out_projection",
        "_ff_block.0",
        "_ff_block.3",
    ]
    #: cell-as-token: its input expression values themselves; baseline = "not expressed"
    attribution_adapter = AttributionAdapter(layer=None, lookup=tokenizer_lookup, key="values", baseline=0.0)
    default_options: ClassVar[dict[str, Any]] = {"checkpoint": None, "preset": None, "prefix": None}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._config: dict[str, Any] | None = None

    def identity(self) -> dict[str, Any]:
        # the run manifest names the departure from the original's default (all cells of a sample in one
        # pass, attending to each other): here every cell is its own one-cell pass (see the module docstring)
        return {**super().identity(), "resolved": {"cells_per_pass": 1, "gmvae_cluster": "mode"}}

    def _paths(self) -> tuple[Path, Path]:
        directory = self.checkpoint_dir()
        prefix = find_prefix(directory, self.options["prefix"])
        return directory / f"{prefix}{CONFIG_SUFFIX}", directory / f"{prefix}{CKPT_SUFFIX}"

    def config(self) -> dict[str, Any]:
        if self._config is None:
            self._config = read_config(self._paths()[0])
        return self._config

    @property
    def max_length(self) -> int:
        return len(self.config()["gene_list"])

    def make_tokenizer(self, genes: pd.DataFrame) -> CellPLMTokenizer:
        tok = CellPLMTokenizer(genes, self.config()["gene_list"])
        tok.log_coverage("cellplm", f"the {len(self.config()['gene_list'])}-gene list (by Ensembl ID)")
        return tok

    def collate(self, rows: dict[str, list[np.ndarray]], pad_to: int | None = None) -> dict[str, Any]:
        # padding: gene 0 with weight 0 adds exactly nothing to the weighted sum
        ids, _ = pad_ragged(rows["input_ids"], 0, np.int64, pad_to)
        vals, _ = pad_ragged(rows["values"], 0.0, np.float32, pad_to)
        return {"input_ids": torch.from_numpy(ids), "values": torch.from_numpy(vals)}

    def load(self, device: str = "cpu", dtype: Any = None) -> CellPLMEncoder:
        dtype = self.weights_dtype(device, dtype)  # option dtype: upstream precision by default
        config_path, ckpt_path = self._paths()
        cfg = read_config(config_path)
        state = read_checkpoint(ckpt_path, cfg)
        return materialize(lambda: CellPLMEncoder(cfg), state, device, dtype)

    def embed(self, module: CellPLMEncoder, batch: dict[str, Any]) -> torch.Tensor:
        return module(batch["input_ids"], batch["values"]).float()

    @classmethod
    def init_random(cls, out_dir: Path, preset: str = "tiny", config: dict[str, Any] | None = None) -> Path:
        if preset not in cls.presets:
            raise UserError(f"model 'cellplm' has no preset {preset!r}; presets: {', '.join(cls.presets)}")
        raw = {**copy.deepcopy(cls.presets[preset]), **copy.deepcopy(config or {})}
        raw.setdefault("gene_list", official_gene_list())
        raw["out_dim"] = len(raw["gene_list"])
        cfg = validate_config(raw)
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same preset always gives the same files (stable cache keys)
            used = CellPLMEncoder(cfg).state_dict()
            shapes = {**official_shapes(cfg), **decoder_shapes(cfg)}
            state = {k: used[k] if k in used else _random_tensor(k, s, cfg) for k, s in shapes.items()}
        # the original's order: embedder, encoder, latent, decoder, pre_latent_norm
        order = [k for k in shapes if not k.startswith(("decoder.", "pre_latent_norm."))]
        order += [k for k in shapes if k.startswith("decoder.")]
        order += [k for k in shapes if k.startswith("pre_latent_norm.")]
        prefix = _PREFIXES.get(preset, preset)
        with atomic_file(out_dir / f"{prefix}{CONFIG_SUFFIX}") as tmp:
            tmp.write_text(json.dumps(raw))
        with atomic_file(out_dir / f"{prefix}{CKPT_SUFFIX}") as tmp:
            torch.save({STATE_KEY: {k: state[k].contiguous() for k in order}}, tmp)
        cls.mark_random(out_dir, preset)
        return out_dir


def _random_tensor(key: str, shape: tuple[int, ...], cfg: dict[str, Any]) -> torch.Tensor:
    """Values for the official keys the embedding never runs (stand-ins of the original's init)."""
    if key == "embedder.pe_enc.pe_enc.weight":
        return sinusoidal_2d_table(cfg["enc_hid"])
    if key.endswith("missing_pe"):
        return torch.randn(shape) * 1e-2
    if key.endswith("dec_disp"):
        return torch.ones(shape)
    if key.endswith(".bias"):
        return torch.zeros(shape)
    if shape == (1,):
        return torch.full(shape, 0.25)  # PReLU
    if len(shape) == 1:
        return torch.ones(shape)  # norm weights
    return torch.randn(shape) * (1.0 / math.sqrt(shape[-1]))
