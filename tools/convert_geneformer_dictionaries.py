"""One-off conversion of Geneformer's pickled gene dictionaries into the JSON the package ships.

Geneformer (ctheodoris/Geneformer, Apache-2.0) ships its tokenizer dictionaries as Python pickles.
The package must never unpickle files at run time, so this script (run by a maintainer, on the
official files, whose SHA-256 it records) writes them once as gzipped JSON into
``engine/models/resources/geneformer/``. Geneformer's pickles are read here and nowhere else.

Usage::

    python tools/convert_geneformer_dictionaries.py ../shared/assets/geneformer           # write
    python tools/convert_geneformer_dictionaries.py ../shared/assets/geneformer --check   # compare

What is kept (everything the tokenizer of Geneformer uses, nothing else):

* ``token_dictionary``: Ensembl ID (or special token) -> token id, complete.
* ``gene_median``: non-zero median per gene, restricted to the genes of the token dictionary (the
  V2 median file also holds ~22k genes that have no token; the tokenizer never reads them).
* ``ensembl_mapping``: the gene-ID collapsing dictionary, restricted to entries whose value is in the
  token dictionary, exactly the filter Geneformer's ``TranscriptomeTokenizer.__init__`` applies.
* ``gene_name_id``: gene symbol -> Ensembl ID, restricted to symbols whose ID maps (through
  ``ensembl_mapping``) into the token dictionary: the only ones that can ever give a token.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import pickle
import sys
from pathlib import Path
from typing import Any

OUT_DIR = Path(__file__).resolve().parents[1] / "engine" / "models" / "resources" / "geneformer"

# version tag -> (sub-folder of the assets, dictionary suffix)
VERSIONS = {"V1": ("v1_gc30M", "gc30M"), "V2": ("v2_gc104M", "gc104M")}
NAMES = ("token_dictionary", "gene_median_dictionary", "ensembl_mapping_dict", "gene_name_id_dict")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load_pickle(path: Path) -> dict[Any, Any]:
    # Trusted input: the official files of the Geneformer repository, read once by a maintainer.
    with path.open("rb") as fh:
        obj = pickle.load(fh)
    if not isinstance(obj, dict):
        raise SystemExit(f"{path}: expected a dict, got {type(obj).__name__}")
    return obj


def convert(assets: Path, version: str) -> tuple[dict[str, Any], dict[str, str]]:
    folder, suffix = VERSIONS[version]
    paths = {n: assets / folder / f"{n}_{suffix}.pkl" for n in NAMES}
    sha = {p.name: _sha256(p) for p in paths.values()}
    raw = {n: _load_pickle(p) for n, p in paths.items()}

    tokens = {str(k): int(v) for k, v in raw["token_dictionary"].items()}
    medians = {k: float(raw["gene_median_dictionary"][k]) for k in tokens if not k.startswith("<")}
    mapping = {str(k): str(v) for k, v in raw["ensembl_mapping_dict"].items() if v in tokens}
    names = {str(k): str(v) for k, v in raw["gene_name_id_dict"].items() if mapping.get(str(v).upper()) in tokens}
    doc = {
        "model_version": version,
        "dictionaries": suffix,
        "source": "ctheodoris/Geneformer (Apache-2.0), files " + ", ".join(sorted(sha)),
        "source_sha256": sha,
        "token_dictionary": tokens,
        "gene_median": medians,
        "ensembl_mapping": mapping,
        "gene_name_id": names,
    }
    return doc, sha


def out_path(version: str) -> Path:
    return OUT_DIR / f"geneformer_{VERSIONS[version][1]}.json.gz"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("assets", type=Path, help="folder holding v1_gc30M/ and v2_gc104M/ (the official pickles)")
    ap.add_argument("--check", action="store_true", help="compare the shipped JSON with the pickles; write nothing")
    args = ap.parse_args(argv)
    ok = True
    for version in VERSIONS:
        doc, sha = convert(args.assets, version)
        path = out_path(version)
        if args.check:
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                shipped = json.load(fh)
            same = shipped == doc
            ok &= same
            print(f"{path.name}: {'identical to' if same else 'DIFFERS from'} the pickles")
            continue
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        data = json.dumps(doc, sort_keys=False, separators=(",", ":")).encode()
        # mtime=0: the same input always gives the same bytes
        path.write_bytes(gzip.compress(data, compresslevel=9, mtime=0))
        sizes = {k: len(doc[k]) for k in ("token_dictionary", "gene_median", "ensembl_mapping", "gene_name_id")}
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB): {sizes}; sources: {sha}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
