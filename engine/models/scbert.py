"""scBERT (Performer encoder, ``panglao_pretrain.pth``) cell embeddings.

What the original does (TencentAILabHealthcare/scBERT: ``preprocess.py``, ``predict.py``,
``finetune.py``, ``performer_pytorch/performer_pytorch.py``):

* Input: one cell = a dense vector over the fixed 16,906-gene Panglao order (``preprocess.py``: genes of
  the data not in the list are dropped, missing ones are zero), then ``sc.pp.normalize_total(target_sum=1e4)``
  (the total over those 16,906 genes) and ``sc.pp.log1p(base=2)``; all arithmetic in float32.
* Binning (``predict.py`` / ``finetune.py``): values above ``CLASS - 2`` are set to ``CLASS - 2``, then
  ``.long()`` truncates, with ``CLASS = bin_num + 2 = 7``: tokens 0..5 (6 is the pretraining mask/pad
  token). One extra token 0 is appended: 16,907 tokens per cell, zero-expression genes included.
* ``PerformerLM(num_tokens=7, dim=200, depth=6, max_seq_len=16907, heads=10, local_attn_heads=0,
  g2v_position_emb=True)`` (dim_head 64, qkv without bias, attention output with bias, ff_mult 4, GELU,
  pre-LayerNorm, nb_features = int(64 ln 64) = 266 random features per head): ``x = token_emb(ids) +
  pos_emb`` where ``pos_emb.emb`` holds gene2vec (``gene2vec_16906.npy`` + one zero row, float64), the
  Performer layers, a final LayerNorm; ``to_out`` (Linear(200, 7)) gives bin logits.
* Checkpoint ``panglao_pretrain.pth``: ``torch.save`` of ``{'epoch', 'model_state_dict',
  'optimizer_state_dict', 'scheduler_state_dict', 'losses'}``; the state dict has ``token_emb.weight``,
  ``pos_emb.emb.weight``, ``performer.calls_since_last_redraw``, ``performer.net.layers.N.0.norm.*``,
  ``...N.0.fn.fast_attention.projection_matrix``, ``...N.0.fn.to_{q,k,v}.weight``, ``...N.0.fn.to_out.*``,
  ``...N.1.norm.*``, ``...N.1.fn.fn.w{1,2}.*``, ``norm.*``, ``to_out.*``. The architecture is not stored:
  it follows from the shapes.
* Cell embedding: scBERT itself has none (its fine-tuning head convolves the [16,907, 200] encodings).
  scDrugMap's ``get_ebd.py`` for scBERT (zenodo code of arXiv 2505.05612, mirrored in the public code
  index; the repository QSong-github/scDrugMap only ships ``benchmarking_main_EBD.py``, whose MLP takes
  200-d inputs) calls its bundled ``PerformerLM`` on each cell and saves a 200-d vector per cell; that
  bundled file is not public, and scDrugMap's other ``get_ebd.py`` scripts (e.g. Geneformer's) take
  ``torch.mean(hidden_states, dim=1)``. So the cell embedding here (``pool: mean``, default) is the mean
  over all 16,907 tokens of the final-LayerNorm encodings (``return_encodings=True``): 200-d.
  ``pool: last`` takes the appended token's encoding instead (what several third-party scBERT embedding
  scripts use). scDrugMap's own scBERT inputs (its ``dataset_making.py``) are not the original's: each
  cell's values sorted in descending order without their genes, ``int()``-cast, cut or zero-padded to
  8,192 (+1) tokens, so the gene2vec position no longer names the gene. This file follows the original
  preprocessing instead (the position of a token is its gene, as scBERT was pretrained).

Where this file follows it:

* The Performer layers are performer-pytorch's own modules (``SelfAttention``, ``FeedForward``,
  ``PreLayerNorm``, ``Chunk``, ``SequentialSequence``), laid out so that every official key name is the
  module's own name: the official state dict loads strictly, with no renaming.
* The random-feature projections are the checkpoint's buffers and are never redrawn (the original only
  redraws them in training mode; there is no redraw step here at all).
* The key-side softmax kernel stabilises with the maximum over all heads, tokens and features of the
  cell, as the original's ``torch.max(data_dash)`` does when it embeds one cell at a time (``predict.py``);
  performer-pytorch 1.1.4 instead takes one maximum per head, which changes results slightly through the
  kernel's ``eps`` term. Keys are reshaped to one "head" before performer-pytorch's ``softmax_kernel`` to
  get the original's rule.
* Store genes are matched to the list by exact symbol, the first occurrence of a duplicated symbol wins
  (``preprocess.py`` uses ``list.index``); the total count is over the matched genes only.

Where it differs, and why:

* The key maximum is per cell, not over the whole batch (the original's maximum spans every cell of a
  batch, which would make a cell's embedding depend on its batch).
* The Performer kernel and linear attention run in float32 even when the module is bfloat16 (sums over
  16,907 tokens); the gene2vec table is cast to the module dtype before the addition (the original adds
  float64 to float32 in place: the same up to float32 rounding).
* ``sc.pp.filter_cells(min_genes=200)`` is not applied: every cell of the store gets an embedding (filter
  cells when building the store if the original's behaviour is wanted).
* ``to_out.*`` (the pretraining bin-logit head, in the released ``panglao_pretrain.pth``) is skipped and
  named in one log line (``checkpoint.check_state``): an embedding never uses it, and keeping it would make
  ``to_out`` name an unused Linear for LoRA. A file without it (a re-saved encoder) loads too.
* The user's ``gene2vec_16906.npy`` is not read at embed time: the checkpoint's ``pos_emb.emb.weight``
  overwrites it in the original as well (``load_state_dict`` after construction).
"""

from __future__ import annotations

import copy
import gzip
import logging
import math
import re
import warnings
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..errors import UserError
from ..fsutil import atomic_file
from .base import CellTokenizer, FoundationModel, register
from .checkpoint import check_state, load_weights_file, short_keys
from .contract import AttributionAdapter, check_coverage, positive_int, tokenizer_lookup
from .performer import performer_layer_shapes

with warnings.catch_warnings():  # performer-pytorch imports distutils' LooseVersion
    warnings.simplefilter("ignore", DeprecationWarning)
    from performer_pytorch.performer_pytorch import (
        Chunk,
        FastAttention,
        FeedForward,
        PreLayerNorm,
        SelfAttention,
        linear_attention,
        softmax_kernel,
    )
    from performer_pytorch.reversible import SequentialSequence

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "panglao_pretrain.pth"
#: finetune.py's default --model_path name; accepted when CHECKPOINT_FILE is absent
ALT_CHECKPOINT_FILES = ("panglao_pretrained.pth",)
GENE2VEC_FILE = "gene2vec_16906.npy"
GENE_ORDER_FILE = Path(__file__).parent / "resources" / "scbert" / "gene_order.txt.gz"
N_GENES = 16_906
SEQ_LEN = N_GENES + 1  # the appended 0 token
STATE_KEY = "model_state_dict"
POOLS = ("mean", "last")
LOG_BASES = {"2": 2.0, "e": math.e}
#: the pretraining head, required in a checkpoint and then dropped
HEAD_PREFIX = "to_out."

_LAYER_RE = re.compile(r"^performer\.net\.layers\.(\d+)\.")


def _nb_features(dim_head: int) -> int:
    # FastAttention's default: int(d * ln d)
    return int(dim_head * math.log(dim_head))


_CONFIG_PANGLAO: dict[str, Any] = {
    "num_tokens": 7,  # bin_num 5 + 2
    "dim": 200,
    "depth": 6,
    "heads": 10,
    "dim_head": 64,
    "nb_features": _nb_features(64),  # 266
    "ff_mult": 4,
    "max_seq_len": SEQ_LEN,
}
_CONFIG_TINY: dict[str, Any] = {
    **_CONFIG_PANGLAO,
    "dim": 32,
    "depth": 2,
    "heads": 2,
    "dim_head": 16,
    "nb_features": _nb_features(16),  # 44
}


# --------------------------------------------------------------------------------------------- config


def validate_config(cfg: dict[str, Any]) -> dict[str, Any]:
    for key in ("num_tokens", "dim", "depth", "heads", "dim_head", "nb_features", "ff_mult", "max_seq_len"):
        positive_int(cfg, key, "scBERT config")
    if cfg["max_seq_len"] != SEQ_LEN:
        raise UserError(
            f"scBERT max_seq_len {cfg['max_seq_len']} does not fit the 16,906-gene order (needs {SEQ_LEN}: "
            "16,906 genes + the appended token)"
        )
    if cfg["num_tokens"] < 3:
        raise UserError(f"scBERT num_tokens {cfg['num_tokens']} is too small (bins 0..num_tokens-2 + mask)")
    return cfg


def official_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every key of the official ``model_state_dict`` with its shape, in PerformerLM's order."""
    d, inner = cfg["dim"], cfg["heads"] * cfg["dim_head"]
    out: dict[str, tuple[int, ...]] = {
        "token_emb.weight": (cfg["num_tokens"], d),
        "pos_emb.emb.weight": (cfg["max_seq_len"], d),
        "performer.calls_since_last_redraw": (),
    }
    # qkv_bias=False in PerformerLM
    out.update(performer_layer_shapes("performer.", d, cfg["depth"], inner, cfg["dim_head"], cfg["nb_features"],
                                      cfg["ff_mult"]))
    out["norm.weight"] = (d,)
    out["norm.bias"] = (d,)
    out[HEAD_PREFIX + "weight"] = (cfg["num_tokens"], d)
    out[HEAD_PREFIX + "bias"] = (cfg["num_tokens"],)
    return out


def config_from_state(state: dict[str, Any], where: str) -> dict[str, Any]:
    """The architecture of an official state dict, read from its shapes (the file stores no config)."""
    probes = {
        "token_emb.weight": 2,
        "performer.net.layers.0.0.fn.fast_attention.projection_matrix": 2,
        "performer.net.layers.0.0.fn.to_q.weight": 2,
        "performer.net.layers.0.1.fn.fn.w1.weight": 2,
    }
    missing = [k for k in probes if k not in state]
    if missing:
        raise UserError(
            f"{where} is not an official scBERT (PerformerLM) state dict; missing keys: {short_keys(missing)}"
        )
    for k, ndim in probes.items():
        if not isinstance(state[k], torch.Tensor) or state[k].dim() != ndim:
            raise UserError(f"{where}: key {k} must be a {ndim}-d tensor")
    num_tokens, dim = state["token_emb.weight"].shape
    nb_features, dim_head = state["performer.net.layers.0.0.fn.fast_attention.projection_matrix"].shape
    inner = state["performer.net.layers.0.0.fn.to_q.weight"].shape[0]
    ff = state["performer.net.layers.0.1.fn.fn.w1.weight"].shape[0]
    depth = 1 + max(int(m.group(1)) for k in state if (m := _LAYER_RE.match(str(k))))
    if inner % dim_head or ff % dim:
        raise UserError(
            f"{where}: to_q rows ({inner}) / w1 rows ({ff}) are not multiples of dim_head ({dim_head}) / dim ({dim})"
        )
    pos = state.get("pos_emb.emb.weight")
    if isinstance(pos, torch.Tensor) and pos.dim() == 2 and pos.shape[0] != SEQ_LEN:
        raise UserError(
            f"{where}: pos_emb.emb.weight has {pos.shape[0]} rows, but the 16,906-gene order needs {SEQ_LEN} "
            "(gene2vec + the appended token); this checkpoint is not for scBERT's Panglao gene order"
        )
    return {
        "num_tokens": int(num_tokens),
        "dim": int(dim),
        "depth": depth,
        "heads": int(inner // dim_head),
        "dim_head": int(dim_head),
        "nb_features": int(nb_features),
        "ff_mult": int(ff // dim),
        "max_seq_len": SEQ_LEN,
    }


def checkpoint_path(ckpt_dir: Path) -> Path:
    for name in (CHECKPOINT_FILE, *ALT_CHECKPOINT_FILES):
        if (ckpt_dir / name).is_file():
            return ckpt_dir / name
    found = ", ".join(sorted(p.name for p in ckpt_dir.iterdir())) if ckpt_dir.is_dir() else "nothing"
    raise UserError(
        f"{ckpt_dir / CHECKPOINT_FILE} not found: a scBERT checkpoint directory holds {CHECKPOINT_FILE} (the "
        f"official pretrained file of TencentAILabHealthcare/scBERT); found: {found or 'nothing'}"
    )


def read_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(architecture, state dict without the ``to_out`` head) of an official checkpoint file: every
    encoder key with its shape; the ``to_out`` head skipped (named in a log line); nothing else."""
    obj = load_weights_file(
        path, "re-save it as {'model_state_dict': model.state_dict()} (plain tensors) with torch.save"
    )
    state = obj[STATE_KEY] if isinstance(obj, dict) and STATE_KEY in obj else obj
    if not isinstance(state, dict) or not state:
        raise UserError(f"{path} is not an official scBERT checkpoint: expected a dict with '{STATE_KEY}'")
    keys = [str(k) for k in state]
    if all(k.startswith("module.") for k in keys):  # saved from the DDP wrapper instead of .module
        state = {str(k)[len("module.") :]: v for k, v in state.items()}
    cfg = validate_config(config_from_state(state, str(path)))
    expected = {k: v for k, v in official_shapes(cfg).items() if not k.startswith(HEAD_PREFIX)}
    # the pretraining head (bin logits) is never run by an embedding: skipped and named when present
    kept = check_state(state, expected, str(path), "the scBERT PerformerLM architecture", skip=(r"to_out\.",))
    for k, val in kept.items():
        if k != "performer.calls_since_last_redraw" and not val.is_floating_point():
            raise UserError(f"{path}: key {k} has dtype {val.dtype}, expected floating point")
    return cfg, kept


# --------------------------------------------------------------------------------------------- modules


class ScBertFastAttention(FastAttention):
    """performer-pytorch's FastAttention (softmax kernel, non-causal), with the original scBERT's key
    stabiliser: one maximum over all heads, tokens and features of a cell."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        dtype = q.dtype
        q, k, v = q.float(), k.float(), v.float()
        proj = self.projection_matrix.float()
        b, h, n, d = k.shape
        q_feat = softmax_kernel(q, projection_matrix=proj, is_query=True)
        # one pseudo-head of h*n rows: performer-pytorch's per-(cell, head) maximum becomes per cell
        k_feat = softmax_kernel(k.reshape(b, 1, h * n, d), projection_matrix=proj, is_query=False)
        return linear_attention(q_feat, k_feat.reshape(b, h, n, -1), v).to(dtype)


class Gene2VecEmbedding(nn.Module):
    """The original's Gene2VecPositionalEmbedding: a frozen table (gene2vec rows + one zero row), row i
    added to token i. Official key ``pos_emb.emb.weight``."""

    def __init__(self, max_seq_len: int, dim: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(max_seq_len, dim)
        self.emb.weight.requires_grad_(False)  # Embedding.from_pretrained freezes it in the original

    def forward(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        return self.emb.weight[:n].to(dtype)


class PerformerStack(nn.Module):
    """performer-pytorch layers under the original's names (``net.layers.N.{0,1}``, buffer
    ``calls_since_last_redraw``); no projection redraw step."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        dim = cfg["dim"]
        layers = nn.ModuleList()
        for _ in range(cfg["depth"]):
            attn = SelfAttention(
                dim, heads=cfg["heads"], dim_head=cfg["dim_head"], nb_features=cfg["nb_features"],
                qkv_bias=False, attn_out_bias=True,
            )
            attn.fast_attention = ScBertFastAttention(cfg["dim_head"], cfg["nb_features"])
            ff = Chunk(1, FeedForward(dim, mult=cfg["ff_mult"]), along_dim=1)
            layers.append(nn.ModuleList([PreLayerNorm(dim, attn), PreLayerNorm(dim, ff)]))
        self.register_buffer("calls_since_last_redraw", torch.tensor(0))
        self.net = SequentialSequence(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ScBertEncoder(nn.Module):
    """PerformerLM up to the final LayerNorm (``return_encodings=True``): [n, 16,907, dim]."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.token_emb = nn.Embedding(cfg["num_tokens"], cfg["dim"])
        self.pos_emb = Gene2VecEmbedding(cfg["max_seq_len"], cfg["dim"])
        self.performer = PerformerStack(cfg)
        self.norm = nn.LayerNorm(cfg["dim"])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.token_emb(input_ids)
        x = x + self.pos_emb(input_ids.shape[1], x.dtype)
        return self.norm(self.performer(x))


def build_encoder(cfg: dict[str, Any]) -> ScBertEncoder:
    # constructing FastAttention draws random projections: keep the caller's RNG stream untouched
    with torch.random.fork_rng(devices=[]):
        return ScBertEncoder(cfg)


def pool_cells(encodings: torch.Tensor, pool: str) -> torch.Tensor:
    if pool == "last":
        return encodings[:, -1]
    return encodings.mean(dim=1)


# --------------------------------------------------------------------------------------------- tokenizer


def load_gene_order() -> list[str]:
    """The 16,906 Panglao gene symbols in scBERT's order (vendored, see resources/scbert/README.md)."""
    with gzip.open(GENE_ORDER_FILE, "rt") as fh:
        genes = [line.strip() for line in fh if line.strip()]
    if len(genes) != N_GENES or len(set(genes)) != N_GENES:
        raise RuntimeError(f"{GENE_ORDER_FILE} is damaged: expected {N_GENES} distinct gene symbols")
    return genes


class ScBertTokenizer(CellTokenizer):
    """Store cells -> scBERT tokens: ``input_ids`` (int32, 16,907 per cell) = the expression bin of each
    gene of the Panglao order (0 for genes the cell or the store lacks), then the appended 0 token."""

    def __init__(self, genes: pd.DataFrame, num_tokens: int = 7, log1p_base: str = "2") -> None:
        order = load_gene_order()
        index = {g: i for i, g in enumerate(order)}
        table = genes.sort_values("position")
        symbols = table["symbol"].tolist()
        positions = table["position"].to_numpy()
        self.lookup = np.full(int(positions.max()) + 1 if len(positions) else 0, -1, dtype=np.int32)
        taken: set[int] = set()
        for pos, sym in zip(positions, symbols, strict=True):
            vid = index.get(sym) if isinstance(sym, str) else None
            if vid is not None and vid not in taken:  # duplicated symbols: the first occurrence (list.index)
                self.lookup[pos] = vid
                taken.add(vid)
        self.n_store_genes = len(genes)
        self.n_matched = len(taken)
        self.coverage = self.n_matched / self.n_store_genes if self.n_store_genes else 0.0
        #: fraction of the model's 16,906 genes that the store has
        self.vocab_coverage = self.n_matched / N_GENES
        self.max_bin = num_tokens - 2  # CLASS - 2
        self.log_divisor = np.float32(np.log(LOG_BASES[log1p_base]))
        check_coverage(self.coverage, self.n_store_genes, "are in scBERT's 16,906 Panglao gene symbols", symbols,
                       "scBERT needs human gene symbols (Ensembl IDs without symbols do not match): convert the "
                       "data with human symbols")

    def tokenize_cell(self, gene_index: np.ndarray, values: np.ndarray) -> np.ndarray:
        vid = self.lookup[np.asarray(gene_index, dtype=np.int64)]
        keep = vid >= 0
        raw = np.asarray(values, dtype=np.float32)[keep]
        out = np.zeros(SEQ_LEN, dtype=np.int32)  # absent genes and the appended token stay 0
        total = np.float32(raw.sum(dtype=np.float64))  # integer counts: exact in float32 below 2**24
        if total > 0:
            # scanpy normalize_total(target_sum=1e4) then log1p(base=2), in float32 like the original
            scale = np.float32(1.0) / (total / np.float32(1e4))
            expr = np.log1p(raw * scale) / self.log_divisor
            # predict.py: values > CLASS-2 set to CLASS-2, then .long() truncates toward zero
            out[vid[keep]] = np.minimum(expr, np.float32(self.max_bin)).astype(np.int32)
        return out

    def __call__(
        self, cell_ids: np.ndarray, gene_index: list[np.ndarray], values: list[np.ndarray]
    ) -> dict[str, list[np.ndarray]]:
        return {"input_ids": [self.tokenize_cell(gi, v) for gi, v in zip(gene_index, values, strict=True)]}


# --------------------------------------------------------------------------------------------- the model


@register
class ScBertModel(FoundationModel):
    """scBERT cell embeddings (``panglao_pretrain.pth``); options: ``pool`` (mean: mean over the 16,907
    token encodings, default | last: the appended token's encoding), ``log1p_base`` (2: preprocess.py,
    default | e: natural log, for data prepared as the README's plain ``sc.pp.log1p``)."""

    name = "scbert"
    presets: ClassVar[dict[str, dict[str, Any]]] = {"tiny": _CONFIG_TINY, "panglao": _CONFIG_PANGLAO}
    lora_targets: ClassVar[list[str]] = ["to_q", "to_k", "to_v", "to_out"]
    #: position-identified genes: the expression-value embedding; baseline = "not expressed"
    attribution_adapter = AttributionAdapter(layer=lambda m: m.token_emb, lookup=tokenizer_lookup, gene_key=None,
                                            baseline=0)
    default_options: ClassVar[dict[str, Any]] = {
        "checkpoint": None,
        "preset": None,
        "pool": "mean",
        "log1p_base": "2",
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.options["pool"] not in POOLS:
            raise UserError(f"scbert option pool={self.options['pool']!r}: use mean or last")
        self.options["log1p_base"] = str(self.options["log1p_base"])
        if self.options["log1p_base"] not in LOG_BASES:
            raise UserError(f"scbert option log1p_base={self.options['log1p_base']!r}: use 2 (default) or e")

    @property
    def max_length(self) -> int:
        return SEQ_LEN

    def _config(self) -> dict[str, Any]:
        cfg, _ = read_checkpoint(checkpoint_path(self.checkpoint_dir()))
        return cfg

    def make_tokenizer(self, genes: pd.DataFrame) -> ScBertTokenizer:
        tok = ScBertTokenizer(genes, self._config()["num_tokens"], self.options["log1p_base"])
        tok.log_coverage("scbert", "the 16,906-gene Panglao order")
        return tok

    def collate(self, rows: dict[str, list[np.ndarray]], pad_to: int | None = None) -> dict[str, Any]:
        # every cell is the full dense sequence: nothing to pad, nothing to mask
        if pad_to is not None and pad_to != SEQ_LEN:
            raise ValueError(f"scBERT cells are always {SEQ_LEN} tokens; pad_to={pad_to} is not possible")
        cells = rows["input_ids"]
        bad = [len(c) for c in cells if len(c) != SEQ_LEN]
        if bad or not cells:
            raise ValueError(f"scBERT cells must be {SEQ_LEN} tokens; got lengths {bad[:3] or 'none'}")
        return {"input_ids": torch.from_numpy(np.stack(cells).astype(np.int64))}

    def load(self, device: str = "cpu", dtype: Any = None) -> ScBertEncoder:
        dtype = self.weights_dtype(device, dtype)  # option dtype: upstream precision by default
        cfg, state = read_checkpoint(checkpoint_path(self.checkpoint_dir()))
        module = build_encoder(cfg)
        module.load_state_dict(state, strict=True)  # copies (float64 gene2vec -> float32)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        module = module.to(device=device, dtype=torch.float32 if dtype is None else dtype)
        return module.eval()

    def embed(self, module: ScBertEncoder, batch: dict[str, Any]) -> torch.Tensor:
        return pool_cells(module(batch["input_ids"]), self.options["pool"]).float()

    @classmethod
    def init_random(cls, out_dir: Path, preset: str = "tiny", config: dict[str, Any] | None = None) -> Path:
        if preset not in cls.presets:
            raise UserError(f"model 'scbert' has no preset {preset!r}; presets: {', '.join(cls.presets)}")
        cfg = validate_config({**copy.deepcopy(cls.presets[preset]), **(config or {})})
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same preset always gives the same files (stable cache keys)
            module = ScBertEncoder(cfg)
            head = nn.Linear(cfg["dim"], cfg["num_tokens"])
            gene2vec = torch.randn(N_GENES, cfg["dim"]).numpy()  # stand-in for the user's gene2vec_16906.npy
        # as Gene2VecPositionalEmbedding builds it: gene2vec + one zero row, float64
        table = np.concatenate([gene2vec, np.zeros((1, cfg["dim"]))], axis=0)
        state = dict(module.state_dict())
        state["pos_emb.emb.weight"] = torch.from_numpy(table)
        state[HEAD_PREFIX + "weight"] = head.weight.detach()
        state[HEAD_PREFIX + "bias"] = head.bias.detach()
        ordered = {k: state[k].detach().clone().contiguous() for k in official_shapes(cfg)}
        with atomic_file(out_dir / CHECKPOINT_FILE) as tmp:
            torch.save({"epoch": 0, STATE_KEY: ordered, "losses": 0.0}, tmp)
        with atomic_file(out_dir / GENE2VEC_FILE) as tmp, open(tmp, "wb") as fh:
            np.save(fh, gene2vec)

        cls.mark_random(out_dir, preset)
        return out_dir
