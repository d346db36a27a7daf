"""Write UCE's ``species_offsets.pkl`` as ``species_offsets.json`` (the same dict) beside it.

The package reads ``species_offsets.pkl`` with an unpickler that refuses every global: a dict of species
name -> int needs none. If the official file stores its numbers as numpy integers, that read fails and
points here. This script accepts exactly the two globals numpy needs to rebuild a scalar
(``numpy.dtype`` and ``numpy.core.multiarray.scalar`` / ``numpy._core.multiarray.scalar``), checks that the
result is a dict of str -> integer, and writes plain JSON; the package then reads the JSON.

Usage::

    python tools/convert_uce_assets.py CHECKPOINT_DIR          # writes CHECKPOINT_DIR/species_offsets.json
"""

from __future__ import annotations

import argparse
import io
import json
import pickle
import sys
from pathlib import Path
from typing import Any

_ALLOWED = {
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
}


class _NumpyScalarsOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} refused")
        import importlib

        return getattr(importlib.import_module(module), name)


def convert(ckpt: Path) -> Path:
    src = ckpt / "species_offsets.pkl"
    obj = _NumpyScalarsOnly(io.BytesIO(src.read_bytes())).load()
    if not isinstance(obj, dict):
        raise SystemExit(f"{src}: expected a dict of species -> offset, found {type(obj).__name__}")
    out: dict[str, int] = {}
    for k, v in obj.items():
        if not isinstance(k, str) or int(v) != v:
            raise SystemExit(f"{src}: entry {k!r}: {v!r} is not species name -> integer")
        out[k] = int(v)
    dst = ckpt / "species_offsets.json"
    dst.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="UCE checkpoint directory holding species_offsets.pkl")
    args = parser.parse_args(argv)
    print(convert(args.checkpoint))
    return 0


if __name__ == "__main__":
    sys.exit(main())
