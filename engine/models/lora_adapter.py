"""LoRA adapter I/O: the saved fine-tuned model's layout and formats, writing its weights and loading it
back (the backbone with the adapter merged in, and the classifier head). It sits with the models, below
the pipeline and training: the embedding actors, the registry and the LoRA recipe (engine/train/lora) all
load or write it.

A saved model directory holds the adapter in PEFT's format (``adapter/adapter_config.json`` +
``adapter/adapter_model.safetensors``), ``head.safetensors`` + ``head.json``, ``config.json`` (model name,
options, checkpoint digest, LoRA and training settings), ``genes.parquet`` and ``metrics.json``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from ..fsutil import write_json
from .base import FoundationModel, get_model

if TYPE_CHECKING:
    from torch import nn

MODEL_DIR = "model"
ADAPTER_DIR = "adapter"
HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "head.json"
CONFIG = "config.json"
GENES = "genes.parquet"
METRICS = "metrics.json"


def build_head(dim: int, hidden: int, dropout: float = 0.1) -> nn.Module:
    """scDrugMap's classifier (d -> hidden -> hidden -> 2, ReLU, dropout), or linear when hidden=0."""
    from torch import nn

    if hidden == 0:
        return nn.Linear(dim, 2)
    return nn.Sequential(
        nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, 2),
    )


def save_weights(directory: Path, peft_backbone: Any, state: dict[str, Any], head_meta: dict[str, Any]) -> None:
    """Adapter (PEFT's own format) and head into ``directory``; ``peft_backbone`` takes the saved state."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import save_file

    set_peft_model_state_dict(peft_backbone, state["adapter"])
    peft_backbone.save_pretrained(str(directory / ADAPTER_DIR))
    save_file({k: v.contiguous() for k, v in state["head"].items()}, str(directory / HEAD_WEIGHTS))
    write_json(directory / HEAD_CONFIG, head_meta)


def load_config_and_head(model_dir: Path) -> tuple[FoundationModel, dict[str, Any], nn.Module]:
    """(model, its config.json, the head with its weights) of a saved model directory."""
    from safetensors.torch import load_file

    if not (model_dir / CONFIG).is_file():
        raise UserError(f"{model_dir} is not a fine-tuned model directory (no {CONFIG}); point at <out>/{MODEL_DIR}")
    cfg = json.loads((model_dir / CONFIG).read_text())
    fm = get_model(cfg["model"], cfg["model_options"])
    head = build_head(int(cfg["head"]["dim"]), int(cfg["head"]["hidden"]))
    head.load_state_dict(load_file(str(model_dir / HEAD_WEIGHTS)), strict=True)
    return fm, cfg, head.eval()  # type: ignore[return-value]


def load_finetuned(
    model_dir: Path, device: str = "cpu", dtype: Any = None
) -> tuple[FoundationModel, nn.Module, nn.Module]:
    """(model, backbone with the adapter merged in, head) from a saved fine-tuned model directory."""
    from peft import PeftModel

    model_dir = Path(model_dir)
    fm, _, head = load_config_and_head(model_dir)
    backbone = fm.load(device=device, dtype=dtype)  # type: ignore[attr-defined]
    merged = PeftModel.from_pretrained(backbone, str(model_dir / ADAPTER_DIR)).merge_and_unload()
    return fm, merged.eval(), head.to(device)


def remove_training_state(out_dir: Path) -> None:
    """Delete the resumable training state once the model is exported (saves disk)."""
    shutil.rmtree(Path(out_dir) / "ray", ignore_errors=True)


def load_adapter(fm: FoundationModel, lora_dir: Path, device: str = "cpu", dtype: Any = None) -> tuple[Any, Any]:
    """(backbone with the adapter merged in, head) of a saved model directory, on a model whose options the
    caller resolved (the registry's: a copied checkpoint lives beside the model)."""
    # peft and torch load only when a LoRA model is
    from peft import PeftModel
    from safetensors.torch import load_file

    lora_dir = Path(lora_dir)
    cfg = json.loads((lora_dir / CONFIG).read_text())
    head = build_head(int(cfg["head"]["dim"]), int(cfg["head"]["hidden"]))
    head.load_state_dict(load_file(str(lora_dir / HEAD_WEIGHTS)), strict=True)
    backbone = fm.load(device=device, dtype=dtype)
    merged = PeftModel.from_pretrained(backbone, str(lora_dir / ADAPTER_DIR)).merge_and_unload()
    return merged.eval(), head.eval()
