"""AnnData (.h5ad) -> cell store, streaming.

The file is read with h5py in chunks of rows (X or a layer, CSR or dense), so peak memory is bounded
by the chunk, not by the file; ``obs`` (metadata only) is read whole. Shards are written as the chunks
come, into a temporary directory renamed at the end: on any error nothing is left behind.

Values: NaN or inf anywhere is an error. Negative or non-integer values are accepted and recorded as
``value_type: non_counts`` (z-scored or log-normalised data is a real use case: baselines and
precomputed embeddings can use it); models that need raw counts refuse such a store with one line.
Cells without any non-zero value are dropped and counted.

Matrices stored column-wise (CSC) are refused with a one-line fix (``adata.X = adata.X.tocsr()``):
reading cells from CSC touches the whole matrix for every chunk, which defeats bounded streaming.
Dense matrices are read in row slices. Only dense 2-D ``obsm`` arrays are carried (as ``obsm.<key>``);
other obsm entries are skipped with a warning in the report.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from ..errors import UserError
from ..fsutil import atomic_dir, write_json
from .catalog import ANNOTATED, annotate_columns
from .gene_ids import ensembl_to_symbols, looks_like_ensembl, symbols_to_ensembl
from .schema import METADATA_COLUMNS, SCHEMA_VERSION, SHARD_SCHEMA, parse_labels
from .store import CellStore

log = logging.getLogger(__name__)

SYMBOL_COLUMNS = ("gene_symbol", "gene_symbols", "symbol", "feature_name", "gene_name")
ENSEMBL_COLUMNS = ("ensembl_id", "gene_ids", "gene_id", "ensembl")


@dataclass(frozen=True)
class ConvertOptions:
    label_key: str | None = None
    sensitive: tuple[str, ...] = ()
    resistant: tuple[str, ...] = ()
    dataset_key: str | None = None
    dataset: str | None = None
    sample_key: str | None = None
    layer: str | None = None
    gene_key: str | None = None
    obs_map: dict[str, str] = field(default_factory=dict)
    # "primary" / "external": fill cancer_type, tissue, therapy, regimen from the scDrugMap catalog entry
    # the dataset column names (bare DataN ids are datasets of that collection)
    catalog: str | None = None
    chunk_size: int = 10_000
    shard_cells: int = 50_000
    row_group_cells: int = 4096

    def identity(self) -> dict[str, Any]:
        """What changes the store's contents (not how it is chunked)."""
        d = asdict(self)
        for k in ("chunk_size", "shard_cells", "row_group_cells"):
            d.pop(k)
        if d["catalog"] is None:  # the option changes nothing, so it leaves the cache key as it was
            d.pop("catalog")
        d["schema_version"] = SCHEMA_VERSION  # a cached store of an older layout is converted again
        return d


@dataclass
class ConvertReport:
    source: str
    n_cells_in: int = 0
    n_cells_written: int = 0
    n_empty_dropped: int = 0
    n_genes: int = 0
    value_type: str = "counts"
    label_key: str | None = None
    label_counts: dict[str, int] = field(default_factory=dict)
    label_mapping: dict[str, list[str]] = field(default_factory=dict)
    datasets: dict[str, int] = field(default_factory=dict)
    n_samples: int = 0
    obs_columns: dict[str, str] = field(default_factory=dict)
    obsm_keys: list[str] = field(default_factory=list)
    gene_id_type: str = "symbol"
    catalog: list[str] = field(default_factory=list)  # what catalog annotation did (lines)
    warnings: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        lc = self.label_counts
        out = [
            f"source: {self.source}",
            f"cells: {self.n_cells_in:,} in, {self.n_cells_written:,} written, "
            f"{self.n_empty_dropped:,} empty dropped",
            f"genes: {self.n_genes:,} (names are {self.gene_id_type}s)",
            f"values: {self.value_type}" + ("" if self.value_type == "counts" else
                                              " (not raw counts: count-based models will refuse it)"),
        ]
        if self.label_key:
            out.append(
                f"labels ({self.label_key}): sensitive {lc.get('sensitive', 0):,}, resistant "
                f"{lc.get('resistant', 0):,}, unknown {lc.get('unknown', 0):,}"
            )
        else:
            out.append("labels: none (prediction only)")
        ds = ", ".join(f"{k} ({v:,})" for k, v in list(self.datasets.items())[:10])
        more = f" and {len(self.datasets) - 10} more" if len(self.datasets) > 10 else ""
        out.append(f"datasets: {len(self.datasets)}: {ds}{more}")
        out.append(f"samples: {self.n_samples}" if self.n_samples else "samples: none (cell-level splits only)")
        used = ", ".join(f"{k}<-{v}" for k, v in self.obs_columns.items())
        out.append(f"metadata columns: {used or 'none'}")
        out.append(f"obsm embeddings: {', '.join(self.obsm_keys) or 'none'}")
        out.extend(self.catalog)
        out.extend(f"warning: {w}" for w in self.warnings)
        return out


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------- reading


class _H5ad:
    """An open .h5ad, read with h5py; every failure to read it becomes a UserError."""

    def __init__(self, src: Path) -> None:
        self.src = src
        if not src.exists():
            raise UserError(f"{src} not found")
        if src.is_dir():
            raise UserError(f"{src} is a directory, not an .h5ad file")
        if not h5py.is_hdf5(src):
            raise UserError(f"{src} is not an .h5ad file (not HDF5); save your AnnData with adata.write_h5ad()")
        try:
            self.f = h5py.File(src, "r")
        except OSError as err:
            raise UserError(f"{src}: truncated or corrupt .h5ad ({err}); write it again") from None
        try:
            self.obs = self._elem("obs")
            self.var = self._elem("var")
        except UserError:
            self.f.close()
            raise
        except Exception as err:  # anndata wraps h5py read errors in several types
            self.f.close()
            raise UserError(
                f"{src}: truncated or corrupt .h5ad ({type(err).__name__}: {err}); write it again"
            ) from None

    def _elem(self, key: str) -> Any:
        import anndata as ad

        if key not in self.f:
            raise UserError(f"{self.src}: no '{key}' in the file; is it an AnnData .h5ad?")
        return ad.io.read_elem(self.f[key])

    def close(self) -> None:
        self.f.close()

    def matrix(self, layer: str | None) -> Any:
        if layer is None:
            if "X" not in self.f:
                raise UserError(f"{self.src}: the file has no X; name a layer with --layer")
            return self.f["X"]
        layers = self.f.get("layers")
        if layers is None or layer not in layers:
            have = ", ".join(layers.keys()) if layers is not None else "none"
            raise UserError(f"{self.src}: no layer {layer!r}; layers: {have}")
        return layers[layer]

    def row_chunks(self, layer: str | None, chunk: int) -> Iterator[tuple[int, sp.csr_matrix]]:
        """(start row, CSR chunk) over the matrix, reading only one chunk at a time."""
        m = self.matrix(layer)
        n = len(self.obs)
        try:
            if isinstance(m, h5py.Group):
                enc = m.attrs.get("encoding-type", "")
                shape = tuple(m.attrs["shape"])
                if enc == "csc_matrix":
                    raise UserError(
                        f"{self.src}: the matrix is stored column-wise (CSC), which cannot be streamed by cells; "
                        "re-save it row-wise: adata.X = adata.X.tocsr(); adata.write_h5ad(...)"
                    )
                if enc != "csr_matrix":
                    raise UserError(f"{self.src}: unsupported matrix encoding {enc!r}")
                indptr = m["indptr"][:]
                for start in range(0, n, chunk):
                    stop = min(start + chunk, n)
                    lo, hi = int(indptr[start]), int(indptr[stop])
                    data = m["data"][lo:hi]
                    idx = m["indices"][lo:hi]
                    ptr = indptr[start : stop + 1] - lo
                    yield start, sp.csr_matrix((data, idx, ptr), shape=(stop - start, shape[1]))
            else:
                for start in range(0, n, chunk):
                    yield start, sp.csr_matrix(m[start : min(start + chunk, n)])
        except (OSError, RuntimeError) as err:
            raise UserError(f"{self.src}: truncated or corrupt .h5ad ({err}); write it again") from None

    def obsm_arrays(self) -> tuple[dict[str, h5py.Dataset], list[str]]:
        """Dense 2-D obsm arrays (kept) and the names of other obsm entries (skipped, with a warning)."""
        if "obsm" not in self.f:
            return {}, []
        dense, other = {}, []
        for k, v in self.f["obsm"].items():
            is_dense = isinstance(v, h5py.Dataset) and v.ndim == 2 and np.issubdtype(v.dtype, np.number)
            if is_dense:
                dense[k] = v
            else:
                other.append(k)
        return dense, other


def _obs_column(obs: pd.DataFrame, col: str, what: str, where: str = "obs") -> pd.Series:
    if col not in obs.columns:
        have = ", ".join(map(str, obs.columns[:30])) or "none"
        raise UserError(f"{where} has no column {col!r} ({what}); {where} columns: {have}")
    return obs[col]


def _strings_or_none(values: pd.Series) -> np.ndarray:
    out = values.astype(object).to_numpy()
    missing = pd.isna(out)
    return np.array([None if m else str(v) for v, m in zip(out, missing, strict=True)], dtype=object)


def _gene_table(h: _H5ad, gene_key: str | None) -> tuple[pd.DataFrame, str, list[str]]:
    return genes_of_var(h.var, gene_key, str(h.src))


def genes_of_var(var: pd.DataFrame, gene_key: str | None, source: str) -> tuple[pd.DataFrame, str, list[str]]:
    """genes.parquet contents of an AnnData's ``var``, the kind of the gene names, and warnings (the
    in-memory Python API builds the same table as convert).

    The names (``--gene-key`` column, else var_names) must be unique. Symbols come from the names when
    they are symbols, else from a symbol column of var (e.g. ``gene_symbol``), else from the mapping
    table; Ensembl IDs likewise from the names, an Ensembl column of var, or the mapping table.
    """
    warnings: list[str] = []
    if gene_key is not None:
        names = _obs_column(var, gene_key, "--gene-key", "var").astype(str).reset_index(drop=True)
    else:
        names = pd.Series(var.index.astype(str))
    dup = names[names.duplicated()].unique()
    if len(dup):
        raise UserError(
            f"{source}: {len(dup)} duplicated gene name(s), e.g. {', '.join(map(str, dup[:5]))}; make them unique "
            "(adata.var_names_make_unique()) or pick another --gene-key"
        )

    def var_col(candidates: tuple[str, ...]) -> pd.Series | None:
        col = next((c for c in candidates if c in var.columns and c != gene_key), None)
        if col is None:
            return None
        values = var[col].astype(object).reset_index(drop=True)
        return values.where(values.notna(), None).map(lambda v: None if v is None else str(v))

    sym_col, ens_col = var_col(SYMBOL_COLUMNS), var_col(ENSEMBL_COLUMNS)
    if looks_like_ensembl(names.tolist()):
        kind = "Ensembl ID"
        ensembl = names.str.split(".").str[0]
        symbols = sym_col if sym_col is not None else pd.Series(ensembl_to_symbols(ensembl.tolist()), dtype=object)
        symbols = symbols.where(symbols.notna(), ensembl)  # no symbol known: keep the ID
    else:
        # Symbols, or other identifiers (Entrez numbers...) with a symbol column beside them.
        kind = "symbol" if sym_col is None else "other identifier"
        symbols = names if sym_col is None else sym_col.where(sym_col.notna(), names)
        ensembl = ens_col if ens_col is not None else pd.Series(symbols_to_ensembl(symbols.tolist()), dtype=object)
    n_dup = int(symbols.duplicated().sum())
    if n_dup:
        warnings.append(f"{n_dup} gene symbol(s) occur twice; their genes stay separate (positions differ)")
    genes = pd.DataFrame(
        {
            "position": np.arange(len(names), dtype=np.int32),
            "symbol": symbols.astype(str).to_numpy(),
            "ensembl_id": pd.array(ensembl.tolist(), dtype="string"),
        }
    )
    return genes, kind, warnings


@dataclass
class _Plan:
    """Everything decided from obs/var before the matrix is read."""

    cell_ids: np.ndarray
    labels: np.ndarray
    columns: dict[str, np.ndarray]
    genes: pd.DataFrame
    obsm: dict[str, h5py.Dataset]
    report: ConvertReport


def _plan(h: _H5ad, opts: ConvertOptions) -> _Plan:
    obs = h.obs
    report = ConvertReport(source=str(h.src), n_cells_in=len(obs), label_key=opts.label_key)
    cell_ids = obs.index.astype(str).to_numpy()
    dup = pd.Index(cell_ids)[pd.Index(cell_ids).duplicated()].unique()
    if len(dup):
        raise UserError(
            f"{h.src}: {len(dup)} duplicated cell name(s), e.g. {', '.join(map(str, dup[:5]))}; make them unique "
            "(adata.obs_names_make_unique())"
        )
    if opts.dataset_key and opts.dataset:
        raise UserError("give either --dataset-key (an obs column) or --dataset (one name), not both")
    if opts.label_key:
        labels, mapping = parse_labels(_obs_column(obs, opts.label_key, "--label-key"), opts.sensitive, opts.resistant)
        report.label_mapping = mapping
    else:
        labels = np.full(len(obs), -1, dtype=np.int8)
    columns: dict[str, np.ndarray] = {}
    if opts.dataset_key:
        columns["dataset"] = _obs_column(obs, opts.dataset_key, "--dataset-key").astype(str).to_numpy(dtype=object)
        report.obs_columns["dataset"] = opts.dataset_key
    else:
        name = opts.dataset or h.src.name.removesuffix(".h5ad")
        columns["dataset"] = np.full(len(obs), name, dtype=object)
    if opts.sample_key:
        columns["sample"] = _strings_or_none(_obs_column(obs, opts.sample_key, "--sample-key"))
        report.obs_columns["sample"] = opts.sample_key
    for col in METADATA_COLUMNS[2:]:
        src = opts.obs_map.get(col)
        if src is not None:
            _obs_column(obs, src, f"--obs-map {col}=")
        elif col in obs.columns:
            src = col
        if src is not None:
            columns[col] = _strings_or_none(obs[src])
            report.obs_columns[col] = src
    unknown_map = set(opts.obs_map) - set(METADATA_COLUMNS[2:])
    if unknown_map:
        raise UserError(f"--obs-map {sorted(unknown_map)}: only {', '.join(METADATA_COLUMNS[2:])} can be mapped")
    if opts.catalog:
        ann = annotate_columns(columns["dataset"], columns, opts.catalog, len(obs))
        report.catalog = ann.lines()
        for col in ANNOTATED:
            report.obs_columns[col] = f"{report.obs_columns[col]}+catalog" if col in report.obs_columns else "catalog"
    genes, kind, gene_warnings = _gene_table(h, opts.gene_key)
    report.n_genes, report.gene_id_type = len(genes), kind
    report.warnings.extend(gene_warnings)
    obsm, skipped = h.obsm_arrays()
    report.obsm_keys = sorted(obsm)
    if skipped:
        report.warnings.append(f"obsm entries not dense 2-D numeric arrays were skipped: {', '.join(skipped)}")
    return _Plan(cell_ids, labels, columns, genes, obsm, report)


# ---------------------------------------------------------------------------------------- writing


class _ShardWriter:
    """Appends tables as part-NNNNN.parquet shards of ``shard_cells`` rows, in row groups of ``group`` rows.

    Rows are buffered until a whole row group is there, so row groups have equal sizes whatever the
    read chunk size (the last one of the store excepted).
    """

    def __init__(self, out: Path, schema: pa.Schema, shard_cells: int, group: int) -> None:
        self.out, self.schema, self.shard_cells, self.group = out, schema, shard_cells, min(group, shard_cells)
        self.pending: list[pa.Table] = []
        self.n_pending = 0
        self.writer: pq.ParquetWriter | None = None
        self.shard, self.in_shard = 0, 0

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.n_pending += table.num_rows
        self._flush(final=False)

    def _flush(self, final: bool) -> None:
        buf = pa.concat_tables(self.pending) if self.pending else None
        pos = 0
        while buf is not None and pos < buf.num_rows:
            take = min(self.group, self.shard_cells - self.in_shard, buf.num_rows - pos)
            if take < self.group and not final and take == buf.num_rows - pos:
                break  # wait for more rows to fill the group
            if self.writer is None:
                self.writer = pq.ParquetWriter(self.out / f"part-{self.shard:05d}.parquet", self.schema)
            self.writer.write_table(buf.slice(pos, take), row_group_size=take)
            pos += take
            self.in_shard += take
            if self.in_shard >= self.shard_cells:
                self.writer.close()
                self.writer, self.shard, self.in_shard = None, self.shard + 1, 0
        rest = buf.slice(pos) if buf is not None else None
        self.pending = [rest] if rest is not None and rest.num_rows else []
        self.n_pending = rest.num_rows if rest is not None else 0

    def close(self) -> None:
        """Write what is left; called on success only (a failed conversion's temp dir is removed)."""
        self._flush(final=True)
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _list_array(csr: sp.csr_matrix, data: np.ndarray, typ: pa.DataType) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(csr.indptr.astype(np.int32)), pa.array(data, type=typ))


def _chunk_table(
    plan: _Plan, schema: pa.Schema, start: int, n_read: int, keep: np.ndarray, sub: sp.csr_matrix, first_row: int
) -> pa.Table:
    """The store rows of one read chunk: ``keep`` are the non-empty rows (chunk-relative), ``sub`` their values,
    ``first_row`` the store row of the first kept cell (rows count written cells: empty ones are dropped)."""
    rows = start + keep
    lab = plan.labels[rows]
    arrays: dict[str, Any] = {
        "cell_id": pa.array(plan.cell_ids[rows], type=pa.string()),
        "row": pa.array(np.arange(first_row, first_row + len(rows), dtype=np.int64)),
        "gene_index": _list_array(sub, sub.indices.astype(np.int32), pa.int32()),
        "value": _list_array(sub, sub.data.astype(np.float32), pa.float32()),
        # every kept row has a non-zero, so reduceat's segments are all non-empty
        "n_counts": pa.array(np.add.reduceat(sub.data.astype(np.float64), sub.indptr[:-1])),
        "n_genes": pa.array(np.diff(sub.indptr).astype(np.int32)),
        "label": pa.array(lab, mask=lab < 0, type=pa.int8()),
    }
    for col in METADATA_COLUMNS:
        vals = plan.columns.get(col)
        arrays[col] = pa.array(vals[rows] if vals is not None else [None] * len(rows), type=pa.string())
    for name in schema.names[len(SHARD_SCHEMA) :]:  # obsm.<key>: read the same rows of the embedding
        block = np.asarray(plan.obsm[name.removeprefix("obsm.")][start : start + n_read], dtype=np.float32)[keep]
        arrays[name] = pa.FixedSizeListArray.from_arrays(pa.array(block.ravel()), block.shape[1])
    return pa.table(arrays, schema=schema)


def _process(h: _H5ad, plan: _Plan, opts: ConvertOptions, out: Path | None, progress: bool) -> ConvertReport:
    """Read every chunk; validate values; write shards into ``out`` when given (validate passes None)."""
    from rich.progress import Progress

    report = plan.report
    counts_ok = True
    any_negative = False
    label_totals = {"sensitive": 0, "resistant": 0, "unknown": 0}
    datasets: dict[str, int] = {}
    samples: set[str] = set()
    obsm_fields = [pa.field(f"obsm.{k}", pa.list_(pa.float32(), v.shape[1])) for k, v in sorted(plan.obsm.items())]
    schema = pa.schema(list(SHARD_SCHEMA) + obsm_fields)
    writer = _ShardWriter(out, schema, opts.shard_cells, opts.row_group_cells) if out is not None else None
    try:
        with Progress(disable=not progress) as bar:
            task = bar.add_task(f"convert {h.src.name}", total=report.n_cells_in)
            for start, chunk in h.row_chunks(opts.layer, opts.chunk_size):
                chunk.eliminate_zeros()
                chunk.sort_indices()
                if not np.isfinite(chunk.data).all():
                    bad = int(np.flatnonzero(~np.isfinite(chunk.data))[0])
                    row = int(np.searchsorted(chunk.indptr, bad, side="right") - 1)
                    raise UserError(
                        f"{h.src}: NaN or infinite values (first in cell {plan.cell_ids[start + row]!r}); "
                        "fix or remove them before converting"
                    )
                if chunk.data.size:
                    any_negative |= bool((chunk.data < 0).any())
                    counts_ok &= not any_negative and bool(np.all(chunk.data == np.round(chunk.data)))
                nnz = np.diff(chunk.indptr)
                keep = np.flatnonzero(nnz > 0)
                report.n_empty_dropped += int(len(nnz) - len(keep))
                rows = start + keep
                sub = chunk[keep]
                lab = plan.labels[rows]
                label_totals["sensitive"] += int((lab == 1).sum())
                label_totals["resistant"] += int((lab == 0).sum())
                label_totals["unknown"] += int((lab == -1).sum())
                for d, n in zip(*np.unique(plan.columns["dataset"][rows].astype(str), return_counts=True), strict=True):
                    datasets[d] = datasets.get(d, 0) + int(n)
                if "sample" in plan.columns:
                    samples.update(x for x in plan.columns["sample"][rows] if x is not None)
                if writer is not None and len(rows):
                    writer.add(_chunk_table(plan, schema, start, len(nnz), keep, sub, report.n_cells_written))
                report.n_cells_written += len(rows)
                bar.advance(task, len(nnz))
        if writer is not None:
            writer.close()
    finally:
        if writer is not None:
            writer.abort()
    report.value_type = "counts" if counts_ok else "non_counts"
    if any_negative:
        report.warnings.append("negative values: the data is not raw counts (z-scored or centred?)")
    report.label_counts = label_totals
    report.datasets = dict(sorted(datasets.items()))
    report.n_samples = len(samples)
    if report.n_cells_written == 0:
        raise UserError(f"{h.src}: no cell has any non-zero value; nothing to convert")
    if opts.label_key and label_totals["sensitive"] + label_totals["resistant"] == 0:
        report.warnings.append(f"no cell is labelled sensitive or resistant in {opts.label_key!r}")
    return report


def inspect_h5ad(src: str | Path, opts: ConvertOptions, progress: bool = False) -> ConvertReport:
    """What convert would do (every check included), writing nothing."""
    h = _H5ad(Path(src))
    try:
        return _process(h, _plan(h, opts), opts, None, progress)
    finally:
        h.close()


def convert_h5ad(
    src: str | Path,
    out_dir: str | Path,
    opts: ConvertOptions,
    progress: bool = True,
    overwrite: bool = False,
    source_sha256: str | None = None,
) -> ConvertReport:
    src, out_dir = Path(src), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise UserError(f"{out_dir} already exists; choose another output directory or pass --overwrite")
    h = _H5ad(src)
    try:
        plan = _plan(h, opts)
        with atomic_dir(out_dir, overwrite=overwrite) as tmp:
            report = _process(h, plan, opts, tmp, progress)
            plan.genes.to_parquet(tmp / "genes.parquet", index=False)
            sha = source_sha256 or file_sha256(src)
            try:
                pkg = version("scdrugmap-ray")
            except PackageNotFoundError:
                pkg = "unknown"
            meta = {
                "schema_version": SCHEMA_VERSION,
                "source": str(src.resolve()),
                "source_sha256": sha,
                "content_hash": hashlib.sha256(
                    (sha + json.dumps(opts.identity(), sort_keys=True)).encode()
                ).hexdigest(),
                "n_cells": report.n_cells_written,
                "n_genes": report.n_genes,
                "n_empty_dropped": report.n_empty_dropped,
                "value_type": report.value_type,
                "label_key": opts.label_key,
                "label_mapping": report.label_mapping,
                "label_counts": report.label_counts,
                "datasets": report.datasets,
                "obs_columns": report.obs_columns,
                "obsm_keys": report.obsm_keys,
                "gene_id_type": report.gene_id_type,
                "created_by": f"scdrugmap-ray {pkg}",
            }
            write_json(tmp / "meta.json", meta)
    finally:
        h.close()
    log.info("converted %s -> %s (%d cells)", src, out_dir, report.n_cells_written)
    return report


def ensure_store(src: Path, opts: ConvertOptions, cache_root: Path, progress: bool = True) -> CellStore:
    """A cell store for ``src``: a store directory as is, an .h5ad converted once into the cache."""
    src = Path(src)
    if src.is_dir():
        return CellStore.open(src)
    if not src.exists():
        raise UserError(f"{src} not found")
    sha = file_sha256(src)
    key = hashlib.sha256((sha + json.dumps(opts.identity(), sort_keys=True)).encode()).hexdigest()[:20]
    path = Path(cache_root) / key
    if not (path / "meta.json").exists():
        try:
            convert_h5ad(src, path, opts, progress=progress, source_sha256=sha)
        except (FileExistsError, UserError):
            # Another process (a second Ray worker, a parallel run) finished the same conversion first.
            if not (path / "meta.json").exists():
                raise
    return CellStore.open(path)
