"""The model contract, once, over every registered foundation model (engine/models/contract.py and
base.py): a random-weight ``tiny`` preset written into the cache, the class attributes every model sets
(LoRA targets, attribution adapter), the one coverage refusal, and a truncated checkpoint refused in one
line, and LoRA targets that are linear layers really called in forward. Model-specific behaviour stays in
tests/test_model_<name>.py."""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from scdrugmap_ray.engine.errors import UserError
from scdrugmap_ray.engine.models import contract
from scdrugmap_ray.engine.models.base import FoundationModel, available_models, get_model, model_class
from scdrugmap_ray.engine.models.contract import AttributionAdapter

# the single-cell foundation models (llama's tiny preset needs the llm extra's tokenizer files)
MODELS = ["geneformer", "tgpt", "scgpt", "scfoundation", "uce", "scbert", "cellplm", "celllm"]

# per model: the checkpoint file its tiny preset writes (the weights), and its max_length / embedding_dim
# where the model's own tests pinned them (None: not pinned)
PRESETS: dict[str, tuple[str, int | None, int | None]] = {
    "celllm": ("", 6000, None),
    "cellplm": ("cellplm_tiny.best.ckpt", 19_374, None),
    "scbert": ("gene2vec_16906.npy", None, None),
    "scfoundation": ("models.ckpt", None, None),
    "scgpt": ("best_model.pt", 1200, 64),
    "uce": ("tiny_model.torch", 1536, None),
    "geneformer": ("", None, None),
    "tgpt": ("", None, None),
}


def test_every_builtin_foundation_model_is_covered() -> None:
    found = {n for n in available_models() if ":" not in n and n != "llama"
             and issubclass(model_class(n), FoundationModel)}
    assert found == set(MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_preset_checkpoint_in_cache(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCDRUGMAP_RAY_CACHE", str(tmp_path))
    model = get_model(name, {"preset": "tiny"})
    assert model.random_weights  # type: ignore[attr-defined]
    weights, max_length, dim = PRESETS[name]
    if weights:
        assert (model.checkpoint_dir() / weights).is_file()  # type: ignore[attr-defined]
    if max_length is not None:
        assert model.max_length == max_length  # type: ignore[attr-defined]
    if dim is not None:
        assert model.embedding_dim == dim  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", MODELS)
def test_class_attributes_of_the_contract(name: str) -> None:
    cls = model_class(name)
    assert cls.lora_targets and all(isinstance(t, str) for t in cls.lora_targets)  # type: ignore[attr-defined]
    assert isinstance(cls.attribution_adapter, AttributionAdapter)  # type: ignore[attr-defined]
    # one threshold: no model module keeps a coverage constant of its own
    module = importlib.import_module(cls.__module__)
    assert getattr(module, "MIN_COVERAGE", contract.MIN_COVERAGE) is contract.MIN_COVERAGE


@pytest.mark.parametrize("name", MODELS)
def test_coverage_refusal_is_the_one_message(name: str) -> None:
    """A store none of whose genes the model knows: the one refusal, naming the share and example genes."""
    genes = pd.DataFrame({"position": np.arange(5, dtype=np.int32),
                          "symbol": [f"NOTAGENE{i}" for i in range(5)],
                          "ensembl_id": pd.array([None] * 5, dtype="string")})
    model = get_model(name, {"preset": "tiny"})
    with pytest.raises(UserError, match=r"^only 0\.0% of the store's 5 genes .*\(store genes look like: "):
        model.make_tokenizer(genes)  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", [n for n in MODELS if PRESETS[n][0] and not PRESETS[n][0].endswith(".npy")])
def test_truncated_checkpoint_is_one_line(name: str, tmp_path: Path) -> None:
    src = get_model(name, {"preset": "tiny"}).checkpoint_dir()  # type: ignore[attr-defined]
    cut = tmp_path / "cut"
    shutil.copytree(src, cut)
    weights = cut / PRESETS[name][0]
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        get_model(name, {"checkpoint": str(cut)}).load()  # type: ignore[attr-defined]


def _scbert_forward(model: object, module: torch.nn.Module) -> None:
    module(torch.zeros(1, 256, dtype=torch.long))  # the same forward as embed, on a short prefix


def _rows(**fields: list[float]) -> dict[str, list[np.ndarray]]:
    return {k: [np.array(v, dtype=np.int32 if k in ("input_ids", "tokens") else np.float32)] for k, v in fields.items()}


# per model: how many modules the LoRA targets name in the tiny preset, and one cell to run forward
LORA_PROBES: dict[str, tuple[int, Any]] = {
    # 4 per layer, 2 layers, and the value encoder's linear1 / linear2
    "scgpt": (4 * 2 + 2, _rows(input_ids=[60_695, 5, 9], values=[-2, 1, 3])),  # <cls> (60,695) and two genes
    # q, k, v, out, w1, w2 per layer, 2 layers; never the unused LM head to_out
    "celllm": (6 * 2, _rows(input_ids=[19_379, 3, 8], tokens=[6, 1, 0])),
    "cellplm": (6 * 2, _rows(input_ids=[1, 5], values=[1.0, 2.0])),  # 6 per layer, 2 layers
    "scfoundation": (4 * 2, _rows(input_ids=[1, 19264, 19265], values=[1.0, 4.0, 3.0])),  # 4 per layer, 2 layers
    "scbert": (4 * 2, _scbert_forward),  # 4 per layer, depth 2
    "uce": (4 * 2, _rows(input_ids=[3, 10, 2])),  # 4 per layer, 2 layers
}


@pytest.mark.parametrize("name", sorted(LORA_PROBES))
def test_lora_targets_are_linear_layers_called_in_forward(name: str) -> None:
    model = get_model(name, {"preset": "tiny"})
    module = model.load()  # type: ignore[attr-defined]
    n_targets, probe = LORA_PROBES[name]
    if name in ("scbert", "uce"):  # the depth of the tiny preset
        depth = model.presets["tiny"]["depth" if name == "scbert" else "nlayers"]  # type: ignore[attr-defined]
        assert n_targets == 4 * depth
    called: set[str] = set()
    targets = [(n, m) for n, m in module.named_modules() if any(n.endswith(t) for t in model.lora_targets)]  # type: ignore[attr-defined]
    assert len(targets) == n_targets
    assert all(any(n.endswith(t) for n, _ in targets) for t in model.lora_targets)  # type: ignore[attr-defined]
    assert not any(n.split(".")[0] == "to_out" for n, _ in targets)  # never a pretraining head
    hooks = []
    for target, mod in targets:
        assert isinstance(mod, torch.nn.Linear)
        hooks.append(mod.register_forward_hook(lambda m, i, o, target=target: called.add(target)))
    try:
        with torch.inference_mode():
            if callable(probe):
                probe(model, module)
            else:
                model.embed(module, model.collate(probe))  # type: ignore[attr-defined]
    finally:
        for h in hooks:
            h.remove()
    assert called == {n for n, _ in targets}
    assert not any(isinstance(m, torch.nn.MultiheadAttention) for m in module.modules())


def test_config_sizes_have_one_check() -> None:
    assert contract.positive_int({"n": 3}, "n", "X config") == 3
    for bad in (0, -1, True, 2.0, None):
        with pytest.raises(UserError, match=r"^X config: n = .*, expected a positive integer$"):
            contract.positive_int({"n": bad}, "n", "X config")
