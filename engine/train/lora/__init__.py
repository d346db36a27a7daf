"""The ``lora`` strategy (scDrugMap's "FT"): a foundation model with PEFT LoRA adapters plus a classifier
head, trained end to end with Ray Train.

One job a module:

* ``recipe``: the settings, PEFT wiring (targets, classifier), the labelled Ray Dataset and the Ray Train
  loop (``finetune``), ending with the export of the best epoch;
* ``engine/models/lora_adapter``: the saved model's layout and formats, writing its weights, loading it
  back (``load_finetuned``, ``load_adapter``); it sits with the models because the embedding pipeline
  and the registry load it too (re-exported here);
* ``predict``: p(sensitive) and embeddings of cells with a saved model (``predict_finetuned``).

The names below are the package's public seams; import them from here.
"""

from __future__ import annotations

from ...models.lora_adapter import (
    ADAPTER_DIR,
    CONFIG,
    GENES,
    HEAD_CONFIG,
    HEAD_WEIGHTS,
    METRICS,
    MODEL_DIR,
    build_head,
    load_adapter,
    load_config_and_head,
    load_finetuned,
    remove_training_state,
    save_weights,
)
from .predict import predict_finetuned
from .recipe import (
    LORA_KEYS,
    FinetuneResult,
    LabelledCells,
    LoraSettings,
    StepBar,
    StepCounter,
    add_lora,
    class_weights,
    contributing_linear_modules,
    enable_gradient_checkpointing,
    finetune,
    labelled_dataset,
    linear_module_names,
    make_classifier,
    probe_cell,
    resolve_scaling,
    resolve_targets,
    train_loop_per_worker,
)

__all__ = [
    "ADAPTER_DIR", "CONFIG", "GENES", "HEAD_CONFIG", "HEAD_WEIGHTS", "LORA_KEYS", "METRICS", "MODEL_DIR",
    "FinetuneResult", "LabelledCells", "LoraSettings", "StepBar", "StepCounter", "add_lora", "build_head",
    "class_weights",
    "contributing_linear_modules", "enable_gradient_checkpointing", "finetune", "labelled_dataset",
    "linear_module_names", "load_adapter", "load_config_and_head", "load_finetuned", "make_classifier",
    "predict_finetuned", "probe_cell", "remove_training_state", "resolve_scaling", "resolve_targets",
    "save_weights", "train_loop_per_worker",
]
