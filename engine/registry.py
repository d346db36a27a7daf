"""The trained-model registry and prediction with its models (atlas-scale and per request).

A registry is a directory: ``<registry>/<name>/<version>/`` (versions 1, 2, ...), each holding

* ``model.json``: kind (``frozen`` or ``lora``), the model name and options, head, metrics of the fold
  it came from and the unit's cross-validated metrics, the training data summary, where it came from;
* ``genes.parquet``: the training store's genes (the model's gene vocabulary for validation);
* ``frozen``: ``head.safetensors`` + ``head.json`` and, for baselines, ``featurizer.safetensors`` +
  ``featurizer.json`` (PCA axes, chosen genes, ...);
* ``lora``: ``lora/`` (the PEFT adapter, ``head.safetensors``, ``head.json``, its config);
* ``backbone/``: the foundation model's checkpoint when it was copied (always for random-weight
  presets, on request for a user checkpoint; otherwise ``model.json`` names its path and digest).

Safe formats only: safetensors, JSON, Parquet. Names and versions are validated before they become
paths. ``LoadedModel`` predicts cells given as a sparse matrix plus gene names (the server) and
``predict_store`` streams a whole cell store through Ray Data (bounded memory, scales out).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import UserError
from .fsutil import atomic_dir, atomic_file, write_json

log = logging.getLogger(__name__)

REGISTRY_ENV = "SCDRUGMAP_RAY_REGISTRY"
MODEL_JSON = "model.json"
GENES = "genes.parquet"
LORA_DIR = "lora"
BACKBONE_DIR = "backbone"
FORMAT_VERSION = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
THRESHOLD = 0.5  # p_sensitive >= 0.5 -> "sensitive"


def default_registry() -> Path:
    """``$SCDRUGMAP_RAY_REGISTRY``, else the user's data directory (``~/.local/share/scdrugmap-ray/models``)."""
    env = os.environ.get(REGISTRY_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "scdrugmap-ray" / "models"


def check_name(name: str) -> str:
    """A model name safe to use as one path component (letters, digits, . _ -; no slashes, no '..')."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise UserError(f"invalid model name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a "
                        "letter or digit")
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``NAME`` or ``NAME@VERSION`` (``@latest`` = newest) -> (name, version or None)."""
    name, sep, ver = str(ref).partition("@")
    check_name(name)
    if not sep or ver in ("", "latest"):
        return name, None
    if not ver.isdigit() or len(ver) > 9:
        raise UserError(f"invalid model version {ver!r} in {ref!r}: a positive whole number or 'latest'")
    return name, int(ver)


def label_of(p: np.ndarray) -> np.ndarray:
    return np.where(np.asarray(p) >= THRESHOLD, "sensitive", "resistant").astype(object)


class Registry:
    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root else default_registry()

    def versions(self, name: str) -> list[int]:
        d = self.root / check_name(name)
        if not d.is_dir():
            return []
        return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / MODEL_JSON).is_file())

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if _NAME_RE.match(p.name) and self.versions(p.name))

    def list(self) -> list[dict[str, Any]]:
        """model.json of every version of every model, newest version last."""
        out = []
        for name in self.names():
            for v in self.versions(name):
                out.append(json.loads((self.root / name / str(v) / MODEL_JSON).read_text()))
        return out

    def resolve(self, ref: str) -> Path:
        """The version directory of ``NAME[@VERSION]``; unknown models are a UserError listing the known."""
        name, version = parse_ref(ref)
        versions = self.versions(name)
        if not versions:
            known = ", ".join(self.names()) or "none"
            raise UserError(f"no model {name!r} in the registry {self.root}; registered models: {known}")
        if version is None:
            version = versions[-1]
        elif version not in versions:
            raise UserError(f"model {name!r} has no version {version}; versions: {', '.join(map(str, versions))}")
        return self.root / name / str(version)

    def info(self, ref: str) -> dict[str, Any]:
        return json.loads((self.resolve(ref) / MODEL_JSON).read_text())

    def add(self, name: str, source: Path, kind: str, info: dict[str, Any], copy_checkpoint: bool = False) -> Path:
        """A new version of ``name`` from a fold's saved model directory (``<fold>.model`` of a frozen unit,
        ``<fold>.lora/model`` of a lora unit). Written atomically; returns the version directory."""
        check_name(name)
        source = Path(source)
        if not source.is_dir():
            raise UserError(f"{source} not found: the unit's fold has no saved model (was it run with this version "
                            "of scdrugmap-ray? frozen units save their heads since the model registry exists)")
        version = (self.versions(name) or [0])[-1] + 1
        final = self.root / name / str(version)
        options = dict(info.get("model_options") or {})
        backbone: dict[str, Any] = {"copied": False}
        with atomic_dir(final) as tmp:
            if kind == "frozen":
                for f in source.iterdir():
                    if f.is_file():
                        shutil.copy2(f, tmp / ("fold_config.json" if f.name == "config.json" else f.name))
            elif kind == "lora":
                shutil.copytree(source, tmp / LORA_DIR)
                shutil.copy2(source / GENES, tmp / GENES)
            else:
                raise UserError(f"cannot register a unit of strategy {kind!r}; only frozen and lora units")
            if options.get("checkpoint") or options.get("preset"):
                from .models.base import get_model

                fm = get_model(info["model"], options)
                ckpt = fm.checkpoint_dir()  # type: ignore[attr-defined]
                backbone = {"copied": False, "path": str(Path(ckpt).resolve()),
                            "random_weights": bool(fm.random_weights)}
                if options.get("preset") or copy_checkpoint:
                    # a random-weight preset is only reproducible bit for bit from its own files
                    shutil.copytree(ckpt, tmp / BACKBONE_DIR)
                    backbone["copied"] = True
            meta = {
                **info,
                "name": name,
                "version": version,
                "kind": kind,
                "format_version": FORMAT_VERSION,
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "backbone": backbone,
            }
            write_json(tmp / MODEL_JSON, meta)
        return final


# ---------------------------------------------------------------------------------------- loading


def _genes_frame(symbols: Sequence[str]) -> pd.DataFrame:
    """A store-like genes table (position, symbol, ensembl_id) for gene names given by a request."""
    from .data.gene_ids import ensembl_to_symbols, looks_like_ensembl, symbols_to_ensembl

    names = [str(s) for s in symbols]
    if looks_like_ensembl(names):
        ens = [n.split(".")[0] for n in names]
        sym = [s or e for s, e in zip(ensembl_to_symbols(ens), ens, strict=True)]
    else:
        sym, ens = names, symbols_to_ensembl(names)
    return pd.DataFrame({"position": np.arange(len(names), dtype=np.int32), "symbol": sym,
                         "ensembl_id": pd.array(ens, dtype="string")})


@dataclass
class Prepared:
    """One request's cells made ready for the model (CPU work): remapped expression or tokens."""

    cell_ids: np.ndarray
    csr: sp.csr_matrix | None = None  # baselines: cells x model genes
    tokens: dict[str, Any] | None = None  # foundation models: ragged token fields + n_tokens


class LoadedModel:
    """A registry model in memory: featurizer or foundation model (with LoRA merged), and its head."""

    def __init__(self, version_dir: str | Path, device: str = "cpu", dtype: Any = None,
                 batch_tokens: int = 16_384) -> None:
        from .models.base import EmbeddingModel, FittedFeatureModel, FoundationModel, get_model

        self.dir = Path(version_dir)
        try:
            self.info: dict[str, Any] = json.loads((self.dir / MODEL_JSON).read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"{self.dir} is not a registry model ({exc})") from None
        self.kind = self.info["kind"]
        self.device, self.batch_tokens = device, batch_tokens
        self.train_genes = pd.read_parquet(self.dir / GENES)
        options = dict(self.info.get("model_options") or {})
        if self.info.get("backbone", {}).get("copied"):
            options.update(checkpoint=str(self.dir / BACKBONE_DIR), preset=None)
        self.model = get_model(self.info["model"], options)
        self.module: Any = None
        self.torch_head: Any = None
        self.head: Any = None
        self._tokenizers: dict[int, Any] = {}
        if self.kind == "frozen":
            from .train.frozen import load_fold_featurizer, load_fold_head

            self.head = load_fold_head(self.dir)
            load_fold_featurizer(self.dir, self.model)
            if isinstance(self.model, FoundationModel):
                self.module = self.model.load(device=device, dtype=dtype)
        elif self.kind == "lora":
            self.module, self.torch_head = _load_lora(self.model, self.dir / LORA_DIR, device, dtype)  # type: ignore[arg-type]
        else:
            raise UserError(f"{self.dir}: unknown model kind {self.kind!r}")
        self.is_foundation = isinstance(self.model, FoundationModel)
        self.is_fitted = isinstance(self.model, FittedFeatureModel)
        self.is_obsm = isinstance(self.model, EmbeddingModel) and not self.is_foundation

    @property
    def vocabulary(self) -> list[str]:
        """Gene symbols the model was trained with."""
        if self.is_fitted:
            return list(self.model.gene_symbols)  # type: ignore[attr-defined]
        return self.train_genes["symbol"].astype(str).tolist()

    # ------------------------------------------------------------------------------ per request

    def prepare(self, cell_ids: Sequence[str], csr: sp.csr_matrix, genes: pd.DataFrame) -> Prepared:
        """Map cells (rows of ``csr`` over ``genes``: position, symbol[, ensembl_id]) to what the model reads."""
        ids = np.asarray([str(c) for c in cell_ids], dtype=object)
        csr = sp.csr_matrix(csr, dtype=np.float32)
        if self.is_obsm:
            raise UserError(f"model {self.info['name']!r} was trained on precomputed obsm embeddings; it cannot "
                            "predict from expression (use `scdrugmap-ray predict` on data holding that obsm key)")
        if self.is_fitted:
            return Prepared(ids, csr=remap_columns(csr, genes["symbol"].astype(str).tolist(), self.vocabulary))
        if self.model.requires_counts and csr.nnz and not (
            np.all(csr.data >= 0) and np.all(csr.data == np.rint(csr.data))
        ):
            raise UserError(f"model {self.model.name!r} needs raw counts (non-negative whole numbers)")
        tok = self._tokenizer(genes)
        gi = [csr.indices[csr.indptr[i]:csr.indptr[i + 1]].astype(np.int32) for i in range(csr.shape[0])]
        vals = [csr.data[csr.indptr[i]:csr.indptr[i + 1]].astype(np.float32) for i in range(csr.shape[0])]
        rows = tok(ids, gi, vals)
        rows = {k: list(v) for k, v in rows.items()}
        rows["n_tokens"] = np.array([len(x) for x in rows["input_ids"]], dtype=np.int64)
        return Prepared(ids, tokens=rows)

    def _tokenizer(self, genes: pd.DataFrame) -> Any:
        key = hash(tuple(genes["symbol"].astype(str)))
        tok = self._tokenizers.get(key)
        if tok is None:
            tok = self.model.make_tokenizer(genes)  # type: ignore[attr-defined]
            if len(self._tokenizers) > 16:
                self._tokenizers.clear()
            self._tokenizers[key] = tok
        return tok

    def run(self, batch: Sequence[Prepared]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(p_sensitive, features) per prepared request, computed together (one batch of cells)."""
        sizes = [len(b.cell_ids) for b in batch]
        if self.is_fitted:
            feats = self.model.transform(sp.vstack([b.csr for b in batch], format="csr"))  # type: ignore[attr-defined]
        else:
            fields = list(batch[0].tokens or {})
            block: dict[str, Any] = {k: [x for b in batch for x in (b.tokens or {})[k]] for k in fields}
            block["n_tokens"] = np.concatenate([(b.tokens or {})["n_tokens"] for b in batch])
            block["cell_id"] = np.concatenate([b.cell_ids for b in batch])
            feats = self.embed_tokens(block)
        p = self.head_proba(feats)
        out, start = [], 0
        for n in sizes:
            out.append((p[start:start + n], feats[start:start + n]))
            start += n
        return out

    def embed_tokens(self, block: dict[str, Any]) -> np.ndarray:
        from .pipeline.embed import embed_block

        if len(block["n_tokens"]) == 0:
            return np.zeros((0, 0), dtype=np.float32)
        return embed_block(self.model, self.module, block, self.batch_tokens, self.device)["embedding"]  # type: ignore[arg-type]

    def head_proba(self, feats: np.ndarray) -> np.ndarray:
        if len(feats) == 0:
            return np.zeros(0, dtype=np.float32)
        if self.torch_head is not None:
            import torch

            with torch.no_grad():
                logits = self.torch_head(torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32)))
                return torch.softmax(logits, dim=1)[:, 1].numpy().astype(np.float32)
        return np.asarray(self.head.predict_proba(feats), dtype=np.float32)

    def predict(
        self, cell_ids: Sequence[str], csr: sp.csr_matrix, genes: pd.DataFrame
    ) -> tuple[np.ndarray, np.ndarray]:
        return self.run([self.prepare(cell_ids, csr, genes)])[0]


def _load_lora(fm: Any, lora_dir: Path, device: str, dtype: Any) -> tuple[Any, Any]:
    """The backbone with the adapter merged in, and the torch head (as engine.train.lora.load_finetuned,
    but with the backbone options the registry resolved: a copied checkpoint lives beside the model)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from .train.lora import ADAPTER_DIR, CONFIG, HEAD_WEIGHTS, build_head

    cfg = json.loads((lora_dir / CONFIG).read_text())
    head = build_head(int(cfg["head"]["dim"]), int(cfg["head"]["hidden"]))
    head.load_state_dict(load_file(str(lora_dir / HEAD_WEIGHTS)), strict=True)
    backbone = fm.load(device=device, dtype=dtype)
    merged = PeftModel.from_pretrained(backbone, str(lora_dir / ADAPTER_DIR)).merge_and_unload()
    return merged.eval(), head.eval()


def column_map(from_symbols: Sequence[str], to_symbols: Sequence[str]) -> np.ndarray:
    """int64 [len(from_symbols)]: each source column's position among ``to_symbols`` (-1: not there). A
    symbol that occurs twice in the target keeps its first column."""
    target = pd.Index([str(s) for s in to_symbols])
    first = ~target.duplicated()
    return pd.Index(target[first]).get_indexer([str(s) for s in from_symbols]).astype(np.int64) if len(target) else (
        np.full(len(from_symbols), -1, dtype=np.int64))


def remap_columns(csr: sp.csr_matrix, from_symbols: Sequence[str], to_symbols: Sequence[str]) -> sp.csr_matrix:
    """Cells over ``from_symbols`` columns -> cells over ``to_symbols`` columns (missing genes are zero)."""
    return remap_with(csr, column_map(from_symbols, to_symbols), len(to_symbols))


def remap_with(csr: sp.csr_matrix, col_map: np.ndarray, n_to: int) -> sp.csr_matrix:
    """``remap_columns`` with the column map computed once (``column_map``)."""
    csr = sp.csr_matrix(csr)
    new_idx = col_map[csr.indices]
    keep = new_idx >= 0
    counts = np.add.reduceat(keep.astype(np.int64), csr.indptr[:-1]) if csr.nnz else np.zeros(csr.shape[0], np.int64)
    counts[np.diff(csr.indptr) == 0] = 0  # reduceat repeats the next value for empty rows
    indptr = np.concatenate([[0], np.cumsum(counts)])
    out = sp.csr_matrix((csr.data[keep], new_idx[keep], indptr), shape=(csr.shape[0], n_to))
    out.sum_duplicates()
    return out


def gene_overlap(request_symbols: Sequence[str], vocabulary: Sequence[str]) -> tuple[int, list[str]]:
    """(number of request genes the model knows, the unknown ones)."""
    vocab = set(map(str, vocabulary))
    unknown = [str(s) for s in request_symbols if str(s) not in vocab]
    return len(request_symbols) - len(unknown), unknown


def summarize(p: np.ndarray, bins: int = 10) -> dict[str, Any]:
    p = np.asarray(p, dtype=np.float64)
    counts, edges = np.histogram(p, bins=bins, range=(0.0, 1.0))
    n_sens = int((p >= THRESHOLD).sum())
    return {
        "n_cells": len(p),
        "n_sensitive": n_sens,
        "n_resistant": len(p) - n_sens,
        "fraction_sensitive": round(n_sens / len(p), 6) if len(p) else 0.0,
        "mean_p_sensitive": round(float(p.mean()), 6) if len(p) else None,
        "threshold": THRESHOLD,
        "histogram": {"edges": [round(float(e), 4) for e in edges], "counts": counts.astype(int).tolist()},
    }


# -------------------------------------------------------------------------------- atlas-scale predict


class _PredictActor:
    """Ray Data actor: one model copy; cells in (store rows or tokens) -> cell_id, p_sensitive[, features]."""

    def __init__(self, version_dir: str, store_symbols: list[str], device: str, dtype: str | None,
                 batch_tokens: int, want_features: bool, cpu_threads: int | None) -> None:
        import torch

        if device == "cpu" and cpu_threads:
            torch.set_num_threads(cpu_threads)
        self.error: UserError | None = None
        self.want = want_features
        self.n_store_genes = len(store_symbols)
        try:
            from .runtime import check_actor_device

            check_actor_device(device)
            self.model = LoadedModel(version_dir, device, getattr(torch, dtype) if dtype else None, batch_tokens)
            self.col_map = column_map(store_symbols, self.model.vocabulary)  # once, not per batch
        except UserError as err:
            self.error = err

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        if self.error is not None:
            raise self.error
        m = self.model
        if "n_tokens" in batch:  # tokenized upstream by CPU tasks
            feats = m.embed_tokens(batch)
        else:
            gi, val = list(batch["gene_index"]), list(batch["value"])
            lengths = np.fromiter((len(g) for g in gi), dtype=np.int64, count=len(gi))
            indptr = np.concatenate([[0], np.cumsum(lengths)])
            csr = sp.csr_matrix(
                (np.concatenate(val).astype(np.float32) if val else np.zeros(0, np.float32),
                 np.concatenate(gi).astype(np.int64) if gi else np.zeros(0, np.int64), indptr),
                shape=(len(gi), self.n_store_genes),
            )
            feats = m.model.transform(remap_with(csr, self.col_map, len(m.vocabulary)))  # type: ignore[attr-defined]
        out: dict[str, Any] = {"cell_id": batch["cell_id"], "p_sensitive": m.head_proba(feats)}
        if self.want:
            out["features"] = feats.astype(np.float32)
        return out


@dataclass
class PredictStats:
    n_cells: int
    seconds: float
    n_sensitive: int
    feature_dim: int = 0

    @property
    def cells_per_s(self) -> float:
        return self.n_cells / self.seconds if self.seconds else 0.0


def iter_predictions(version_dir: Path, store: Any, *, want_features: bool = False, num_actors: int | None = None,
                     device: str | None = None, batch_tokens: int = 16_384, block_cells: int = 4096,
                     actor_resources: dict[str, float] | None = None,
                     ) -> Iterator[dict[str, np.ndarray]]:
    """Batches of {cell_id, p_sensitive[, features]} for every cell of a store, streamed by Ray Data. Actors
    are planned from the cluster's resources (GPUs found on workers, not on the driver)."""
    import ray

    from .pipeline.embed import tokenize_rows
    from .runtime import actor_plan, init_ray, quiet_ray_data, user_errors

    init_ray()
    quiet_ray_data()
    # a bad model or bad data fails here, in one line, before any task starts
    probe = LoadedModel(version_dir)
    if probe.is_obsm:
        raise UserError("models on precomputed obsm embeddings are not supported by predict yet")
    probe.model.check_store(store)
    store_symbols = store.genes["symbol"].astype(str).tolist()
    known, _ = gene_overlap(store_symbols, probe.vocabulary)
    if known == 0:
        raise UserError(f"none of the {len(store_symbols)} genes of {store.path} is in the model's vocabulary "
                        f"({len(probe.vocabulary)} genes, e.g. {', '.join(probe.vocabulary[:3])})")
    log.info("%d of the data's %d genes are in the model's gene list", known, len(store_symbols))
    if probe.is_foundation:
        plan = actor_plan(device, num_actors, actor_resources)
    else:  # a baseline: small CPU actors, as many as the cluster's CPUs allow, one thread each
        cpus = int(ray.cluster_resources().get("CPU", 1))
        plan = actor_plan(device or "cpu", num_actors or max(1, cpus - 1), actor_resources, foundation=False)
        plan = dataclasses.replace(plan, cpu_threads=1)
    dtype = "bfloat16" if plan.device == "cuda" else None
    ds = ray.data.read_parquet([str(p) for p in store.shard_paths], columns=["cell_id", "gene_index", "value"])
    if probe.is_foundation:
        ds = ds.map_batches(tokenize_rows, fn_args=(probe.model.make_tokenizer(store.genes),),  # type: ignore[attr-defined]
                            batch_size=1024, batch_format="numpy")
    del probe
    ds = ds.map_batches(
        _PredictActor,
        fn_constructor_args=(str(version_dir), store_symbols, plan.device, dtype, batch_tokens, want_features,
                             plan.cpu_threads),
        batch_size=block_cells if not want_features else min(block_cells, 1024), batch_format="numpy",
        **plan.map_kwargs(),
    )
    with user_errors():
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")


def predict_store(version_dir: Path, store: Any, out: Path, *, embeddings: bool = False,
                  source_h5ad: Path | None = None, num_actors: int | None = None, device: str | None = None,
                  actor_resources: dict[str, float] | None = None, block_cells: int = 4096) -> PredictStats:
    """Predict every cell of ``store`` and write ``out``: Parquet (cell_id, p_sensitive, label[, embedding]) or
    .h5ad (a copy of ``source_h5ad`` with ``obs`` columns ``scdrugmap_p_sensitive`` / ``scdrugmap_label`` and,
    with ``embeddings``, ``obsm['X_scdrugmap']``). Memory is bounded by Ray Data blocks, except for one float
    per cell (and the cell-id index) when writing an .h5ad."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".parquet", ".h5ad"):
        raise UserError(f"--out {out}: the output must end in .parquet or .h5ad")
    if suffix == ".h5ad" and (source_h5ad is None or not Path(source_h5ad).is_file()):
        raise UserError(f"--out {out}: an .h5ad output is the input .h5ad with predictions added, but the source "
                        ".h5ad of this cell store is not available; write .parquet instead")
    t0 = time.perf_counter()
    batches = iter_predictions(Path(version_dir), store, want_features=embeddings, num_actors=num_actors,
                               device=device, actor_resources=actor_resources, block_cells=block_cells)
    if suffix == ".parquet":
        stats = _write_parquet(batches, out, embeddings)
    else:
        assert source_h5ad is not None
        stats = _write_h5ad(batches, Path(source_h5ad), out, embeddings)
    stats.seconds = time.perf_counter() - t0
    return stats


def _write_parquet(batches: Iterator[dict[str, np.ndarray]], out: Path, embeddings: bool) -> PredictStats:
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = n_sens = dim = 0
    with atomic_file(out) as tmp:
        writer = None
        try:
            for b in batches:
                p = np.asarray(b["p_sensitive"], dtype=np.float32)
                cols: dict[str, Any] = {
                    "cell_id": pa.array(b["cell_id"].astype(str), type=pa.string()),
                    "p_sensitive": pa.array(p),
                    "label": pa.array(label_of(p).tolist(), type=pa.string()),
                }
                if embeddings:
                    f = np.ascontiguousarray(np.stack(b["features"]) if b["features"].dtype == object
                                             else b["features"], dtype=np.float32)
                    dim = f.shape[1]
                    cols["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(f.reshape(-1)), dim)
                table = pa.table(cols)
                if writer is None:
                    writer = pq.ParquetWriter(str(tmp), table.schema)
                writer.write_table(table)
                n += len(p)
                n_sens += int((p >= THRESHOLD).sum())
            if writer is None:
                raise UserError("the data holds no cells to predict")
        finally:
            if writer is not None:
                writer.close()
    return PredictStats(n, 0.0, n_sens, dim)


def _write_h5ad(batches: Iterator[dict[str, np.ndarray]], src: Path, out: Path, embeddings: bool) -> PredictStats:
    import anndata as ad
    import h5py

    n = n_sens = dim = 0
    with atomic_file(out) as tmp:
        shutil.copyfile(src, tmp)
        with h5py.File(tmp, "r+") as f:
            obs = ad.io.read_elem(f["obs"])
            row_of = pd.Series(np.arange(len(obs)), index=obs.index.astype(str))
            p_all = np.full(len(obs), np.nan, dtype=np.float32)
            emb_ds = None
            for b in batches:
                rows = row_of.reindex(b["cell_id"].astype(str)).to_numpy()
                p = np.asarray(b["p_sensitive"], dtype=np.float32)
                p_all[rows] = p
                n += len(p)
                n_sens += int((p >= THRESHOLD).sum())
                if embeddings:
                    feats = np.stack(b["features"]) if b["features"].dtype == object else b["features"]
                    if emb_ds is None:
                        dim = feats.shape[1]
                        grp = f.require_group("obsm")
                        if "encoding-type" not in grp.attrs:
                            grp.attrs["encoding-type"], grp.attrs["encoding-version"] = "dict", "0.1.0"
                        if "X_scdrugmap" in grp:
                            del grp["X_scdrugmap"]
                        emb_ds = grp.create_dataset("X_scdrugmap", shape=(len(obs), dim), dtype="float32",
                                                    fillvalue=np.nan, chunks=(min(len(obs), 4096), dim))
                        emb_ds.attrs["encoding-type"], emb_ds.attrs["encoding-version"] = "array", "0.2.0"
                    order = np.argsort(rows)
                    emb_ds[rows[order]] = feats[order].astype(np.float32)  # h5py wants increasing indices
            obs["scdrugmap_p_sensitive"] = p_all
            labels = np.where(np.isnan(p_all), None, label_of(np.nan_to_num(p_all, nan=0.0)))
            obs["scdrugmap_label"] = pd.Categorical(labels, categories=["resistant", "sensitive"])
            del f["obs"]
            ad.io.write_elem(f, "obs", obs)
    return PredictStats(n, 0.0, n_sens, dim)
