"""The model contract, once, over every registered foundation model (engine/models/contract.py and
base.py): a random-weight ``tiny`` preset written into the cache, the class attributes every model sets
(LoRA targets, attribution adapter), the one coverage refusal, and a truncated checkpoint refused in one
line. Model-specific behaviour stays in tests/test_model_<name>.py."""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
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
