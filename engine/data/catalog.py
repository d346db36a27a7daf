"""scDrugMap's dataset collection as a catalog: what each dataset is, and its cells per subgroup.

Two packaged tables (``resources/scdrugmap_collection_*.tsv``, provenance in ``resources/README.md``):
one row per dataset (36 primary, 24 external) and the cells of each tissue / cancer type / therapy /
regimen subgroup. DataN numbering restarts in the external collection, so its ids are ``ext:DataN``.

Python::

    from scdrugmap_ray.engine.data import catalog
    catalog.datasets(cancer_type="lung", collection="primary")   # a DataFrame, one row per dataset
    catalog.dataset("Data12")                                    # one CatalogDataset
    catalog.annotate(obs, dataset_key="dataset")                 # fills cancer_type, tissue, therapy, regimen
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from importlib.resources import files
from typing import Any

import numpy as np
import pandas as pd

from ..errors import UserError

COLLECTIONS = ("primary", "external")
#: the metadata columns the catalog fills (cell-store names) and the catalog field each comes from
ANNOTATED = {"cancer_type": "cancer_type", "tissue": "tissue", "therapy": "therapy", "regimen": "regimen"}
#: subgroup kinds of the subgroups table, in the cell-store's column names
_KINDS = {"All": "all", "Tissue_type": "tissue", "Cancer_type": "cancer_type", "Drug_type": "therapy",
          "Regimen": "regimen"}
_ID = re.compile(r"^(?:(ext|external)\s*[:/_-]\s*)?data\s*(\d+)$", re.IGNORECASE)


@dataclass(frozen=True)
class CatalogDataset:
    """One dataset of the collection (fields as published; cells derived, see ``cells_note``)."""

    id: str  # Data12 (primary) or ext:Data12 (external)
    collection: str  # primary | external
    series: str  # DataN as published (restarts per collection)
    geo: str  # Original_Dataset: GEO series (+ subset)
    subgroup: str  # Dataset_subgroup
    source: str
    tissue: str
    cancer_type: str  # Cancer_type_level1
    cancer_subtype: str  # Cancer_type_level2
    therapy: str  # Drug_type: targeted therapy, immunotherapy, chemotherapy
    regimen: str | None
    organism: str
    sample_size: str  # as published, e.g. "pre (resistant 2, sensitive 1)"
    n_samples: int | None
    date: str
    pmid: str
    description: str
    raw_data_id: str
    protocol: str
    processing: str
    cells: int | None = None  # None: only a total shared with other datasets is published
    sensitive_cells: int | None = None
    resistant_cells: int | None = None
    cells_note: str = ""
    names: tuple[str, ...] = field(default=(), repr=False)  # every name that resolves to this dataset

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("names")
        return d


@dataclass(frozen=True)
class Subgroup:
    collection: str
    kind: str  # all | tissue | cancer_type | therapy | regimen
    value: str
    datasets: tuple[str, ...]  # catalog ids
    cells: int
    sensitive: int
    resistant: int


def _read(name: str) -> list[dict[str, str]]:
    text = files(__package__).joinpath(f"resources/{name}").read_text(encoding="utf-8")
    return [{k: " ".join((v or "").split()) for k, v in row.items()}
            for row in csv.DictReader(io.StringIO(text), delimiter="\t")]


def _collection(text: str) -> str:
    return "external" if text.lower().startswith("external") else "primary"


def _cid(collection: str, series: str) -> str:
    return series if collection == "primary" else f"ext:{series}"


def _norm(name: str) -> str:
    return " ".join(str(name).split()).lower()


@cache
def subgroups() -> tuple[Subgroup, ...]:
    """The subgroups table (cells, sensitive, resistant per subgroup), ids as catalog ids."""
    out = []
    for row in _read("scdrugmap_collection_subgroups.tsv"):
        coll = _collection(row["Collections"])
        members = tuple(_cid(coll, s.strip()) for s in row["scDrugMap_collection_series_number"].split(",")
                        if s.strip() and s.strip() != "All")
        out.append(Subgroup(coll, _KINDS[row["Maintask"]], row["Subtask"], members, int(row["samples"]),
                            int(row["sensitive"]), int(row["resistant"])))
    return tuple(out)


def _derive_cells(ids_by_coll: dict[str, list[str]]) -> dict[str, tuple[int, int, int]]:
    """Cells (all, sensitive, resistant) per dataset where the subgroup totals pin them down.

    A subgroup whose members are all known but one gives that one by difference; repeated until
    nothing changes. The "All" row of a collection is a subgroup of every dataset.
    """
    groups: list[tuple[tuple[str, ...], np.ndarray]] = []
    for g in subgroups():
        members = g.datasets if g.kind != "all" else tuple(ids_by_coll[g.collection])
        groups.append((members, np.array([g.cells, g.sensitive, g.resistant])))
    known: dict[str, np.ndarray] = {}
    changed = True
    while changed:
        changed = False
        for members, total in groups:
            unknown = [m for m in members if m not in known]
            if len(unknown) == 1:
                rest = sum((known[m] for m in members if m in known), np.zeros(3, dtype=int))
                value = total - rest
                if (value >= 0).all():
                    known[unknown[0]] = value
                    changed = True
    return {k: (int(v[0]), int(v[1]), int(v[2])) for k, v in known.items()}


@cache
def _catalog() -> tuple[CatalogDataset, ...]:
    rows = _read("scdrugmap_collection_datasets.tsv")
    ids_by_coll: dict[str, list[str]] = {c: [] for c in COLLECTIONS}
    for r in rows:
        coll = _collection(r["Collections"])
        ids_by_coll[coll].append(_cid(coll, r["scDrugMap_collection_series_number"]))
    cells = _derive_cells(ids_by_coll)
    shared: dict[str, Subgroup] = {}
    # The smallest published subgroup holding a dataset whose cells are not derived (cancer-type rows last:
    # one of them lists the wrong datasets, see resources/README.md).
    for g in sorted(subgroups(), key=lambda g: (len(g.datasets), g.kind == "cancer_type")):
        for m in g.datasets:
            if m not in cells and m not in shared:
                shared[m] = g
    out = []
    for r in rows:
        coll = _collection(r["Collections"])
        series = r["scDrugMap_collection_series_number"]
        cid = _cid(coll, series)
        n = cells.get(cid)
        if n is not None:
            note = "derived from the subgroup totals"
        elif cid in shared:
            g = shared[cid]
            note = f"{g.cells:,} cells shared by {', '.join(g.datasets)} ({g.kind} {g.value!r}); not split per dataset"
        else:
            note = "not published"
        geo, sub = r["Original_Dataset"], r["Dataset_subgroup"]
        names = tuple(dict.fromkeys(x for x in (cid, geo, sub, f"{geo}/{sub}" if geo and sub else "") if x))
        total = r["Sample_size_all"]
        out.append(CatalogDataset(
            id=cid, collection=coll, series=series, geo=geo, subgroup=sub, source=r["Source"], tissue=r["Tissue"],
            cancer_type=r["Cancer_type_level1"], cancer_subtype=r["Cancer_type_level2"], therapy=r["Drug_type"],
            regimen=r["Regimen"] or None, organism=r["Organism"], sample_size=r["Sample_size"],
            n_samples=int(total) if total.isdigit() else None, date=r["Date"], pmid=r["PMID"],
            description=r["Description"], raw_data_id=r["RawData_ID"], protocol=r["Extract_protocol"],
            processing=r["Data_processing"], cells=n[0] if n else None, sensitive_cells=n[1] if n else None,
            resistant_cells=n[2] if n else None, cells_note=note, names=names,
        ))
    return tuple(out)


def all_datasets() -> tuple[CatalogDataset, ...]:
    return _catalog()


@cache
def _names(collection: str) -> dict[str, list[str]]:
    """Normalised name -> catalog ids it may mean (GEO names may be shared by several datasets)."""
    table: dict[str, list[str]] = {}
    for d in _catalog():
        for n in d.names:
            ids = table.setdefault(_norm(n), [])
            if d.id not in ids:
                ids.append(d.id)
    # Bare DataN means the given collection's dataset.
    for d in _catalog():
        if d.collection == collection:
            table[_norm(d.series)] = [d.id]
    return table


def resolve(name: str, collection: str = "primary") -> str:
    """The catalog id a dataset name means: ``Data12``, ``ext:Data5`` (``external:Data5``), or an original
    name (``GSE131984_JQ1``, ``GSE164551``, ``GSE161801_PI/GSE161801_pre``). Bare ``DataN`` is a dataset of
    ``collection``. Raises UserError (one line) for unknown or ambiguous names."""
    ids = _lookup(name, collection)
    if not ids:
        raise UserError(f"{name!r} is not a dataset of the scDrugMap catalog; ids are Data1..Data36, ext:Data1.."
                        "ext:Data24 or GEO names (see `scdrugmap-ray datasets list`)")
    if len(ids) > 1:
        raise UserError(f"{name!r} names {len(ids)} catalog datasets ({', '.join(ids)}); use one of those ids or "
                        "GEO/subgroup names such as " + ", ".join(_catalog_by_id()[i].subgroup or i for i in ids[:3]))
    return ids[0]


def _lookup(name: str, collection: str) -> list[str]:
    if collection not in COLLECTIONS:
        raise UserError(f"collection {collection!r}: expected primary or external")
    m = _ID.match(str(name).strip())
    if m:
        coll = "external" if m.group(1) else collection
        cid = _cid(coll, f"Data{int(m.group(2))}")
        return [cid] if cid in _catalog_by_id() else []
    return list(_names(collection).get(_norm(name), []))


@cache
def _catalog_by_id() -> dict[str, CatalogDataset]:
    return {d.id: d for d in _catalog()}


def dataset(name: str, collection: str = "primary") -> CatalogDataset:
    """One dataset by id or original name (see :func:`resolve`)."""
    return _catalog_by_id()[resolve(name, collection)]


def _match(value: str | None, wanted: str | None) -> bool:
    return wanted is None or (value is not None and _norm(wanted) in _norm(value))


def datasets(
    cancer_type: str | None = None,
    tissue: str | None = None,
    therapy: str | None = None,
    regimen: str | None = None,
    collection: str | None = None,
) -> pd.DataFrame:
    """The catalog as a table, filtered (case-insensitive substrings; cancer type matches both levels).

    A filter that matches nothing is a UserError naming the values that exist."""
    if collection is not None and collection not in COLLECTIONS:
        raise UserError(f"--collection {collection!r}: expected primary or external")
    rows = [d for d in _catalog() if collection is None or d.collection == collection]
    for key, wanted in (("cancer_type", cancer_type), ("tissue", tissue), ("therapy", therapy),
                        ("regimen", regimen)):
        if wanted is None:
            continue
        kept = [d for d in rows if _match(getattr(d, key), wanted)
                or (key == "cancer_type" and _match(d.cancer_subtype, wanted))]
        if not kept:
            values = sorted({str(getattr(d, key)) for d in _catalog() if getattr(d, key)})
            raise UserError(f"no catalog dataset matches --{key.replace('_', '-')} {wanted!r}"
                            f"{' here' if len(rows) < len(_catalog()) else ''}; values: {'; '.join(values)}")
        rows = kept
    df = pd.DataFrame([d.to_dict() for d in rows])
    for col in ("cells", "sensitive_cells", "resistant_cells", "n_samples"):
        df[col] = df[col].astype("Int64")
    return df


def subgroups_of(cid: str) -> list[Subgroup]:
    return [g for g in subgroups() if cid in g.datasets]


def subgroup_table(collection: str | None = None) -> pd.DataFrame:
    """Cells per subgroup (tissue, cancer type, therapy, regimen) as published."""
    rows = [{**asdict(g), "datasets": list(g.datasets)} for g in subgroups()
            if collection is None or g.collection == collection]
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------ annotate


@dataclass
class Annotation:
    """What :func:`annotate_columns` did: cells annotated per catalog id, values it did not know."""

    by_id: dict[str, int] = field(default_factory=dict)
    unknown: dict[str, int] = field(default_factory=dict)
    ambiguous: dict[str, list[str]] = field(default_factory=dict)

    def lines(self) -> list[str]:
        out = []
        if self.by_id:
            out.append(f"catalog: {sum(self.by_id.values()):,} cells of {len(self.by_id)} catalog dataset(s) "
                       "annotated (cancer_type, tissue, therapy, regimen)")
        if self.unknown:
            shown = ", ".join(f"{k!r} ({v:,} cells)" for k, v in list(self.unknown.items())[:8])
            out.append(f"warning: catalog does not know dataset(s) {shown}"
                       f"{' and more' if len(self.unknown) > 8 else ''}; their metadata stays as given "
                       "(ids: Data1..Data36, ext:DataN, GEO names; `scdrugmap-ray datasets list`)")
        for k, ids in self.ambiguous.items():
            out.append(f"warning: dataset {k!r} names {len(ids)} catalog datasets ({', '.join(ids)}); not annotated, "
                       "use one of the ids")
        return out


def annotate_columns(
    dataset_values: Sequence[Any] | np.ndarray,
    columns: dict[str, np.ndarray],
    collection: str = "primary",
    n_cells: int | None = None,
) -> Annotation:
    """Fill ``columns[cancer_type|tissue|therapy|regimen]`` (object arrays, None = missing) from the catalog
    entry each cell's dataset value names. Values already present are kept (an explicit column wins).

    Raises UserError when no value at all is a catalog dataset (the wrong column, most likely)."""
    values = pd.Series(np.asarray(dataset_values, dtype=object)).astype(str)
    n = n_cells if n_cells is not None else len(values)
    codes, uniques = pd.factorize(values)
    ann = Annotation()
    counts = np.bincount(codes, minlength=len(uniques))
    found: dict[int, CatalogDataset] = {}
    for i, name in enumerate(uniques):
        ids = _lookup(name, collection)
        if len(ids) == 1:
            found[i] = _catalog_by_id()[ids[0]]
            ann.by_id[ids[0]] = ann.by_id.get(ids[0], 0) + int(counts[i])
        elif ids:
            ann.ambiguous[str(name)] = ids
        else:
            ann.unknown[str(name)] = int(counts[i])
    if not found:
        shown = ", ".join(repr(str(u)) for u in uniques[:5])
        raise UserError(f"catalog: no dataset value is a scDrugMap catalog dataset (values: {shown}); the dataset "
                        "column must hold ids such as Data12 / ext:Data5 or GEO names such as GSE131984_JQ1")
    for col, attr in ANNOTATED.items():
        table = np.array([getattr(found[i], attr) if i in found else None for i in range(len(uniques))],
                         dtype=object)
        filled = table[codes]
        current = columns.get(col)
        if current is None:
            current = np.full(n, None, dtype=object)
        missing = pd.isna(pd.Series(current, dtype=object)).to_numpy()
        out = np.asarray(current, dtype=object).copy()
        out[missing] = filled[missing]
        columns[col] = out
    return ann


def annotate(obs: pd.DataFrame, dataset_key: str = "dataset", collection: str = "primary") -> pd.DataFrame:
    """A copy of ``obs`` (e.g. ``adata.obs``) with cancer_type, tissue, therapy and regimen filled from the
    catalog dataset each cell's ``dataset_key`` names; present values are kept."""
    if dataset_key not in obs.columns:
        raise UserError(f"obs has no column {dataset_key!r}; columns: {', '.join(map(str, obs.columns[:20]))}")
    cols: dict[str, np.ndarray] = {c: obs[c].astype(object).where(obs[c].notna(), None).to_numpy()
                                   for c in ANNOTATED if c in obs.columns}
    annotate_columns(obs[dataset_key].to_numpy(), cols, collection, len(obs))
    out = obs.copy()
    for c, v in cols.items():
        out[c] = v
    return out


def ids(collection: str | None = None) -> list[str]:
    return [d.id for d in _catalog() if collection is None or d.collection == collection]


def cells_of(cids: Iterable[str]) -> tuple[int | None, list[str]]:
    """Total cells of a set of datasets, and the ids whose cells are unknown (shared totals are used when
    the set holds every dataset of the subgroup that shares them)."""
    wanted = list(dict.fromkeys(cids))
    by_id = _catalog_by_id()
    total = 0
    for g in subgroups():  # a whole collection: its published total
        if g.kind == "all" and set(ids(g.collection)) <= set(wanted):
            total += g.cells
            wanted = [c for c in wanted if by_id[c].collection != g.collection]
    pending = [c for c in wanted if by_id[c].cells is None]
    total += sum(by_id[c].cells or 0 for c in wanted)
    covered: set[str] = set()
    # Smallest subgroups first; cancer-type rows last (one of them lists the wrong datasets, see README).
    for g in sorted(subgroups(), key=lambda g: (g.kind == "cancer_type", len(g.datasets))):
        members = set(g.datasets)
        if g.kind == "all" or not members & set(pending) or members & covered:
            continue
        if members <= set(wanted):
            total += g.cells - sum(by_id[m].cells or 0 for m in members)
            covered |= members
    unresolved = [c for c in pending if c not in covered]
    return (total if not unresolved else None), unresolved
