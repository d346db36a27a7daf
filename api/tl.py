"""Tools on AnnData, in the scanpy style (``sdr.tl.embed``, ``sdr.tl.predict``): they take an in-memory
AnnData, a backed one or an .h5ad path, write their results into ``obsm`` / ``obs`` / ``uns`` and return
None (or the AnnData, with ``copy=True`` or a path).

Where the work runs (``backend="auto"``): an in-memory AnnData of at most ``IN_MEMORY_MAX_CELLS`` cells runs
in this process, without starting Ray (the model's tokenizer and embedding block, the same functions the
Ray Data actors call); a backed AnnData, a path, or more cells go through the Ray Data engine (converted
once into the cell-store cache, streamed through model actors). ``backend="local"`` or ``"ray"`` forces one.

Cells without any non-zero value are not embedded (a cell store drops them): their rows are NaN.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scdrugmap_ray.engine.defaults import batch_tokens_for
from scdrugmap_ray.engine.errors import UserError

if TYPE_CHECKING:
    import anndata as ad

log = logging.getLogger(__name__)

#: in-memory AnnData up to this many cells run in-process (no Ray); more (or backed / path) use Ray Data
IN_MEMORY_MAX_CELLS = 20_000
#: the default ``key_added`` of predict: obs columns ``scdrugmap_p_sensitive`` / ``scdrugmap_label``
DEFAULT_PREDICT_KEY = "scdrugmap"

Backend = Literal["auto", "local", "ray"]


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("scdrugmap-ray")
    except PackageNotFoundError:
        return "0+unknown"


# ------------------------------------------------------------------------------------------ inputs


def open_data(data: Any) -> tuple[ad.AnnData, bool]:
    """(the AnnData, whether it was opened here from a path: backed, read-only)."""
    import anndata as ad

    if isinstance(data, ad.AnnData):
        return data, False
    if isinstance(data, str | Path):
        path = Path(data)
        if not path.is_file():
            raise UserError(f"{path} not found (expected an .h5ad file or an AnnData)")
        if path.suffix != ".h5ad":
            raise UserError(f"{path}: expected an .h5ad file (or an AnnData)")
        try:
            return ad.read_h5ad(path, backed="r"), True
        except Exception as err:  # anndata/h5py raise many types for a corrupt file
            raise UserError(f"{path}: not a readable .h5ad ({type(err).__name__}: {err})") from None
    raise UserError(f"expected an AnnData or an .h5ad path, got {type(data).__name__}")


def choose_backend(adata: ad.AnnData, backend: Backend) -> Literal["local", "ray"]:
    if backend not in ("auto", "local", "ray"):
        raise UserError(f"backend={backend!r}: expected 'auto', 'local' or 'ray'")
    if backend == "local":
        if adata.isbacked:
            raise UserError("backend='local' needs an in-memory AnnData; this one is backed (use 'ray' or 'auto')")
        return "local"
    if backend == "ray" or adata.isbacked or adata.n_obs > IN_MEMORY_MAX_CELLS:
        return "ray"
    return "local"


@dataclass
class Cells:
    """An in-memory AnnData's non-empty cells as a cell store holds them: CSR (float32, sorted indices,
    explicit zeros dropped) over the genes table convert would write."""

    rows: np.ndarray  # positions in adata of the cells kept (at least one non-zero value)
    cell_ids: np.ndarray  # their obs names (str objects)
    csr: sp.csr_matrix
    genes: pd.DataFrame
    is_counts: bool


def in_memory_cells(adata: ad.AnnData, layer: str | None, gene_key: str | None) -> Cells:
    from scdrugmap_ray.engine.data.convert import genes_of_var

    if layer is None:
        x = adata.X
        if x is None:
            raise UserError("the AnnData has no X; name a layer with layer=...")
    else:
        if layer not in adata.layers:
            raise UserError(f"no layer {layer!r}; layers: {', '.join(adata.layers) or 'none'}")
        x = adata.layers[layer]
    names = adata.obs_names.astype(str)
    if names.has_duplicates:
        dup = names[names.duplicated()].unique()
        raise UserError(f"{len(dup)} duplicated cell name(s), e.g. {', '.join(dup[:5])}; make them unique "
                        "(adata.obs_names_make_unique())")
    genes, _kind, _warnings = genes_of_var(adata.var, gene_key, "AnnData")
    csr = sp.csr_matrix(x, dtype=np.float32, copy=True)
    csr.eliminate_zeros()
    csr.sort_indices()
    if not np.isfinite(csr.data).all():
        raise UserError("NaN or infinite values in the expression matrix; fix or remove them first")
    is_counts = not csr.nnz or bool(np.all(csr.data >= 0) and np.all(csr.data == np.round(csr.data)))
    rows = np.flatnonzero(np.diff(csr.indptr) > 0)
    if not len(rows):
        raise UserError("no cell has any non-zero value; nothing to do")
    return Cells(rows, np.asarray(names[rows], dtype=object), csr[rows], genes, is_counts)


def ray_store(adata: ad.AnnData, opened_path: Path | None, layer: str | None, gene_key: str | None) -> Any:
    """The cell store of a backed AnnData's file (or of an in-memory AnnData, written to a temporary .h5ad),
    converted once into the cache (the same cache ``predict`` and ``run`` use)."""
    from scdrugmap_ray.engine.data.convert import ConvertOptions, ensure_store
    from scdrugmap_ray.engine.models.base import cache_root

    opts = ConvertOptions(layer=layer, gene_key=gene_key)
    src = opened_path or (Path(adata.filename) if adata.isbacked and adata.filename else None)
    if src is not None:
        return ensure_store(src, opts, cache_root() / "stores", progress=False)
    with tempfile.TemporaryDirectory(prefix="sdr-") as tmp:
        path = Path(tmp) / "adata.h5ad"
        adata.write_h5ad(path)
        return ensure_store(path, opts, cache_root() / "stores", progress=False)


def rows_in(adata: ad.AnnData, cell_ids: Any) -> np.ndarray:
    """Positions in ``adata`` of the given cell ids (each must be there)."""
    index = pd.Index(adata.obs_names.astype(str))
    at = index.get_indexer(np.asarray(cell_ids).astype(str))
    if (at < 0).any():
        raise UserError(f"{int((at < 0).sum())} embedded cells are not in the AnnData (was it changed meanwhile?)")
    return at


def clean_uns(d: dict[str, Any]) -> dict[str, Any]:
    """A dict h5ad can store: None dropped (recursively), tuples as lists, paths as strings."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if v is None:
            continue
        if isinstance(v, dict):
            v = clean_uns(v)
        elif isinstance(v, tuple | list):
            v = [str(x) if isinstance(x, Path) else x for x in v]
        elif isinstance(v, Path):
            v = str(v)
        out[str(k)] = v
    return out


# -------------------------------------------------------------------------------------------- embed


def foundation_model(model: str, checkpoint: str | Path | None, preset: str | None,
                     options: dict[str, Any] | None) -> Any:
    """A foundation model by name with exactly one of ``checkpoint`` (official format) or ``preset``."""
    from scdrugmap_ray.engine.models.base import FoundationModel, get_model, model_class

    if not isinstance(model, str):
        raise UserError(f"model: expected a model name, got {type(model).__name__}")
    cls = model_class(model)
    if not issubclass(cls, FoundationModel):
        raise UserError(f"{model!r} is not a foundation model (it has no checkpoint); sdr.models.list() names them")
    if (checkpoint is None) == (preset is None):
        raise UserError("give exactly one of checkpoint=DIR or preset=NAME")
    from scdrugmap_ray.jobs.options import model_options

    opts = dict(options or {})
    for key in ("checkpoint", "preset"):
        if key in opts:
            raise UserError(f"options: give {key!r} as the argument {key}=, not in options")
    opts = model_options(model, opts, "options")
    opts.update(checkpoint=str(checkpoint) if checkpoint is not None else None, preset=preset)
    return get_model(model, opts)


def embed_local(fm: Any, cells: Cells, batch_tokens: int | None, device: str, progress: bool = False) -> np.ndarray:
    """float32 [n_cells, d] in this process, no Ray: the engine's ``embed_in_process`` (the model's tokenizer,
    then the ``embed_block`` each Ray Data actor runs, over the engine's blocks of cells in data order)."""
    from scdrugmap_ray.engine.pipeline.embed import embed_in_process

    return embed_in_process(fm, cells.cell_ids, cells.csr, cells.genes, batch_tokens=batch_tokens, device=device,
                            progress=progress)


def embed(
    adata: Any,
    model: str = "geneformer",
    *,
    checkpoint: str | Path | None = None,
    preset: str | None = None,
    key_added: str | None = None,
    batch_tokens: int | None = None,
    layer: str | None = None,
    gene_key: str | None = None,
    options: dict[str, Any] | None = None,
    backend: Backend = "auto",
    device: str | None = None,
    copy: bool = False,
    progress: bool | None = None,
) -> ad.AnnData | None:
    """Embed every cell with a foundation model.

    ``adata``: an AnnData (in memory or backed) or an .h5ad path (opened backed, read-only; the AnnData is
    returned with the results in memory: save it with ``.write_h5ad``). ``model``: a name from
    ``sdr.models.list()``; exactly one of ``checkpoint`` (a directory in the model's official format) or
    ``preset`` (a random-weight size, e.g. ``"tiny"``). ``options``: the model's other options (``dtype``...).
    Values must be raw counts for count-based models (``layer="counts"`` reads a layer instead of X).

    Writes ``obsm[key_added]`` (float32 [n_obs, d], default key ``X_<model>``; NaN rows for cells without
    any non-zero value) and ``uns[key_added]``: model, options, checkpoint path and SHA-256, random-weights
    flag, backend, batch_tokens, package version. Returns None, or the AnnData with ``copy=True`` or a path.
    ``batch_tokens``: tokens per model batch (cells x longest cell); None: the device's default (16,384 on a
    GPU, 2,048 on CPU, where small batches are cheaper).
    ``progress``: a bar of cells embedded (default: when there is more than one block of 1,024 cells).
    """
    adata, opened = open_data(adata)
    if batch_tokens is not None and (not isinstance(batch_tokens, int) or isinstance(batch_tokens, bool)
                                     or batch_tokens < 1):
        raise UserError(f"batch_tokens: expected a positive integer, got {batch_tokens!r}")
    fm = foundation_model(model, checkpoint, preset, options)
    key = key_added or f"X_{fm.name}"
    if not isinstance(key, str) or not key:
        raise UserError(f"key_added: expected a non-empty string, got {key_added!r}")
    where = choose_backend(adata, backend)
    if copy and not opened:
        adata = adata.to_memory() if adata.isbacked else adata.copy()
    if where == "local":
        cells = in_memory_cells(adata, layer, gene_key)
        if fm.requires_counts and not cells.is_counts:
            raise UserError(f"model {fm.name!r} needs raw counts (non-negative integers) but the AnnData holds other "
                            "values; pass the raw-count layer (layer='counts')")
        from scdrugmap_ray.engine.pipeline.embed import IN_PROCESS_BLOCK_CELLS

        show = len(cells.rows) > IN_PROCESS_BLOCK_CELLS if progress is None else bool(progress)
        emb = embed_local(fm, cells, batch_tokens, device or "cpu", progress=show)
        out = np.full((adata.n_obs, emb.shape[1]), np.nan, dtype=np.float32)
        out[cells.rows] = emb
        n_done = len(cells.rows)
    else:
        from scdrugmap_ray.engine.pipeline.embed import embed_store

        store = ray_store(adata, Path(adata.filename) if opened else None, layer, gene_key)
        emb = embed_store(fm, store, batch_tokens=batch_tokens, device=device)
        ids = store.obs(["cell_id"])["cell_id"].to_numpy()
        out = np.full((adata.n_obs, emb.shape[1]), np.nan, dtype=np.float32)
        out[rows_in(adata, ids)] = emb
        n_done = len(ids)
    if fm.random_weights:
        log.warning("%s: RANDOM WEIGHTS (not pretrained): embeddings carry no biology", fm.name)
    from scdrugmap_ray.engine.models.base import checkpoint_digest

    ckpt = fm.checkpoint_dir()
    adata.obsm[key] = out
    adata.uns[key] = clean_uns({
        "model": fm.name,
        "options": {k: v for k, v in fm.options.items() if k not in ("checkpoint", "preset")},
        "checkpoint": str(Path(ckpt).resolve()),
        "preset": preset,
        "checkpoint_sha256": checkpoint_digest(Path(ckpt)),
        "random_weights": bool(fm.random_weights),
        "backend": where,
        "batch_tokens": batch_tokens_for(device or "cpu", batch_tokens) if where == "local" else batch_tokens,
        "layer": layer,
        "n_cells_embedded": int(n_done),
        "scdrugmap_ray_version": package_version(),
    })
    return adata if (copy or opened) else None


# ------------------------------------------------------------------------------------------- predict


def predict(
    adata: Any,
    model: str,
    *,
    key_added: str = DEFAULT_PREDICT_KEY,
    registry: str | Path | None = None,
    embeddings: bool = False,
    layer: str | None = None,
    gene_key: str | None = None,
    backend: Backend = "auto",
    device: str | None = None,
    copy: bool = False,
    progress: bool | None = None,
) -> ad.AnnData | None:
    """Predict drug response of every cell with a trained registry model (``"name"`` or ``"name@version"``;
    ``registry``: its root, default ``$SCDRUGMAP_RAY_REGISTRY``).

    Writes ``obs[f"{key_added}_p_sensitive"]`` (float32; NaN for cells without any non-zero value),
    ``obs[f"{key_added}_label"]`` (sensitive / resistant at p >= 0.5), with ``embeddings`` the model's features
    in ``obsm[f"X_{key_added}"]``, and ``uns[key_added]``: model@version, base model, head, kind,
    random-weights flag, threshold, cells predicted, package version. A second model under another
    ``key_added`` keeps the first one's columns. Returns None, or the AnnData with ``copy=True`` or a path.
    ``progress``: a bar of cells predicted on the Ray Data path (default; ``False``: none).
    """
    from scdrugmap_ray.engine.registry import THRESHOLD, Registry, label_of

    if not isinstance(key_added, str) or not key_added:
        raise UserError(f"key_added: expected a non-empty string, got {key_added!r}")
    adata, opened = open_data(adata)
    reg = Registry(registry)
    version_dir = reg.resolve(model)
    info = reg.info(model)
    where = choose_backend(adata, backend)
    if copy and not opened:
        adata = adata.to_memory() if adata.isbacked else adata.copy()
    p_all = np.full(adata.n_obs, np.nan, dtype=np.float32)
    feats_all: np.ndarray | None = None
    if where == "local":
        from scdrugmap_ray.engine.registry import LoadedModel

        cells = in_memory_cells(adata, layer, gene_key)
        loaded = LoadedModel(version_dir, device=device or "cpu")
        p, feats = loaded.predict(cells.cell_ids, cells.csr, cells.genes)
        p_all[cells.rows] = p
        if embeddings:
            feats_all = np.full((adata.n_obs, feats.shape[1]), np.nan, dtype=np.float32)
            feats_all[cells.rows] = feats
        n_done = len(cells.rows)
    else:
        import time

        from scdrugmap_ray.engine.progress import cells_progress, rate_text
        from scdrugmap_ray.engine.registry import iter_predictions

        store = ray_store(adata, Path(adata.filename) if opened else None, layer, gene_key)
        n_done = 0
        t0 = time.perf_counter()
        with cells_progress(progress is not False) as bar:
            task = bar.add_task(f"predict {model}", total=store.n_cells, rate="")
            for b in iter_predictions(version_dir, store, want_features=embeddings, device=device):
                rows = rows_in(adata, b["cell_id"])
                p_all[rows] = np.asarray(b["p_sensitive"], dtype=np.float32)
                n_done += len(rows)
                if embeddings:
                    f = np.stack(b["features"]) if b["features"].dtype == object else b["features"]
                    if feats_all is None:
                        feats_all = np.full((adata.n_obs, f.shape[1]), np.nan, dtype=np.float32)
                    feats_all[rows] = f
                bar.update(task, advance=len(rows), rate=rate_text(n_done, t0))
    if info.get("random_weights"):
        log.warning("%s@%s: RANDOM WEIGHTS (not pretrained): predictions mean nothing", info["name"], info["version"])
    labels = np.where(np.isnan(p_all), None, label_of(np.nan_to_num(p_all, nan=0.0)))
    adata.obs[f"{key_added}_p_sensitive"] = p_all
    adata.obs[f"{key_added}_label"] = pd.Categorical(labels, categories=["resistant", "sensitive"])
    if feats_all is not None:
        adata.obsm[f"X_{key_added}"] = feats_all
    adata.uns[key_added] = prediction_provenance(info, THRESHOLD, n_done, where, embeddings)
    return adata if (copy or opened) else None


def prediction_provenance(info: dict[str, Any], threshold: float, n_cells: int, backend: str,
                          embeddings: bool) -> dict[str, Any]:
    """What ``uns[key_added]`` records about a prediction (the CLI writes the same into an .h5ad output)."""
    return clean_uns({
        "model": f"{info['name']}@{info['version']}",
        "name": info["name"],
        "version": int(info["version"]),
        "kind": info.get("kind"),
        "base_model": info.get("model"),
        "head": info.get("head"),
        "random_weights": bool(info.get("random_weights", False)),
        "threshold": float(threshold),
        "n_cells_predicted": int(n_cells),
        "embeddings": bool(embeddings),
        "backend": backend,
        "scdrugmap_ray_version": package_version(),
    })


def rename_prediction_keys(h5ad: str | Path, key_added: str, provenance: dict[str, Any]) -> None:
    """In an .h5ad written by the engine's predict (obs ``scdrugmap_p_sensitive`` / ``scdrugmap_label``,
    obsm ``X_scdrugmap``): move them under ``key_added`` and store ``provenance`` as ``uns[key_added]``.
    The CLI's ``predict --key-added`` does this to its output."""
    import anndata as ad
    import h5py

    with h5py.File(h5ad, "r+") as f:
        if key_added != DEFAULT_PREDICT_KEY:
            obs = ad.io.read_elem(f["obs"])
            obs = obs.rename(columns={f"{DEFAULT_PREDICT_KEY}_p_sensitive": f"{key_added}_p_sensitive",
                                      f"{DEFAULT_PREDICT_KEY}_label": f"{key_added}_label"})
            del f["obs"]
            ad.io.write_elem(f, "obs", obs)
            if "obsm" in f and f"X_{DEFAULT_PREDICT_KEY}" in f["obsm"]:
                if f"X_{key_added}" in f["obsm"]:
                    del f["obsm"][f"X_{key_added}"]
                f["obsm"].move(f"X_{DEFAULT_PREDICT_KEY}", f"X_{key_added}")
        uns = f.require_group("uns")
        if "encoding-type" not in uns.attrs:
            uns.attrs["encoding-type"], uns.attrs["encoding-version"] = "dict", "0.1.0"
        if key_added in uns:
            del uns[key_added]
        ad.io.write_elem(uns, key_added, provenance)


__all__ = ["DEFAULT_PREDICT_KEY", "IN_MEMORY_MAX_CELLS", "embed", "predict"]
