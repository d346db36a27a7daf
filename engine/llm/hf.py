"""A Hugging Face causal language model directory as the LLM arm reads it: its ``config.json`` (refused
unless it is a causal LM) and its tokenizer (cached). Both the Llama embedding model and the chat
backends use them."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from ..errors import UserError


def read_config(path: Path) -> dict[str, Any]:
    """config.json of a Hugging Face directory; refuse anything that is not a causal LM."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"{path} is not a Hugging Face model directory (no config.json)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError as err:
        raise UserError(f"{cfg_file} is not valid JSON ({err})") from None
    archs = cfg.get("architectures") or []
    if not any(str(a).endswith("ForCausalLM") for a in archs):
        raise UserError(
            f"{path} is not a causal language model (architectures: {archs or 'none'}; expected e.g. "
            "LlamaForCausalLM): point 'checkpoint' at a Llama directory such as Meta-Llama-3-8B"
        )
    return cfg


@functools.lru_cache(maxsize=4)
def hf_tokenizer(path: str) -> Any:
    """The tokenizer of a model directory (cached: four at most); a UserError when it has none."""
    from transformers import AutoTokenizer  # heavy: only when a tokenizer is wanted

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: no usable tokenizer ({str(err).splitlines()[0]})") from None
