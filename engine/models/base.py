"""The model protocol and the registry.

Two kinds of model produce the features a classifier head is trained on:

* ``EmbeddingModel``: features that do not depend on the fold (pretrained foundation models,
  precomputed ``obsm`` embeddings). The runner computes them once per (data, model), caches them,
  and every frozen unit of a benchmark reuses them.
* ``FittedFeatureModel``: features fitted on the training cells of each fold (baselines such as
  PCA or highly variable genes). Fitting on all cells would leak the test fold into the features.

Models are looked up by name in a registry; ``obsm:<key>`` names precomputed embeddings, and
third-party models plug in through the ``scdrugmap_ray.models`` entry point group.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import UserError
from ..fsutil import atomic_dir, write_json
from .contract import AttributionAdapter

if TYPE_CHECKING:
    from ..data.store import CellStore

HEADS = ("mlp", "logreg")


class Model(ABC):
    """Base of every model. Options come from the benchmark YAML (``models: [{name, ...options}]``)."""

    name: ClassVar[str]
    #: head trained on the features unless the YAML names another (``head: mlp | logreg``)
    default_head: ClassVar[str] = "mlp"
    #: True when the model's input must be raw counts (non-negative integers)
    requires_counts: ClassVar[bool] = False
    #: option names the model accepts, with defaults; anything else in the YAML is an error
    default_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.default_options))
        if unknown:
            allowed = ", ".join(sorted(self.default_options)) or "none"
            raise UserError(
                f"model {self.name!r} has no option(s) {', '.join(unknown)}; allowed options: {allowed}"
            )
        self.options: dict[str, Any] = {**self.default_options, **options}

    @property
    def random_weights(self) -> bool:
        """True when the model runs on random (not pretrained) weights; reports say so loudly."""
        return False

    def identity(self) -> dict[str, Any]:
        """What determines this model's features (name, options, checkpoint hash): used in cache keys."""
        return {"name": self.name, "options": self.options}

    def check_store(self, store: CellStore) -> None:
        """Refuse data the model cannot use, with one clear line."""
        if self.requires_counts and not store.is_counts:
            raise UserError(
                f"model {self.name!r} needs raw counts (non-negative integers) but {store.path} holds "
                f"{store.meta.get('value_type', 'non-count')} values; convert the raw-count layer instead "
                "(scdrugmap-ray convert ... --layer counts)"
            )


class EmbeddingModel(Model):
    """Fold-independent features: one embedding per cell, computed once and cached."""

    @abstractmethod
    def embed_store(self, store: CellStore) -> np.ndarray:
        """float32 [n_cells, d] in the store's row order."""


class FittedFeatureModel(Model):
    """Features fitted on the training cells of a fold (never on validation or test cells)."""

    @abstractmethod
    def fit(self, train: sp.csr_matrix, genes: pd.DataFrame, seed: int) -> None:
        """Fit the featurizer on the training cells' expression (cells x genes, store values)."""

    @abstractmethod
    def transform(self, cells: sp.csr_matrix) -> np.ndarray:
        """float32 [n, d] features of any cells, using what ``fit`` learned."""


#: values of the ``dtype`` option of foundation models
DTYPE_CHOICES = ("upstream", "engine", "float32", "bfloat16", "float16")

#: written beside the official files by init_random, so every output can say "random weights"
RANDOM_WEIGHTS_MARKER = "RANDOM_WEIGHTS.json"


def cache_root() -> Path:
    env = os.environ.get("SCDRUGMAP_RAY_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "scdrugmap-ray"


def checkpoint_digest(path: Path) -> str:
    """Content hash of a checkpoint directory (file names and bytes), for embedding cache keys."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def pad_ragged(
    cells: Sequence[np.ndarray], pad_value: float, dtype: Any, pad_to: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad per-cell arrays into [n, width] and return it with the lengths. Width is the longest
    cell (at least 1, so an empty cell still has a row), or ``pad_to`` (the naive reference loop)."""
    lengths = np.fromiter((len(c) for c in cells), dtype=np.int64, count=len(cells))
    longest = int(lengths.max(initial=0))
    width = max(1, longest if pad_to is None else int(pad_to))
    if width < longest:
        raise ValueError(f"pad_to={pad_to} is shorter than the longest cell ({longest} tokens)")
    out = np.full((len(cells), width), pad_value, dtype=dtype)
    for i, c in enumerate(cells):
        out[i, : len(c)] = c
    return out, lengths


def pad_tokens(input_ids: Sequence[np.ndarray], pad_id: int, pad_to: int | None = None) -> dict[str, Any]:
    """The batch of a model whose cells are token ids only (Geneformer, tGPT): right-padded ``input_ids``,
    ``attention_mask`` and ``lengths`` tensors. A cell with no token attends to one pad token (no
    all-masked row, no NaN); the model's embed zeroes it."""
    import torch  # heavy: batches are built where the model runs

    ids, lengths = pad_ragged(input_ids, pad_id, np.int64, pad_to)
    mask = (np.arange(ids.shape[1]) < lengths[:, None]).astype(np.int64)
    mask[lengths == 0, 0] = 1
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
            "lengths": torch.from_numpy(lengths)}


class CellTokenizer(ABC):
    """Turns cells of one store into what a model sees. Built once per (store genes, checkpoint),
    picklable (it runs in Ray Data CPU tasks), pure and deterministic: a cell's tokens never depend on
    which other cells share its batch (seed sampling per cell, e.g. from a hash of its cell_id)."""

    #: fraction of the store's genes (with any expression) that the model's vocabulary knows
    coverage: float

    def log_coverage(self, model: str, vocabulary: str) -> None:
        """One log line: how many store genes the model knows, for tokenizers that count ``n_matched``,
        ``n_store_genes`` and ``vocab_coverage`` (the fraction of the model's own genes present)."""
        logging.getLogger(__name__).info(
            "%s: %d of the store's %d genes are in %s (%.1f%%; %.1f%% of its genes)", model,
            self.n_matched, self.n_store_genes, vocabulary, 100 * self.coverage,  # type: ignore[attr-defined]
            100 * self.vocab_coverage,  # type: ignore[attr-defined]
        )

    @abstractmethod
    def __call__(
        self, cell_ids: np.ndarray, gene_index: list[np.ndarray], values: list[np.ndarray]
    ) -> dict[str, list[np.ndarray]]:
        """Per cell, ragged arrays: always ``input_ids`` (int32), plus model-specific ones
        (``values`` float32, ``bins`` int32, ...). ``gene_index``/``values`` are the store's non-zero
        genes of each cell (positions into the store's genes table) and their values."""


class FoundationModel(EmbeddingModel):
    """A pretrained single-cell model: CPU tokenization, accelerator embedding (one copy per actor).

    Options every foundation model accepts: ``checkpoint`` (a directory in the model's OFFICIAL format)
    or ``preset`` (a random-weight checkpoint written by ``init_random`` into the cache: tests, demos).
    """

    #: preset name -> config for init_random; must include "tiny" (tests) and the real sizes
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    #: the precision the original runs this model in on a GPU (on a CPU every original runs float32);
    #: what option ``dtype: upstream`` (the default) gives
    upstream_gpu_dtype: ClassVar[str] = "float32"
    #: False for models whose precision is not set this way (the llama model's engines choose their own)
    has_dtype_option: ClassVar[bool] = True
    #: module names (suffixes) where LoRA acts; only modules really called in forward
    lora_targets: ClassVar[list[str]] = []
    #: how ``explain`` attributes this model's input to genes (None: no gene attributions)
    attribution_adapter: ClassVar[AttributionAdapter | None] = None
    requires_counts = True
    default_options: ClassVar[dict[str, Any]] = {"checkpoint": None, "preset": None}

    def __init__(self, **options: Any) -> None:
        # ``dtype``, an option of every foundation model: the weights' precision. ``upstream`` (default):
        # the original's (float32 on CPU; ``upstream_gpu_dtype`` on a GPU); ``engine``: what the caller
        # passes to ``load`` (the embedding pipeline passes bfloat16 on a GPU); or a dtype name.
        if not self.has_dtype_option:
            super().__init__(**options)
            return
        dtype = options.pop("dtype", "upstream")
        super().__init__(**options)
        if dtype not in DTYPE_CHOICES:
            raise UserError(f"model {self.name!r} option dtype={dtype!r}: use one of {', '.join(DTYPE_CHOICES)}")
        self.options["dtype"] = dtype

    def weights_dtype(self, device: str, requested: Any = None) -> Any:
        """The torch dtype ``load`` casts the weights to, by option ``dtype`` (see ``__init__``)."""
        import torch

        choice = self.options.get("dtype", "upstream")
        if choice == "engine":
            if requested is None:
                return torch.float32
            return getattr(torch, requested) if isinstance(requested, str) else requested
        if choice == "upstream":
            choice = self.upstream_gpu_dtype if str(device).startswith("cuda") else "float32"
        return getattr(torch, choice)

    def checkpoint_dir(self) -> Path:
        """The checkpoint directory: the ``checkpoint`` option, or the ``preset``'s random-weight
        checkpoint, written into the cache on first use."""
        ckpt, preset = self.options.get("checkpoint"), self.options.get("preset")
        if bool(ckpt) == bool(preset):
            raise UserError(f"model {self.name!r} needs exactly one of options 'checkpoint' (a directory) or 'preset'")
        if ckpt:
            path = Path(ckpt)
            if not path.is_dir():
                raise UserError(f"model {self.name!r}: checkpoint directory {path} not found")
            return path
        if preset not in self.presets:
            raise UserError(f"model {self.name!r} has no preset {preset!r}; presets: {', '.join(self.presets)}")
        path = cache_root() / "checkpoints" / f"{self.name}-{preset}-random"
        if not path.exists():
            # Written once into the (shared) cache; presets are seeded, so a second writer racing this
            # one (another actor, another node) writes the same bytes and simply loses the rename.
            try:
                with atomic_dir(path) as tmp:
                    type(self).init_random(tmp, preset)
            except (FileExistsError, OSError):
                if not path.exists():
                    raise
        return path

    @property
    def random_weights(self) -> bool:
        return (self.checkpoint_dir() / RANDOM_WEIGHTS_MARKER).exists()

    def identity(self) -> dict[str, Any]:
        ident = super().identity()
        ident["checkpoint_sha256"] = checkpoint_digest(self.checkpoint_dir())
        return ident

    @abstractmethod
    def make_tokenizer(self, genes: pd.DataFrame) -> CellTokenizer:
        """A tokenizer for cells of a store with this genes table (position, symbol, ensembl_id)."""

    @property
    @abstractmethod
    def max_length(self) -> int:
        """The most tokens a cell can have (from the checkpoint's config)."""

    @abstractmethod
    def collate(self, rows: dict[str, list[np.ndarray]], pad_to: int | None = None) -> dict[str, Any]:
        """Pad a batch of tokenized cells into tensors: to its longest cell by default (not the model
        maximum), or to ``pad_to`` (the naive reference loop of ``bench embed`` pads to max_length)."""

    @abstractmethod
    def load(self, device: str = "cpu", dtype: Any = None) -> Any:
        """The torch module from the official checkpoint, in ``weights_dtype(device, dtype)``; every
        tensor of the embedding path loaded strictly (a missing one is a UserError naming the key,
        shapes checked), tensors the embedding never runs skipped and named in one log line
        (``checkpoint.check_state``)."""

    @abstractmethod
    def embed(self, module: Any, batch: dict[str, Any]) -> Any:
        """float32 tensor [n, d]: the cell embedding exactly as the original defines it."""

    @classmethod
    @abstractmethod
    def init_random(cls, out_dir: Path, preset: str = "tiny", config: dict[str, Any] | None = None) -> Path:
        """Write a random-weight checkpoint in the official on-disk format; return the directory."""

    @classmethod
    def mark_random(cls, out_dir: Path, preset: str, note: str = "random weights, not pretrained",
                    **extra: Any) -> None:
        """The marker init_random leaves beside the official files, so every output says "random weights"."""
        write_json(out_dir / RANDOM_WEIGHTS_MARKER, {"model": cls.name, "preset": preset, "note": note, **extra})

    def embed_store(self, store: CellStore) -> np.ndarray:
        """Foundation models embed through the Ray Data pipeline, a layer above the models: call
        ``engine.train.frozen.store_embedding`` (any embedding model) or ``engine.pipeline.embed.embed_store``."""
        raise TypeError(f"{self.name}: a foundation model embeds a store through engine.pipeline.embed.embed_store "
                        "(or engine.train.frozen.store_embedding for any embedding model)")


_REGISTRY: dict[str, type[Model]] = {}
_PARAMETRIC: dict[str, Callable[[str, dict[str, Any]], Model]] = {}
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def register(cls: type[Model]) -> type[Model]:
    """Class decorator: make a model available by its ``name``."""
    if not _NAME_RE.match(cls.name):
        raise ValueError(f"invalid model name {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def register_prefix(prefix: str, factory: Callable[[str, dict[str, Any]], Model]) -> None:
    """Names of the form ``prefix:ARG`` (e.g. ``obsm:X_scFoundation``) are built by ``factory``."""
    _PARAMETRIC[prefix] = factory


# Built-in models, by the module that defines them: imported only when asked for, so a task that runs
# a baseline never pays for importing transformers.
_BUILTIN: dict[str, str] = {
    "pca-logreg": "baselines",
    "hvg-mlp": "baselines",
    "obsm": "baselines",
    "geneformer": "geneformer",
    "tgpt": "tgpt",
    "scgpt": "scgpt",
    "scfoundation": "scfoundation",
    "uce": "uce",
    "scbert": "scbert",
    "cellplm": "cellplm",
    "celllm": "celllm",
    "llama": "llama",
    "openai-chat": "openai_chat",
}


def _ensure_registered(name: str) -> None:
    import importlib

    key = name.partition(":")[0] if ":" in name else name
    if key in _REGISTRY or key in _PARAMETRIC:
        return
    if key in _BUILTIN:
        importlib.import_module(f"{__package__}.{_BUILTIN[key]}")
        return
    for ep in entry_points(group="scdrugmap_ray.models"):
        if ep.name == key:
            ep.load()


def _installed_builtin(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(f"{__package__}.{module}") is not None


def available_models() -> list[str]:
    plain = {n for n, mod in _BUILTIN.items() if n != "obsm" and _installed_builtin(mod)}
    plain |= {n for n in _REGISTRY}
    plain |= {ep.name for ep in entry_points(group="scdrugmap_ray.models")}
    return [*sorted(plain), "obsm:<key>"]


def model_class(name: str) -> type[Model]:
    """The registered class of a plain model name; unknown names are a UserError."""
    _ensure_registered(name)
    if name not in _REGISTRY:
        get_model(name)  # raises the UserError with suggestions
    return _REGISTRY[name]


def get_model(name: str, options: dict[str, Any] | None = None) -> Model:
    """Build a model from its registry name and YAML options; unknown names are a UserError."""
    _ensure_registered(name)
    options = dict(options or {})
    prefix, sep, arg = name.partition(":")
    if sep:
        if prefix not in _PARAMETRIC or not arg:
            raise UserError(f"unknown model {name!r}; available: {', '.join(available_models())}")
        return _PARAMETRIC[prefix](arg, options)
    if name not in _REGISTRY:
        import difflib

        hint = difflib.get_close_matches(name, available_models(), n=1)
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise UserError(
            f"unknown model {name!r}{did_you_mean}; available: {', '.join(available_models())}"
        )
    return _REGISTRY[name](**options)
