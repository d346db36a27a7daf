"""Reading weight files safely: ``torch.load(weights_only=True)`` (memory-mapped for zip archives) or
safetensors, never arbitrary pickles. Every failure is one UserError naming the file. ``check_state`` is
the one loading rule of every model: the embedding path's tensors strict, the heads a released file
carries beside them skipped and named in one log line, anything else an error."""

from __future__ import annotations

import logging
import pickle
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import UserError

log = logging.getLogger(__name__)


def load_weights_file(path: Path, resave_hint: str) -> Any:
    """The file's contents. ``resave_hint`` tells how to re-save a file that holds Python objects
    beyond tensors, strings and numbers (which weights_only refuses)."""
    import torch

    try:
        if path.name.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
            what = found.group(1) if found else "non-tensor Python objects"
            raise UserError(
                f"{path} holds Python objects ({what}) that cannot be loaded safely (torch.load weights_only); "
                f"{resave_hint}"
            ) from None
        raise UserError(f"truncated or corrupt checkpoint file {path} ({type(err).__name__})") from None
    except Exception as err:  # safetensors, zip and unpickling errors all mean the same to a user
        first = str(err).splitlines()[0][:160] if str(err) else ""
        raise UserError(f"truncated or corrupt checkpoint file {path} ({type(err).__name__}: {first})") from None


def read_state_dict(path: Path) -> dict[str, Any]:
    """A plain state dict (name -> tensor) from a .safetensors or torch file."""
    import torch

    state = load_weights_file(path, "save the model's state dict only")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"checkpoint file {path} does not hold a state dict of tensors")
    return state


def short_keys(keys: list[str], n: int = 5) -> str:
    """The first ``n`` of some state-dict keys, sorted, for a one-line error ("a, b and 7 more")."""
    keys = sorted(keys)
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


#: a key filter: regular expressions (matched from the key's start) or a predicate
KeyFilter = Callable[[str], bool] | tuple[str, ...] | list[str]


def _matcher(keys: KeyFilter | None) -> Callable[[str], bool]:
    if keys is None:
        return lambda _k: False
    if callable(keys):
        return keys
    patterns = [re.compile(p) for p in keys]
    return lambda k: any(p.match(k) for p in patterns)


def name_keys(keys: list[str]) -> str:
    """All of ``keys`` for one log line, with layer indices folded: ``decoder.layers.*.norm.weight (x6)``."""
    groups: dict[str, int] = {}
    for k in keys:
        folded = re.sub(r"(?<=\.)\d+(?=\.|$)", "*", k)
        groups[folded] = groups.get(folded, 0) + 1
    return ", ".join(f"{g} (x{n})" if n > 1 else g for g, n in sorted(groups.items()))


def check_state(state: dict[str, Any], expected: dict[str, tuple[int, ...]], where: str, architecture: str,
                needs: str = "the architecture", *, skip: KeyFilter | None = None,
                ignore: Callable[[str], bool] | None = None, prefix: str = "") -> dict[str, Any]:
    """The one loading rule of every model: the tensors the embedding path needs (``expected``) must all
    be there with their shapes, loaded strictly; tensors a released file carries that the embedding never
    runs (``skip``: pretraining heads, classifier heads, legacy buffers) are dropped and NAMED in one log
    line; any other key is an error (a file of another architecture or size). Errors are one line naming
    the keys (shown with ``prefix``, the file's own key prefix); ``needs`` says what sets a shape.
    Returns the expected tensors only. (``ignore`` is the older name of ``skip`` as a predicate.)"""
    import torch

    skipped_ok = _matcher(skip if skip is not None else ignore)
    missing = [prefix + k for k in expected if k not in state]
    skipped = [str(k) for k in state if k not in expected and skipped_ok(str(k))]
    unexpected = [prefix + str(k) for k in state if k not in expected and not skipped_ok(str(k))]
    if missing or unexpected:
        parts = [f"missing keys: {short_keys(missing)}"] if missing else []
        parts += [f"unexpected keys: {short_keys(unexpected)}"] if unexpected else []
        raise UserError(f"{where} does not match {architecture}; " + "; ".join(parts))
    for k, shape in expected.items():
        val = state[k]
        if not isinstance(val, torch.Tensor) or tuple(val.shape) != tuple(shape):
            got = tuple(val.shape) if isinstance(val, torch.Tensor) else type(val).__name__
            raise UserError(f"{where}: key {prefix}{k} has shape {got}, {needs} needs {tuple(shape)}")
    if skipped:
        log.info("%s: skipped %d tensor(s) the embedding does not use: %s", where, len(skipped),
                 name_keys([prefix + k for k in skipped]))
    return {k: state[k] for k in expected}


def materialize(build: Callable[[], Any], state: dict[str, Any], device: str = "cpu", dtype: Any = None) -> Any:
    """The module ``build()`` makes, built on the meta device (no random initialisation to throw away),
    holding the checkpoint's tensors (strict), on ``device`` in ``dtype`` (float32 by default: assign=True
    keeps the checkpoint's tensors as they are, possibly memory-mapped, possibly half precision), in eval mode.
    The one way every model loads its checked state (``check_state``)."""
    import torch

    with torch.device("meta"):
        module = build()
    if any(b.is_meta for b in module.buffers()):
        # non-persistent buffers (Hugging Face models' position ids, causal masks) are in no state dict:
        # build for real and copy the checkpoint's tensors in
        module = build()
        module.load_state_dict(state, strict=True)
    else:
        module.load_state_dict(state, strict=True, assign=True)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return module.to(device=device, dtype=torch.float32 if dtype is None else dtype).eval()
