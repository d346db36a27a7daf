"""UCE (Universal Cell Embeddings) cell embeddings.

What the original does (snap-stanford/UCE, PyPI ``uce-model`` 0.1.4: ``uce/eval_single_anndata.py``,
``uce/evaluate.py``, ``uce/eval_data.py``, ``uce/data_proc/data_utils.py``, ``uce/model.py``):

* Assets in ``model_files/``: the model file (``4layer_model.torch`` or ``33l_8ep_1024t_1280.torch``, a plain
  state dict), ``protein_embeddings/<Species>.<assembly>.gene_symbol_to_embedding_ESM2.pt`` (a dict gene
  symbol -> ESM2 protein embedding, per species), ``species_offsets.pkl`` (species -> row of its first gene
  in the token table), ``species_chrom.csv`` (columns ``species``, ``gene_symbol``, ``chromosome``,
  ``start``) and ``all_tokens.torch`` (the token table).
* Genes: the data's genes are kept when their symbol has a protein embedding (case-insensitive); gene
  token = position of the upper-cased symbol in the species' embedding dict + the species offset.
  Chromosome of a gene = code of ``"<species>_<chromosome>"`` in the categorical over the whole csv
  (categories sorted), genomic start = ``start``.
* Cell sentence (``sample_cell_sentences``): weights ``log1p(counts)`` (counts read as int64), normalised;
  1,024 genes drawn with replacement (``np.random.choice`` with those probabilities); the distinct
  chromosomes of the draw in a random order (``np.random.shuffle``); the sentence is
  ``[CLS=3]`` then, per chromosome, ``chromosome code + CHROM_TOKEN_OFFSET (143,574)``, the drawn genes of
  that chromosome sorted by start, ``chrom_token_right_idx=2``; padded with ``pad_token_idx=0`` to
  ``pad_length`` 1,536; mask 1 on real tokens.
* Model (``run_eval`` / ``TransformerModel``): ``pe_embedding(tokens)`` (nn.Embedding 145,469 x 5,120 from
  the state dict; replaced by ``all_tokens.torch`` only when that table, after appending 1,895 chromosome
  rows drawn with ``torch.manual_seed(23)`` when it has exactly 143,574 rows, has another row count) ->
  L2-normalise each token -> ``encoder`` (Linear 5,120 -> 1,280, GELU, LayerNorm) x sqrt(1,280) -> sinusoidal
  ``pos_encoder`` -> ``nn.TransformerEncoder`` (post-norm, ReLU, 20 heads, d_hid 5,120, dropout 0.05;
  4 or 33 layers) -> ``decoder`` MLP -> position 0 (CLS) -> L2-normalise: the 1,280-d cell embedding
  (``adata.obsm["X_uce"]``).

Checkpoint directory (the ``checkpoint`` option; the original's ``model_files/`` layout)::

    4layer_model.torch | 33l_8ep_1024t_1280.torch   the model (plain state dict; or one other *.torch file)
    protein_embeddings/Homo_sapiens.GRCh38.gene_symbol_to_embedding_ESM2.pt   (per species, official names;
                                                    new_species_protein_embeddings.csv: species,path for others)
    species_offsets.pkl (or species_offsets.json)   species -> offset
    species_chrom.csv                               species, gene_symbol, chromosome, start
    all_tokens.torch                                optional: the token table rule below
    uce_args.json                                   optional (this package's): nhead, pad_length, sample_size,
                                                    token ids, CHROM_TOKEN_OFFSET, nlayers of the original's CLI

``init_random`` writes all of these with random weights and random stand-in assets (the real protein
embeddings, offsets and chromosome table are user-supplied).

Where this file follows it: the same asset formats and names, gene matching, token ids, sampling
distribution, sentence layout, state-dict keys and shapes (``../shared/assets/manifests/uce.json``), token
table rule and embedding math.

Where it differs, and why:

* Sampling is seeded per cell (``np.random.RandomState`` seeded from a SHA-256 of the ``seed`` option and
  the cell id), drawing first the genes and then the chromosome order, as the original does from numpy's
  global generator; the original is unseeded, so its embeddings change from run to run. Ours are
  reproducible and a cell's sentence never depends on its batch. Weights are computed in float64 (the
  original: float32), the same distribution.
* Genes with equal chromosome and start are ordered stably by their draw order (the original's
  ``np.argsort`` is not stable; its tie order is an implementation detail).
* Padding is masked out of attention. The original passes the float mask ``1 - mask`` as
  ``src_key_padding_mask``, which torch ADDS to the attention logits: padded tokens are attended to (with
  +1), so its embedding of a cell depends on how far the batch pads it. Ours equals the original's for a
  cell embedded without padding (batch size 1, or the longest cell of its batch), whatever the batch.
* Dataset-level filtering is an option, off by default: the original's default ``--filter`` drops genes
  expressed in fewer than 10 cells and cells with fewer than 25 genes of the whole file before sampling;
  that makes a cell's sentence depend on the other cells of its store (and a served request of a few cells
  would lose every gene), so the default is the original's ``--filter False``. Option ``filter: true``
  applies the gene filter over the whole store (counted in ``check_store``); cells left with fewer than 25
  genes are counted in a log line and embedded all the same (one output row per cell).
* ``species_chrom.csv`` symbols are matched case-insensitively (the original looks the upper-cased data
  symbols up as they are written in the csv). Genes that have a protein embedding but no row in
  ``species_chrom.csv`` (the original fails with a KeyError) or no chromosome/start there are left out.
  A cell with no usable counts (the original fails dividing by zero) gets the sentence ``[CLS]``.
* Attention runs through ``F.scaled_dot_product_attention``, batch-first; the fused q/k/v projection is an
  ``nn.Linear`` ``self_attn.in_proj`` (official keys ``in_proj_weight`` / ``in_proj_bias`` are renamed on load
  and on write), so LoRA on in_proj / out_proj / linear1 / linear2 really trains. The last layer's
  queries, feed-forward and the decoder run on the CLS position only (every other output of the last layer
  feeds nothing the embedding uses, so that is the same number, cheaper).
* ``species_offsets.pkl`` is read with an unpickler that refuses every global (a dict of names to ints
  needs none); ``species_offsets.json`` (same dict) is accepted too (``tools/convert_uce_assets.py`` writes
  it). The architecture is read from the state dict's shapes; heads (not in the file) come from
  ``uce_args.json`` when present (this package's file of the original's CLI settings; written for the
  ``tiny`` preset), else the original's 20.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import math
import pickle
import re
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
from .contract import AttributionAdapter, check_coverage
from .scfoundation import load_gene_list

log = logging.getLogger(__name__)

#: official model file names (model_files/ of the original), tried in this order
MODEL_FILES = ("4layer_model.torch", "33l_8ep_1024t_1280.torch")
TOKEN_FILE = "all_tokens.torch"
OFFSETS_PKL = "species_offsets.pkl"
OFFSETS_JSON = "species_offsets.json"
CHROM_CSV = "species_chrom.csv"
PROTEIN_DIR = "protein_embeddings"
NEW_SPECIES_CSV = "new_species_protein_embeddings.csv"
ARGS_FILE = "uce_args.json"

#: protein embedding files per species (the original's get_species_to_pe)
SPECIES_FILES = {
    "human": "Homo_sapiens.GRCh38.gene_symbol_to_embedding_ESM2.pt",
    "mouse": "Mus_musculus.GRCm39.gene_symbol_to_embedding_ESM2.pt",
    "frog": "Xenopus_tropicalis.Xenopus_tropicalis_v9.1.gene_symbol_to_embedding_ESM2.pt",
    "zebrafish": "Danio_rerio.GRCz11.gene_symbol_to_embedding_ESM2.pt",
    "mouse_lemur": "Microcebus_murinus.Mmur_3.0.gene_symbol_to_embedding_ESM2.pt",
    "pig": "Sus_scrofa.Sscrofa11.1.gene_symbol_to_embedding_ESM2.pt",
    "macaca_fascicularis": "Macaca_fascicularis.Macaca_fascicularis_6.0.gene_symbol_to_embedding_ESM2.pt",
    "macaca_mulatta": "Macaca_mulatta.Mmul_10.gene_symbol_to_embedding_ESM2.pt",
}

#: the original CLI's defaults (eval_single_anndata.py) plus the hard-coded heads of run_eval
DEFAULT_ARGS: dict[str, int] = {
    "pad_length": 1536,
    "pad_token_idx": 0,
    "chrom_token_left_idx": 1,
    "chrom_token_right_idx": 2,
    "cls_token_idx": 3,
    "CHROM_TOKEN_OFFSET": 143_574,
    "sample_size": 1024,
    "nhead": 20,
}
#: get_ESM2_embeddings: chromosome rows appended to a token table that has none, from this seed
CHROM_SEED = 23
#: the original's --filter: sc.pp.filter_genes(min_cells=10) then sc.pp.filter_cells(min_genes=25)
#: (uce/data_proc/data_utils.py process_raw_anndata, lines 207-209 of uce-model 0.1.4)
FILTER_MIN_CELLS = 10
FILTER_MIN_GENES = 25
#: modules of the official file that a cell embedding never runs (pretraining's binary decoder)
UNUSED_MODULES = ("binary_decoder.", "gene_embedding_layer.")
#: binary_decoder's input is output_dim + 1280 in the original whatever d_model is
BINARY_EXTRA = 1280

_IN_PROJ_OFFICIAL = re.compile(r"^(transformer_encoder\.layers\.\d+\.self_attn\.)in_proj_(weight|bias)$")
_IN_PROJ_MODULE = re.compile(r"^(transformer_encoder\.layers\.\d+\.self_attn\.)in_proj\.(weight|bias)$")
_LAYER_RE = re.compile(r"^transformer_encoder\.layers\.(\d+)\.")

_REAL = {"token_dim": 5120, "d_model": 1280, "nhead": 20, "d_hid": 5120, "output_dim": 1280, "n_tokens": 145_469}
_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"token_dim": 32, "d_model": 64, "nhead": 4, "d_hid": 128, "output_dim": 64, "nlayers": 2},
    "4layer": {**_REAL, "nlayers": 4, "model_file": "4layer_model.torch"},
    "33layer": {**_REAL, "nlayers": 33, "model_file": "33l_8ep_1024t_1280.torch"},
}
#: stand-in assets of init_random: rows 0..3 are the special tokens, human genes start here
STANDIN_OFFSET = 4
STANDIN_CHROMS = [str(i) for i in range(1, 23)] + ["X", "Y", "MT"]


# --------------------------------------------------------------------------------------------- shapes


def official_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every key of the official state dict with its shape, in TransformerModel's order."""
    t, d, h, o, n = cfg["token_dim"], cfg["d_model"], cfg["d_hid"], cfg["output_dim"], cfg["nlayers"]
    out: dict[str, tuple[int, ...]] = {
        "pos_encoder.pe": (cfg["pad_length"], 1, d),
        "encoder.0.weight": (d, t),
        "encoder.0.bias": (d,),
        "encoder.2.weight": (d,),
        "encoder.2.bias": (d,),
    }
    for i in range(n):
        p = f"transformer_encoder.layers.{i}."
        out.update({
            p + "self_attn.in_proj_weight": (3 * d, d),
            p + "self_attn.in_proj_bias": (3 * d,),
            p + "self_attn.out_proj.weight": (d, d),
            p + "self_attn.out_proj.bias": (d,),
            p + "linear1.weight": (h, d),
            p + "linear1.bias": (h,),
            p + "linear2.weight": (d, h),
            p + "linear2.bias": (d,),
            p + "norm1.weight": (d,),
            p + "norm1.bias": (d,),
            p + "norm2.weight": (d,),
            p + "norm2.bias": (d,),
        })

    def block(prefix: str, dims: list[int]) -> None:
        for j, (a, b) in enumerate(itertools.pairwise(dims[:-1])):
            out.update({
                f"{prefix}.{j}.0.weight": (b, a),
                f"{prefix}.{j}.0.bias": (b,),
                f"{prefix}.{j}.1.weight": (b,),
                f"{prefix}.{j}.1.bias": (b,),
            })
        last = len(dims) - 2
        out[f"{prefix}.{last}.weight"] = (dims[-1], dims[-2])
        out[f"{prefix}.{last}.bias"] = (dims[-1],)

    block("decoder", [d, 1024, o, o, o])
    block("binary_decoder", [o + BINARY_EXTRA, 2048, 512, 128, 1])
    out.update({
        "gene_embedding_layer.0.weight": (d, t),
        "gene_embedding_layer.0.bias": (d,),
        "gene_embedding_layer.2.weight": (d,),
        "gene_embedding_layer.2.bias": (d,),
        "pe_embedding.weight": (cfg["n_tokens"], t),
    })
    return out


def _to_module_key(key: str) -> str:
    return _IN_PROJ_OFFICIAL.sub(r"\1in_proj.\2", key)


def _to_official_key(key: str) -> str:
    return _IN_PROJ_MODULE.sub(r"\1in_proj_\2", key)


# --------------------------------------------------------------------------------------------- modules


def _full_block(a: int, b: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(a, b), nn.LayerNorm(b), nn.GELU(), nn.Dropout(dropout))


def sinusoid_table(max_len: int, d_model: int) -> torch.Tensor:
    """[max_len, 1, d] sin on even, cos on odd features (the original's PositionalEncoding buffer)."""
    pos = torch.arange(max_len).unsqueeze(1)
    freq = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(max_len, 1, d_model)
    pe[:, 0, 0::2] = torch.sin(pos * freq)
    pe[:, 0, 1::2] = torch.cos(pos * freq)
    return pe


class PositionalEncoding(nn.Module):
    def __init__(self, d_model: int, max_len: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("pe", sinusoid_table(max_len, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # batch-first [n, L, d]
        return self.dropout(x + self.pe[: x.shape[1], 0].to(x.dtype))


class SelfAttention(SdpaSelfAttention):
    """nn.MultiheadAttention's math through SDPA; stored under the official in_proj_weight / in_proj_bias."""

    qkv_name = "in_proj"

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, first_only: bool = False) -> torch.Tensor:
        """``first_only``: queries at position 0 only (keys and values from every position)."""
        if not first_only:
            return super().forward(x, attn_mask)
        b, n, d = x.shape
        qkv = self.in_proj(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(
            qkv[0][:, :, :1], qkv[1], qkv[2], attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out_proj(out.transpose(1, 2).reshape(b, 1, d))


class _Layers(nn.Module):
    def __init__(self, d: int, nhead: int, d_hid: int, nlayers: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(d, nhead, d_hid, dropout, SelfAttention) for _ in range(nlayers))


class UCEModel(nn.Module):
    """TransformerModel with the official attribute names; ``forward`` gives the cell embedding."""

    def __init__(self, cfg: dict[str, Any], dropout: float = 0.05, heads: bool = True) -> None:
        super().__init__()
        t, d, o = cfg["token_dim"], cfg["d_model"], cfg["output_dim"]
        self.config = dict(cfg)
        self.d_model = d
        self.pos_encoder = PositionalEncoding(d, cfg["pad_length"], dropout)
        self.encoder = nn.Sequential(nn.Linear(t, d), nn.GELU(), nn.LayerNorm(d))
        self.transformer_encoder = _Layers(d, cfg["nhead"], cfg["d_hid"], cfg["nlayers"], dropout)
        self.decoder = nn.Sequential(
            _full_block(d, 1024, dropout), _full_block(1024, o, dropout), _full_block(o, o, dropout), nn.Linear(o, o)
        )
        if heads:  # not used for cell embeddings; built by init_random so its file is the official one
            self.binary_decoder = nn.Sequential(
                _full_block(o + BINARY_EXTRA, 2048, dropout),
                _full_block(2048, 512, dropout),
                _full_block(512, 128, dropout),
                nn.Linear(128, 1),
            )
            self.gene_embedding_layer = nn.Sequential(nn.Linear(t, d), nn.GELU(), nn.LayerNorm(d))
        self.pe_embedding = nn.Embedding(cfg["n_tokens"], t)
        self.pe_embedding.weight.requires_grad_(False)  # frozen in the original (from_pretrained)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens [n, L] (int), mask [n, L] (bool, True = real token) -> L2-normalised CLS output [n, o]."""
        x = F.normalize(self.pe_embedding(tokens), dim=-1)
        x = self.encoder(x) * math.sqrt(self.d_model)
        x = self.pos_encoder(x)
        attn_mask = mask[:, None, None, :]  # keys only: padding is never attended to
        last = len(self.transformer_encoder.layers) - 1
        for i, layer in enumerate(self.transformer_encoder.layers):
            # the decoder reads position 0 only, and the last layer's other outputs feed nothing
            x = layer(x, attn_mask, first_only=i == last)
        return F.normalize(self.decoder(x[:, 0]), dim=-1)


# --------------------------------------------------------------------------------------------- assets


class _NoGlobals(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"global {module}.{name} refused")


def read_species_offsets(ckpt: Path) -> dict[str, int]:
    """species -> first row of its genes in the token table, from species_offsets.json or .pkl (read
    without any global: plain dicts of str -> int only)."""
    js, pkl = ckpt / OFFSETS_JSON, ckpt / OFFSETS_PKL
    if js.is_file():
        try:
            obj = json.loads(js.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"{js} is not valid JSON ({err})") from None
    elif pkl.is_file():
        try:
            obj = _NoGlobals(io.BytesIO(pkl.read_bytes())).load()
        except pickle.UnpicklingError as err:
            raise UserError(
                f"{pkl} holds Python objects beyond a plain dict of names to integers ({err}), which are not "
                f"unpickled for safety; write it as {OFFSETS_JSON} (tools/convert_uce_assets.py)"
            ) from None
        except Exception as err:  # truncated or not a pickle
            raise UserError(f"{pkl} is not a readable pickle ({type(err).__name__}: {err})") from None
    else:
        raise UserError(f"{ckpt} has neither {OFFSETS_PKL} nor {OFFSETS_JSON} (UCE's species offsets)")
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in obj.items()
    ):
        raise UserError(f"UCE species offsets in {ckpt} must be a dict of species name -> integer")
    return obj


def protein_embedding_file(ckpt: Path, species: str) -> Path:
    paths = {s: ckpt / PROTEIN_DIR / f for s, f in SPECIES_FILES.items()}
    extra = ckpt / NEW_SPECIES_CSV
    if extra.is_file():  # the original's (commented-out) extension: columns species, path
        df = pd.read_csv(extra, dtype=str)
        if not {"species", "path"} <= set(df.columns):
            raise UserError(f"{extra} must have columns species and path")
        paths.update({s: ckpt / p for s, p in zip(df["species"], df["path"], strict=True)})
    if species not in paths:
        raise UserError(f"UCE has no protein embeddings for species {species!r}; known: {', '.join(sorted(paths))}")
    if not paths[species].is_file():
        raise UserError(
            f"{paths[species]} not found: UCE needs the protein embeddings of {species!r} (the official "
            f"model_files/{PROTEIN_DIR}/ files) in the checkpoint directory"
        )
    return paths[species]


def read_gene_symbols(path: Path) -> list[str]:
    """Upper-cased symbols of a protein-embedding file in its order (first occurrence of each, as the
    original's dict of upper-cased keys); the list index + species offset is the gene's token."""
    obj = load_weights_file(path, "re-save it as a plain dict of gene symbol -> tensor")
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise UserError(f"{path} must hold a dict of gene symbol -> protein embedding tensor")
    return list(dict.fromkeys(k.upper() for k in obj))


def read_chrom_table(path: Path) -> pd.DataFrame:
    """species_chrom.csv with the original's chromosome codes: ``spec_chrom`` = code of
    ``species + "_" + chromosome`` in a categorical over all rows (sorted categories)."""
    if not path.is_file():
        raise UserError(f"{path} not found: UCE needs {CHROM_CSV} (genes' chromosomes and starts) in the checkpoint")
    try:
        df = pd.read_csv(path, dtype={"species": str, "gene_symbol": str, "chromosome": str})
    except Exception as err:
        raise UserError(f"{path} is not a readable csv ({type(err).__name__}: {err})") from None
    need = {"species", "gene_symbol", "chromosome", "start"}
    if not need <= set(df.columns):
        raise UserError(f"{path} must have columns {', '.join(sorted(need))}; found {', '.join(map(str, df.columns))}")
    df["spec_chrom"] = pd.Categorical(df["species"] + "_" + df["chromosome"]).codes.astype(np.int64)
    df["start"] = pd.to_numeric(df["start"], errors="coerce")
    return df


def read_args(ckpt: Path) -> dict[str, int]:
    args = dict(DEFAULT_ARGS)
    path = ckpt / ARGS_FILE
    if path.is_file():
        try:
            given = json.loads(path.read_text())
        except ValueError as err:
            raise UserError(f"{path} is not valid JSON ({err})") from None
        unknown = sorted(set(given) - set(DEFAULT_ARGS) - {"nlayers"})
        if unknown or not all(isinstance(v, int) and not isinstance(v, bool) for v in given.values()):
            raise UserError(f"{path}: integer settings among {', '.join(sorted(DEFAULT_ARGS))}, nlayers only")
        args.update(given)
    return args


def cell_seed(cell_id: str, seed: int = 0) -> int:
    """Stable per-cell seed (not Python's salted hash): 32 bits of SHA-256 of the seed and the cell id."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{cell_id}".encode()).digest()[:4], "little")


# --------------------------------------------------------------------------------------------- tokenizer


class UCETokenizer(CellTokenizer):
    """Store cells -> UCE cell sentences (``input_ids`` int32, CLS first, no padding)."""

    def __init__(
        self,
        genes: pd.DataFrame,
        gene_symbols: list[str],
        offset: int,
        chrom: pd.DataFrame,
        species: str,
        args: dict[str, int],
        seed: int = 0,
    ) -> None:
        spec = chrom[chrom["species"] == species].dropna(subset=["chromosome", "start"])
        spec = spec.drop_duplicates("gene_symbol")  # the original needs unique symbols; first row wins
        where = {g: i for i, g in enumerate(gene_symbols)}
        loc: dict[str, tuple[int, int]] = {}
        for sym, c, st in zip(spec["gene_symbol"].str.upper(), spec["spec_chrom"], spec["start"], strict=True):
            loc.setdefault(sym, (int(c), int(st)))
        order = genes.sort_values("position")
        positions = order["position"].to_numpy(dtype=np.int64)
        n = int(positions.max()) + 1 if len(positions) else 0
        self.token = np.full(n, -1, dtype=np.int64)
        self.chrom = np.zeros(n, dtype=np.int64)
        self.start = np.zeros(n, dtype=np.int64)
        no_chrom = 0
        for pos, sym in zip(positions, order["symbol"], strict=True):
            if not isinstance(sym, str) or sym.upper() not in where:
                continue
            hit = loc.get(sym.upper())
            if hit is None:
                no_chrom += 1
                continue
            self.token[pos] = where[sym.upper()] + offset
            self.chrom[pos], self.start[pos] = int(hit[0]), int(hit[1])
        self.n_store_genes = len(genes)
        self.n_matched = int((self.token >= 0).sum())
        self.n_no_chrom = no_chrom
        self.coverage = self.n_matched / self.n_store_genes if self.n_store_genes else 0.0
        self.args = dict(args)
        self.seed = int(seed)
        check_coverage(self.coverage, self.n_store_genes,
                       f"have a UCE {species} protein embedding and chromosome position", list(order["symbol"][:3]),
                       "UCE needs gene symbols of the chosen species (option 'species')")

    def sentence(self, cell_id: str, gene_index: np.ndarray, values: np.ndarray) -> np.ndarray:
        a = self.args
        gi = np.asarray(gene_index, dtype=np.int64)
        keep = self.token[gi] >= 0
        gi = gi[keep]
        # the original reads counts as int64 (truncation), then log1p
        w = np.log1p(np.trunc(np.asarray(values, dtype=np.float64)[keep]).clip(min=0))
        total = w.sum()
        if not total > 0:
            return np.array([a["cls_token_idx"]], dtype=np.int32)
        rng = np.random.RandomState(cell_seed(str(cell_id), self.seed))
        pick = gi[rng.choice(len(w), size=a["sample_size"], replace=True, p=w / total)]
        chrom = self.chrom[pick]
        order = np.lexsort((self.start[pick], chrom))  # by chromosome, then start; stable for ties
        pick, chrom = pick[order], chrom[order]
        uniq = np.unique(chrom)
        rng.shuffle(uniq)  # no natural chromosome order: random per cell, as the original
        parts = [np.array([a["cls_token_idx"]], dtype=np.int64)]
        for c in uniq:
            parts.append(np.array([c + a["CHROM_TOKEN_OFFSET"]], dtype=np.int64))
            parts.append(self.token[pick[chrom == c]])
            parts.append(np.array([a["chrom_token_right_idx"]], dtype=np.int64))
        out = np.concatenate(parts)
        if len(out) > a["pad_length"]:
            raise UserError(f"a UCE cell sentence has {len(out)} tokens, more than pad_length {a['pad_length']}")
        return out.astype(np.int32)

    def __call__(
        self, cell_ids: np.ndarray, gene_index: list[np.ndarray], values: list[np.ndarray]
    ) -> dict[str, list[np.ndarray]]:
        return {
            "input_ids": [
                self.sentence(c, g, v) for c, g, v in zip(cell_ids, gene_index, values, strict=True)
            ]
        }


# --------------------------------------------------------------------------------------------- checkpoint


def model_file(ckpt: Path) -> Path:
    for name in MODEL_FILES:
        if (ckpt / name).is_file():
            return ckpt / name
    others = sorted(p for p in ckpt.glob("*.torch") if p.name != TOKEN_FILE)
    if len(others) == 1:
        return others[0]
    found = ", ".join(sorted(p.name for p in ckpt.iterdir())) if ckpt.is_dir() else "nothing"
    raise UserError(
        f"{ckpt} has no UCE model file: expected one of {', '.join(MODEL_FILES)} (or a single other .torch state "
        f"dict besides {TOKEN_FILE}); found: {found or 'nothing'}"
    )


def _config_from_state(state: dict[str, Any], args: dict[str, int], path: Path) -> dict[str, Any]:
    """The architecture from the state dict's shapes (heads and pad length from the settings)."""
    layers = sorted({int(m.group(1)) for k in state if (m := _LAYER_RE.match(k))})
    first = f"transformer_encoder.layers.{layers[0] if layers else 0}.linear1.weight"
    anchors = ("encoder.0.weight", first, "decoder.3.weight", "pe_embedding.weight")
    missing = [k for k in anchors if not isinstance(state.get(k), torch.Tensor) or state[k].dim() != 2]
    if missing:
        raise UserError(f"{path} is not a UCE TransformerModel state dict; missing keys: {short_keys(missing)}")
    enc, l1, dec, pe = (state[k] for k in anchors)
    cfg = {
        "token_dim": int(enc.shape[1]),
        "d_model": int(enc.shape[0]),
        "d_hid": int(l1.shape[0]),
        "output_dim": int(dec.shape[0]),
        "n_tokens": int(pe.shape[0]),
        "nlayers": int(args.get("nlayers", layers[-1] + 1)),
        "nhead": int(args["nhead"]),
        "pad_length": int(args["pad_length"]),
    }
    if cfg["d_model"] % cfg["nhead"]:
        raise UserError(f"{path}: d_model {cfg['d_model']} is not divisible by nhead {cfg['nhead']} ({ARGS_FILE})")
    return cfg


def read_checkpoint(ckpt: Path, args: dict[str, int]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, state dict in this module's key names) of the model file: every key the cell embedding
    runs, with its shape; ``UNUSED_MODULES`` skipped (named in a log line); nothing else."""
    path = model_file(ckpt)
    state = load_weights_file(path, "save the model's state dict only (torch.save(model.state_dict()))")
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise UserError(f"{path} does not hold a state dict (name -> tensor)")
    cfg = _config_from_state(state, args, path)
    expected = {k: v for k, v in official_shapes(cfg).items() if not k.startswith(UNUSED_MODULES)}
    # the binary (gene-expressed) decoder and its gene embedding layer serve UCE's pretraining loss only
    kept = check_state(state, expected, str(path), f"the UCE architecture ({cfg['nlayers']} layers)",
                       skip=lambda k: k.startswith(UNUSED_MODULES))
    return cfg, {_to_module_key(k): v for k, v in kept.items()}


def token_table(ckpt: Path, pe: torch.Tensor, chrom_offset: int) -> torch.Tensor:
    """The token table the original ends up with: the state dict's pe_embedding, unless all_tokens.torch
    has another row count. (The original first appends the chromosome rows, seed 23, to a table of exactly
    CHROM_TOKEN_OFFSET rows, which then has the state dict's row count and is not used; so such a table
    keeps the state dict's, and no rows need drawing here.)"""
    path = ckpt / TOKEN_FILE
    if not path.is_file():
        return pe
    table = load_weights_file(path, "save the token table as one tensor")
    if not isinstance(table, torch.Tensor) or table.dim() != 2 or table.shape[1] != pe.shape[1]:
        got = tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
        raise UserError(f"{path} must be one [tokens, {pe.shape[1]}] tensor; found {got}")
    return pe if table.shape[0] in (chrom_offset, pe.shape[0]) else table


# --------------------------------------------------------------------------------------------- the model


def uce_special_tokens(tok: Any, ids: np.ndarray) -> np.ndarray:
    """CLS, chromosome-start and chromosome-end tokens: by place, since in the released token table their
    ids are rows of the first species' protein embeddings too. Layout: CLS, (chrom, genes..., end)*."""
    ids = np.asarray(ids, dtype=np.int64)
    chrom = ids >= tok.args["CHROM_TOKEN_OFFSET"]
    out = chrom.copy()
    out[:1] = True
    out[:-1] |= chrom[1:]  # the end token before the next chromosome's start
    if len(ids) > 1:
        out[-1] = True  # the last chromosome's end token
    return out


@register
class UCE(FoundationModel):
    """UCE cell embeddings; options: ``species`` (protein embeddings to use, default human), ``seed`` (of the
    per-cell gene sampling, default 0)."""

    name = "uce"
    presets: ClassVar[dict[str, dict[str, Any]]] = _PRESETS
    lora_targets: ClassVar[list[str]] = ["self_attn.in_proj", "self_attn.out_proj", "linear1", "linear2"]
    #: gene-as-token: the protein-embedding layer; chromosome and CLS tokens are never genes
    attribution_adapter = AttributionAdapter(layer=lambda m: m.pe_embedding, lookup=lambda fm, tok: tok.token,
                                            special=uce_special_tokens)
    default_options: ClassVar[dict[str, Any]] = {
        "checkpoint": None, "preset": None, "species": "human", "seed": 0,
        # the original's --filter (default True there): genes expressed in < 10 of the store's cells left out.
        # Off by default here: it makes a cell's tokens depend on the other cells of its store, and a store of
        # a few cells (a served request) would lose every gene. `filter: true` gives the original's behaviour.
        "filter": False,
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if not isinstance(self.options["filter"], bool):
            raise UserError(f"uce option filter={self.options['filter']!r}: use true (the original's --filter) "
                            "or false")
        self._gene_cells: np.ndarray | None = None
        if not isinstance(self.options["species"], str):
            raise UserError(f"uce option species={self.options['species']!r} must be a name such as human")
        if isinstance(self.options["seed"], bool) or not isinstance(self.options["seed"], int):
            raise UserError(f"uce option seed={self.options['seed']!r} must be an integer")
        self._n_tokens: int | None = None
        self._args: dict[str, int] | None = None

    def args(self) -> dict[str, int]:
        """The original's CLI settings (defaults, or the checkpoint's uce_args.json)."""
        if self._args is None:
            self._args = read_args(self.checkpoint_dir())
        return self._args

    @property
    def max_length(self) -> int:
        return self.args()["pad_length"]

    def check_store(self, store: Any) -> None:
        """Counts; with option ``filter`` also the number of cells each store gene is expressed in (one pass
        over the store's gene lists), for the original's gene filter."""
        super().check_store(store)
        if not self.options["filter"]:
            return
        counts = np.zeros(len(store.genes), dtype=np.int64)
        for batch in store.iter_batches(batch_size=4096, columns=["gene_index"]):
            flat = batch.column("gene_index").flatten().to_numpy(zero_copy_only=False)
            counts += np.bincount(flat.astype(np.int64), minlength=len(counts))[: len(counts)]
        keep = counts >= FILTER_MIN_CELLS
        few = 0
        for batch in store.iter_batches(batch_size=4096, columns=["gene_index"]):
            for gi in batch.column("gene_index").to_pylist():
                few += int(keep[np.asarray(gi, dtype=np.int64)].sum() < FILTER_MIN_GENES)
        log.info("uce filter: %d of the store's %d genes are expressed in fewer than %d cells and left out; %d cells "
                 "keep fewer than %d genes (the original drops those cells; here they are embedded all the same)",
                 int((~keep).sum()), len(counts), FILTER_MIN_CELLS, few, FILTER_MIN_GENES)
        self._gene_cells = counts

    def make_tokenizer(self, genes: pd.DataFrame) -> UCETokenizer:
        ckpt, species = self.checkpoint_dir(), self.options["species"]
        offsets = read_species_offsets(ckpt)
        if species not in offsets:
            raise UserError(f"{ckpt}: species offsets have no {species!r} (they have {', '.join(sorted(offsets))})")
        symbols = read_gene_symbols(protein_embedding_file(ckpt, species))
        tok = UCETokenizer(
            genes, symbols, offsets[species], read_chrom_table(ckpt / CHROM_CSV), species, self.args(),
            self.options["seed"],
        )
        if self.options["filter"]:
            if self._gene_cells is None or len(self._gene_cells) != len(genes):
                raise UserError("uce option filter: true counts each gene's cells over the whole store; embed the "
                                "store through the pipeline (scdrugmap-ray run / embed), or use filter: false")
            rare = np.flatnonzero(self._gene_cells < FILTER_MIN_CELLS)
            tok.token[rare[rare < len(tok.token)]] = -1
            tok.n_matched = int((tok.token >= 0).sum())
        log.info(
            "uce: %d of the store's %d genes have a %s protein embedding and position (%.1f%%); %d more lack a "
            "chromosome position",
            tok.n_matched, tok.n_store_genes, species, 100 * tok.coverage, tok.n_no_chrom,
        )
        return tok

    def collate(self, rows: dict[str, list[np.ndarray]], pad_to: int | None = None) -> dict[str, Any]:
        ids, lengths = pad_ragged(rows["input_ids"], self.args()["pad_token_idx"], np.int64, pad_to)
        if self._n_tokens is not None and ids.size and int(ids.max()) >= self._n_tokens:
            raise UserError(
                f"UCE token {int(ids.max())} is beyond the token table ({self._n_tokens} rows): the species "
                "offsets / chromosome table do not belong to this model file"
            )
        mask = torch.from_numpy(np.arange(ids.shape[1]) < lengths[:, None])
        return {"input_ids": torch.from_numpy(ids), "attention_mask": mask}

    def load(self, device: str = "cpu", dtype: Any = None) -> UCEModel:
        dtype = self.weights_dtype(device, dtype)  # option dtype: upstream precision by default
        ckpt = self.checkpoint_dir()
        args = self.args()
        cfg, state = read_checkpoint(ckpt, args)
        table = token_table(ckpt, state["pe_embedding.weight"], args["CHROM_TOKEN_OFFSET"])
        state["pe_embedding.weight"] = table
        cfg["n_tokens"] = int(table.shape[0])
        module = materialize(lambda: UCEModel(cfg, heads=False), state, device, dtype)
        module.pe_embedding.weight.requires_grad_(False)
        self._n_tokens = cfg["n_tokens"]
        return module

    def embed(self, module: UCEModel, batch: dict[str, Any]) -> torch.Tensor:
        return module(batch["input_ids"], batch["attention_mask"]).float()

    @classmethod
    def init_random(cls, out_dir: Path, preset: str = "tiny", config: dict[str, Any] | None = None) -> Path:
        """A random-weight checkpoint plus random stand-in assets (protein embeddings for the 19,264 human
        symbols of scFoundation's gene list, offsets, a chromosome table with random positions, the token
        table) in the original's file formats and names."""
        if preset not in cls.presets:
            raise UserError(f"model 'uce' has no preset {preset!r}; presets: {', '.join(cls.presets)}")
        over = dict(config or {})
        firsts: dict[str, str] = {}
        for g in over.pop("genes", None) or load_gene_list():  # one gene per upper-cased symbol
            firsts.setdefault(str(g).upper(), str(g))
        symbols = list(firsts.values())
        p = {**cls.presets[preset], **over}
        n_chrom = len(STANDIN_CHROMS)
        chrom_offset = int(p.get("chrom_offset", DEFAULT_ARGS["CHROM_TOKEN_OFFSET"] if "n_tokens" in p else 0))
        if not chrom_offset:
            chrom_offset = STANDIN_OFFSET + len(symbols)
        n_tokens = int(p.get("n_tokens", chrom_offset + n_chrom))
        if STANDIN_OFFSET + len(symbols) > chrom_offset or n_tokens < chrom_offset + n_chrom:
            raise UserError(f"uce init_random: {len(symbols)} genes + {n_chrom} chromosomes exceed {n_tokens} tokens")
        cfg = {**{k: p[k] for k in ("token_dim", "d_model", "nhead", "d_hid", "output_dim", "nlayers")},
               "n_tokens": n_tokens, "pad_length": DEFAULT_ARGS["pad_length"]}
        out_dir = Path(out_dir)
        (out_dir / PROTEIN_DIR).mkdir(parents=True, exist_ok=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same preset always gives the same files (stable cache keys)
            module = UCEModel(cfg)
            pe = torch.randn(n_tokens, cfg["token_dim"])
            gen = torch.Generator().manual_seed(CHROM_SEED)
            pe[chrom_offset:] = torch.normal(0.0, 1.0, size=(n_tokens - chrom_offset, cfg["token_dim"]), generator=gen)
            module.pe_embedding.weight.data.copy_(pe)
            rng = np.random.default_rng(0)
            starts = rng.permutation(np.arange(1, 250_000_001, 1000))[: len(symbols)]  # unique positions
            chroms = rng.choice(STANDIN_CHROMS, size=len(symbols))
        state = {_to_official_key(k): v.contiguous() for k, v in module.state_dict().items()}
        expected = official_shapes(cfg)
        assert list(state) == list(expected), "UCEModel keys differ from the official order"
        name = p.get("model_file", "tiny_model.torch")
        with atomic_file(out_dir / name) as tmp:
            torch.save(state, tmp)
        block = pe[STANDIN_OFFSET : STANDIN_OFFSET + len(symbols)].clone()  # one storage: a fast file to read
        proteins = {s: block[i] for i, s in enumerate(symbols)}
        with atomic_file(out_dir / PROTEIN_DIR / SPECIES_FILES["human"]) as tmp:
            torch.save(proteins, tmp)
        with atomic_file(out_dir / TOKEN_FILE) as tmp:
            torch.save(pe[:chrom_offset].clone(), tmp)
        with atomic_file(out_dir / OFFSETS_PKL) as tmp:
            tmp.write_bytes(pickle.dumps({"human": STANDIN_OFFSET}, protocol=4))
        # upper-case symbols: the original looks the csv up with upper-cased data symbols
        upper = [g.upper() for g in symbols]
        table = pd.DataFrame({"species": "human", "gene_symbol": upper, "chromosome": chroms, "start": starts})
        with atomic_file(out_dir / CHROM_CSV) as tmp:
            table.to_csv(tmp, index=False)
        args = {"nhead": cfg["nhead"], "CHROM_TOKEN_OFFSET": chrom_offset}
        args = {k: v for k, v in args.items() if v != DEFAULT_ARGS[k]}
        if args:
            write_json(out_dir / ARGS_FILE, args)
        cls.mark_random(out_dir, preset, "random weights and random stand-in assets, not pretrained")
        return out_dir
