"""The cell store's schema and the drug-response label vocabulary."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from ..errors import UserError

# 2: an int64 ``row`` column (the cell's global, stable position in the store) after ``cell_id``
SCHEMA_VERSION = 2
METADATA_COLUMNS = ("dataset", "sample", "cancer_type", "tissue", "therapy", "regimen")

SHARD_SCHEMA = pa.schema(
    [
        ("cell_id", pa.string()),
        ("row", pa.int64()),
        ("gene_index", pa.list_(pa.int32())),
        ("value", pa.list_(pa.float32())),
        ("n_counts", pa.float64()),
        ("n_genes", pa.int32()),
        ("label", pa.int8()),
        *[(c, pa.string()) for c in METADATA_COLUMNS],
    ]
)

# Spellings seen in drug-response annotations. Single letters ("S", "R") are never guessed: in some
# collections "R" means responder, in others resistant.
SENSITIVE = ("sensitive", "sensitivity", "responder", "response", "responsive", "1", "1.0", "true", "yes")
RESISTANT = (
    "resistant", "resistance", "non-responder", "nonresponder", "non_responder", "non responder",
    "non-response", "no response", "non-responsive", "0", "0.0", "false", "no",
)
UNKNOWN_PREFIXES = ("ambiguous", "unlabel", "unknown", "undetermined")
UNKNOWN = ("", "nan", "none", "unknown", "unlabeled", "unlabelled", "na", "n/a", "ambiguous", "<na>")


def _norm(value: object) -> str:
    return str(value).strip().lower()


def parse_labels(
    values: pd.Series, sensitive: Sequence[str] = (), resistant: Sequence[str] = ()
) -> tuple[np.ndarray, dict[str, list[str]]]:
    """Map label values to 1 (sensitive), 0 (resistant) or -1 (unknown).

    User-given values (``--sensitive``/``--resistant``) come first; then common spellings. Anything
    else is an error that names the values and how to map them.
    """
    user_s = {_norm(v) for v in sensitive}
    user_r = {_norm(v) for v in resistant}
    if user_s & user_r:
        raise UserError(f"label value(s) {sorted(user_s & user_r)} given as both --sensitive and --resistant")
    # Work on the distinct raw values only: a million cells have a handful of label values.
    raw_codes, raw_uniques = pd.factorize(values.astype(object).where(values.notna(), ""), use_na_sentinel=False)
    normed_uniques = np.array([_norm(u) for u in raw_uniques], dtype=object)
    mapping: dict[str, int] = {}
    unrecognised = []
    for u in dict.fromkeys(normed_uniques):
        if u in user_s:
            mapping[u] = 1
        elif u in user_r:
            mapping[u] = 0
        elif u in UNKNOWN or u.startswith(UNKNOWN_PREFIXES):
            mapping[u] = -1
        elif u in SENSITIVE:
            mapping[u] = 1
        elif u in RESISTANT:
            mapping[u] = 0
        else:
            unrecognised.append(u)
    if unrecognised:
        per_raw = np.bincount(raw_codes, minlength=len(raw_uniques))
        counts = pd.Series(per_raw, index=normed_uniques).groupby(level=0).sum()
        counts = counts[counts.index.isin(unrecognised)].sort_values(ascending=False, kind="stable")
        shown = ", ".join(f"{v!r} ({n} cells)" for v, n in counts.head(5).items())
        more = f" and {len(counts) - 5} more" if len(counts) > 5 else ""
        raise UserError(
            f"unrecognised label value(s) {shown}{more}: map them with --sensitive VALUE / --resistant VALUE "
            "(or sensitive:/resistant: in the benchmark YAML)"
        )
    codes = np.array([mapping[u] for u in normed_uniques], dtype=np.int8)[raw_codes]
    report = {
        "sensitive": sorted(k for k, v in mapping.items() if v == 1),
        "resistant": sorted(k for k, v in mapping.items() if v == 0),
        "unknown": sorted(k for k, v in mapping.items() if v == -1),
    }
    return codes, report
