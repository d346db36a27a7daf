"""The ``lora`` strategy (scDrugMap's "FT"): a foundation model with PEFT LoRA adapters plus a
classifier head, trained end to end with Ray Train (DDP: gloo on CPU, NCCL on GPU).

Data flow: the fold's labelled training / validation cells are read from the cell store and
tokenized by Ray Data; every worker reads its shard (``ray.train.get_dataset_shard``). One optimizer
step takes ``batch_cells`` cells in all (split evenly over the workers); each worker cuts its share
into token-budget micro-batches and accumulates gradients, synchronising only after the last one, so
the step's gradient is the class-weighted mean over the global batch whatever the number of workers.

Model selection: the validation loss after each epoch picks the best epoch (early stopping with
``patience``); the test fold is never seen. Each epoch ends with a ``ray.train.Checkpoint`` holding the
adapter, head, optimizer and the best weights so far, so a run killed mid-way resumes from its last
epoch when started again with the same output directory.

Saved model (``<out>/model``): the adapter in PEFT's format (``adapter/adapter_config.json`` +
``adapter/adapter_model.safetensors``), ``head.safetensors`` + ``head.json``, ``config.json`` (model
name, options, checkpoint digest, LoRA and training settings), ``genes.parquet`` (the training store's
genes) and ``metrics.json``: everything ``load_finetuned`` needs, without the training state.

Progress: the workers' ``ray.train.report`` goes to Ray Train's controller, not the driver, so the driver's
bar (optimizer steps done of all, steps/s, loss) is fed by a small actor (``StepCounter``) that rank 0 tells
of each step, fire-and-forget, and the driver polls.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ...data.store import CellStore
from ...errors import UserError
from ...fsutil import atomic_dir, write_json
from ...models.base import FoundationModel, get_model
from ...models.lora_adapter import CONFIG, GENES, HEAD_WEIGHTS, METRICS, MODEL_DIR, build_head, save_weights
from ...pipeline.embed import SharedArray, member_mask, token_budget_batches, tokenize_rows
from ...progress import progress_bar, rate_text
from ...runtime import init_ray, quiet_ray_data, user_errors

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

#: what a lora unit may be configured with in the benchmark YAML (``lora:`` block, per model too)
LORA_KEYS = (
    "r", "alpha", "dropout", "targets", "epochs", "lr", "head_lr", "weight_decay", "batch_cells",
    "batch_tokens", "patience", "gradient_checkpointing", "precision", "workers", "cpus_per_worker",
    "use_gpu", "hidden", "head_dropout", "backbone_dropout", "shuffle_buffer_cells",
    "full_shuffle_cells",
)


@dataclass
class LoraSettings:
    """LoRA and training settings. Defaults: the paper's r=8, alpha=8, dropout=0.05."""

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.05
    targets: list[str] | None = None  # None: the model's lora_targets
    epochs: int = 10
    lr: float = 1e-4  # adapter learning rate
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    batch_cells: int = 32  # global batch (all workers together)
    batch_tokens: int = 16_384  # per micro-batch on one worker
    patience: int = 3
    gradient_checkpointing: bool = False
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU | fp32 | bf16
    workers: int | None = None  # None: one per GPU of the cluster when it has GPUs, else 1
    cpus_per_worker: float = 1.0
    use_gpu: bool | None = None  # None: when the cluster has GPUs
    shuffle_buffer_cells: int = 2048  # each worker's shuffle buffer, reseeded every epoch
    full_shuffle_cells: int = 100_000  # up to this many training cells, a global shuffle (else block order)
    hidden: int = 512  # the MLP head's width (scDrugMap: d -> 512 -> 512 -> 2); 0: a linear head
    head_dropout: float = 0.1
    backbone_dropout: bool = True  # the frozen model's own dropout layers active while training
    seed: int = 0

    @classmethod
    def from_options(cls, options: dict[str, Any], seed: int = 0) -> LoraSettings:
        unknown = sorted(set(options) - set(LORA_KEYS))
        if unknown:
            raise UserError(f"unknown lora setting(s) {', '.join(unknown)}; allowed: {', '.join(LORA_KEYS)}")
        s = cls(**{**options, "seed": seed})
        checks = [
            (s.r >= 1, "r must be >= 1"),
            (s.alpha > 0, "alpha must be > 0"),
            (0 <= s.dropout < 1, "dropout must be in [0, 1)"),
            (s.epochs >= 1, "epochs must be >= 1"),
            (s.lr > 0 and s.head_lr > 0, "learning rates must be > 0"),
            (s.workers is None or s.workers >= 1, "workers must be >= 1"),
            (s.batch_cells >= (s.workers or 1), "batch_cells must be at least the number of workers"),
            (s.shuffle_buffer_cells >= 0, "shuffle_buffer_cells must be >= 0"),
            (s.batch_tokens >= 1, "batch_tokens must be >= 1"),
            (s.precision in ("auto", "fp32", "bf16"), "precision must be auto, fp32 or bf16"),
            (s.hidden >= 0, "hidden must be >= 0"),
            (0 <= s.head_dropout < 1, "head_dropout must be in [0, 1)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(f"lora settings: {msg}")
        return s


# ----------------------------------------------------------------------------------------- modules


def _cell_classifier_class() -> type:
    from torch import nn

    class CellClassifier(nn.Module):
        """Backbone (with adapters) -> the model's own embedding rule -> head -> two logits."""

        def __init__(self, fm: FoundationModel, backbone: nn.Module, head: nn.Module) -> None:
            super().__init__()
            self.backbone = backbone
            self.head = head
            self._fm = fm  # not a module: the embedding rule and collate of this model

        def forward(self, batch: dict[str, Any]) -> torch.Tensor:
            return self.head(self._fm.embed(self.backbone, batch).float())

    return CellClassifier


def make_classifier(fm: FoundationModel, backbone: nn.Module, head: nn.Module) -> nn.Module:
    return _cell_classifier_class()(fm, backbone, head)


def _linear_types() -> tuple[type, ...]:
    """nn.Linear, and the transposed Conv1D of GPT-2 style models (tGPT): PEFT adapts both."""
    from torch import nn

    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


def linear_module_names(module: nn.Module) -> list[str]:
    types = _linear_types()
    return [name for name, m in module.named_modules() if isinstance(m, types)]


def contributing_linear_modules(fm: FoundationModel, backbone: nn.Module, probe: dict[str, Any]) -> list[str]:
    """Names of the backbone's nn.Linear modules whose output reaches the cell embedding, found by one
    probe forward pass: a module called but not used (a pooler, a layer after the one the embedding is
    read from) would get an adapter that never trains, and DDP refuses parameters without gradients."""
    import torch

    leaves: dict[str, list[torch.Tensor]] = {}

    def hook(name: str) -> Any:
        def add_leaf(_m: nn.Module, _inp: Any, out: Any) -> Any:
            if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                return None
            leaf = torch.zeros_like(out, requires_grad=True)  # d(emb)/d(leaf) = d(emb)/d(out)
            leaves.setdefault(name, []).append(leaf)
            return out + leaf

        return add_leaf

    types = _linear_types()
    handles = [m.register_forward_hook(hook(n)) for n, m in backbone.named_modules() if isinstance(m, types)]
    try:
        with torch.enable_grad():
            emb = fm.embed(backbone, fm.collate(probe))  # type: ignore[attr-defined]
            names = list(leaves)
            flat = [t for n in names for t in leaves[n]]
            grads = torch.autograd.grad(emb.float().sum(), flat, allow_unused=True) if flat else []
    finally:
        for h in handles:
            h.remove()
    used, i = [], 0
    for n in names:
        k = len(leaves[n])
        if any(g is not None for g in grads[i : i + k]):
            used.append(n)
        i += k
    return used


def resolve_targets(
    fm: FoundationModel, backbone: nn.Module, targets: list[str] | None, probe: dict[str, Any]
) -> list[str]:
    """The full names of the modules LoRA wraps: nn.Linear modules matching a target suffix (the
    model's ``lora_targets`` by default) whose output reaches the embedding. A target that matches no
    linear module, or only unused ones, is a UserError naming what exists."""
    targets = list(targets or fm.lora_targets)
    if not targets:
        raise UserError(f"model {fm.name!r} declares no LoRA targets; give lora.targets in the benchmark")
    names = linear_module_names(backbone)
    used = set(contributing_linear_modules(fm, backbone, probe))
    chosen: list[str] = []
    for t in targets:
        matches = [n for n in names if n == t or n.endswith("." + t)]
        if not matches:
            suffixes = sorted({".".join(n.split(".")[-2:]) for n in names})
            raise UserError(
                f"LoRA target {t!r} matches no linear module of {fm.name!r}; its linear modules end in: "
                f"{', '.join(suffixes)}"
            )
        live = [n for n in matches if n in used]
        if not live:
            raise UserError(
                f"LoRA target {t!r} of {fm.name!r} matches only modules that do not affect the cell embedding "
                f"({', '.join(matches[:3])}{' ...' if len(matches) > 3 else ''}); choose other targets"
            )
        dropped = len(matches) - len(live)
        if dropped:
            log.info("LoRA target %r: %d of %d matching modules do not affect the embedding; skipped",
                     t, dropped, len(matches))
        chosen.extend(n for n in live if n not in chosen)
    return chosen


def add_lora(fm: FoundationModel, backbone: nn.Module, settings: LoraSettings, probe: dict[str, Any]) -> Any:
    """Wrap the backbone with PEFT LoRA adapters (in place); only adapter weights require grad."""
    from peft import LoraConfig, get_peft_model
    from torch import nn

    targets = resolve_targets(fm, backbone, settings.targets, probe)
    modules = dict(backbone.named_modules())
    # GPT-2's Conv1D stores its weight transposed (in x out)
    transposed = any(not isinstance(modules[t], nn.Linear) for t in targets)
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=targets, bias="none", fan_in_fan_out=transposed)
    peft_model = get_peft_model(backbone, config)
    if settings.gradient_checkpointing:
        enable_gradient_checkpointing(backbone)
    return peft_model


def enable_gradient_checkpointing(module: nn.Module) -> int:
    """Recompute each layer of the model's layer stack (its longest nn.ModuleList) in backward instead
    of storing activations: long sequences (scBERT 16,907 tokens) fit in less memory."""
    from torch import nn
    from torch.utils.checkpoint import checkpoint

    stacks = [m for m in module.modules() if isinstance(m, nn.ModuleList)]
    if not stacks:
        raise UserError("gradient_checkpointing: this model has no layer stack (nn.ModuleList) to checkpoint")
    layers = max(stacks, key=len)

    def run(forward: Any, *args: Any, **kwargs: Any) -> Any:
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    for layer in layers:
        layer.forward = functools.partial(run, layer.forward)  # type: ignore[method-assign]
    return len(layers)


# -------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class LabelledCells:
    """Cells to train on, by store row: ``rows`` int64 (any order) and their 0/1 ``labels``. What a task
    needs of them travels once, as arrays in the object store, never as a Python dict of cell ids."""

    rows: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        order = np.argsort(np.asarray(self.rows, dtype=np.int64), kind="stable")
        object.__setattr__(self, "rows", np.asarray(self.rows, dtype=np.int64)[order])
        object.__setattr__(self, "labels", np.asarray(self.labels, dtype=np.float64)[order].astype(np.int64))

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def of(cls, store: CellStore, cells: LabelledCells | Mapping[str, int]) -> LabelledCells:
        """From a mapping cell_id -> label (API convenience: ids are looked up once, here) or as is."""
        if isinstance(cells, LabelledCells):
            return cells
        ids = list(cells)
        return cls(store.rows_of(ids), np.fromiter((int(cells[c]) for c in ids), dtype=np.int64, count=len(ids)))


def _tokenize_labelled(batch: dict[str, np.ndarray], tokenizer: Any, rows: SharedArray,
                       labels: SharedArray) -> Any:
    """Keep the wanted cells of a batch of store rows, tokenize them and add their ``label`` column."""
    import pyarrow as pa

    mask, pos = member_mask(batch["row"], rows.get())
    kept = {k: v[mask] for k, v in batch.items()}
    table = tokenize_rows(kept, tokenizer)
    return table.append_column("label", pa.array(labels.get()[pos[mask]], type=pa.int64()))


def labelled_dataset(fm: FoundationModel, store: CellStore, cells: LabelledCells, block_cells: int = 256) -> Any:
    """A streaming Ray Dataset of the given cells, tokenized, with a ``label`` column; only the shards
    holding them are read, and block order is shuffled (seeded) so that training batches do not follow the
    store's (often sample-sorted) order."""
    import ray

    tokenizer = fm.make_tokenizer(store.genes)
    paths = [str(store.shard_paths[s]) for s in store.shards_of(cells.rows)]
    ds = ray.data.read_parquet(paths, columns=["cell_id", "row", "gene_index", "value"])
    ds = ds.map_batches(_tokenize_labelled, fn_args=(tokenizer, SharedArray(cells.rows), SharedArray(cells.labels)),
                        batch_size=block_cells, batch_format="numpy")
    return ds


def probe_cell(fm: FoundationModel, store: CellStore, row: int) -> dict[str, list[np.ndarray]]:
    """One tokenized cell (ragged fields, no cell_id): enough to find the embedding width and which
    modules reach the embedding, without starting Ray."""
    x = store.read_csr(np.array([row]))
    cell_id = store.read_cell_ids(np.array([row]))[0]
    tokenized = fm.make_tokenizer(store.genes)(  # type: ignore[attr-defined]
        np.array([cell_id]), [x.indices.astype(np.int32)], [x.data.astype(np.float32)]
    )
    return {k: [v[0]] for k, v in tokenized.items()}


def _rows_of(batch: dict[str, Any], idx: np.ndarray, fields: list[str]) -> dict[str, list[np.ndarray]]:
    return {k: [batch[k][i] for i in idx] for k in fields}


# ------------------------------------------------------------------------------------- worker loop


def _dist() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _all_sum(values: list[float], device: Any) -> list[float]:
    import torch

    dist = _dist()
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist is not None:
        dist.all_reduce(t)
    return t.tolist()


def _all_gather(obj: Any) -> list[Any]:
    dist = _dist()
    if dist is None:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _trainable_state(peft_backbone: Any, head: nn.Module) -> dict[str, Any]:
    from peft import get_peft_model_state_dict

    return {
        "adapter": {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(peft_backbone).items()},
        "head": {k: v.detach().cpu().clone() for k, v in head.state_dict().items()},
    }


def _autocast(device: Any, precision: str) -> Any:
    import torch

    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.nn.functional as F
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    settings = LoraSettings(**config["settings"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(settings.cpus_per_worker)))
    torch.manual_seed(settings.seed)  # the same initial head and adapters on every worker

    fm = get_model(config["model_name"], config["model_options"])
    backbone = fm.load(device="cpu")  # type: ignore[attr-defined]
    with torch.no_grad():  # the embedding width, from one real cell
        probe = fm.collate(config["probe"])  # type: ignore[attr-defined]
        dim = int(fm.embed(backbone, probe).shape[1])  # type: ignore[attr-defined]
    peft_backbone = add_lora(fm, backbone, settings, config["probe"])
    head = build_head(dim, settings.hidden, settings.head_dropout)
    head_meta = {"dim": dim, "hidden": settings.hidden}
    classifier = make_classifier(fm, backbone, head)
    classifier = ray.train.torch.prepare_model(classifier)
    inner = classifier.module if hasattr(classifier, "module") else classifier
    ddp = inner is not classifier

    lora_params = [p for n, p in inner.backbone.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [{"params": lora_params, "lr": settings.lr}, {"params": list(inner.head.parameters()), "lr": settings.head_lr}],
        weight_decay=settings.weight_decay,
    )
    class_w = torch.tensor(config["class_weights"], dtype=torch.float32, device=device)

    start_epoch, best = 1, {"val_loss": math.inf, "epoch": 0, "state": None}
    resumed: list[int] = []  # epochs at which a killed run was resumed
    history: list[dict[str, Any]] = []
    bad_epochs = 0
    steps = 0  # optimizer steps done, over all epochs (resumed ones too)
    counter = config.get("progress") if rank == 0 else None  # the driver's StepCounter, or None (no bar)
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            d = Path(d)
            saved = json.loads((d / "state.json").read_text())
            set_peft_model_state_dict(peft_backbone, load_file(str(d / "last" / "adapter.safetensors")))
            inner.head.load_state_dict(load_file(str(d / "last" / HEAD_WEIGHTS)))
            opt.load_state_dict(torch.load(d / "optimizer.pt", weights_only=True))
            best = {
                "val_loss": saved["best_val_loss"], "epoch": saved["best_epoch"],
                "state": {"adapter": load_file(str(d / "best" / "adapter.safetensors")),
                          "head": load_file(str(d / "best" / HEAD_WEIGHTS))},
            }
            start_epoch, bad_epochs, history = saved["epoch"] + 1, saved["bad_epochs"], saved["history"]
            resumed = [*saved.get("resumed_at", []), start_epoch]
            steps = int(saved.get("steps", saved["epoch"] * config.get("steps_per_epoch", 0)))
        log.info("resuming LoRA training at epoch %d", start_epoch)
    if counter is not None:
        counter.start.remote(steps, start_epoch)

    fields = config["fields"]
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    per_worker = settings.batch_cells // world
    use_val = config["use_val"]

    def forward_batch(batch: dict[str, Any], idx: np.ndarray) -> torch.Tensor:
        rows = _rows_of(batch, idx, fields)
        tensors = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in fm.collate(rows).items()}  # type: ignore[attr-defined]
        with _autocast(device, settings.precision):
            return classifier(tensors).float()

    def train_mode() -> None:
        classifier.train()
        if not settings.backbone_dropout:  # only the adapters' and the head's dropout stay on
            inner.backbone.eval()
            for name, m in inner.backbone.named_modules():
                if "lora_dropout" in name:
                    m.train()

    for epoch in range(start_epoch, settings.epochs + 1):
        train_mode()
        t0, n_cells, n_tokens, epoch_steps = time.perf_counter(), 0, 0, 0
        train_loss_sum, train_w_sum = 0.0, 0.0
        for batch in train_shard.iter_batches(batch_size=per_worker, batch_format="numpy",
                                              local_shuffle_buffer_size=max(per_worker * 4,
                                                                            settings.shuffle_buffer_cells // world),
                                              local_shuffle_seed=settings.seed * 1000 + epoch):
            y = torch.from_numpy(batch["label"].astype(np.int64)).to(device)
            # the global batch's weight sum: each worker's loss is its share of the global weighted mean
            (w_global,) = _all_sum([float(class_w[y].sum())], device)
            micro = list(token_budget_batches(batch["n_tokens"], settings.batch_tokens))
            opt.zero_grad(set_to_none=True)
            for j, idx in enumerate(micro):
                sync = (not ddp) or j == len(micro) - 1
                with contextlib.nullcontext() if sync else classifier.no_sync():
                    logits = forward_batch(batch, idx)
                    loss_sum = F.cross_entropy(logits, y[idx], weight=class_w, reduction="sum")
                    # DDP averages gradients over workers: scale so the result is the global mean
                    (loss_sum * world / w_global).backward()
                train_loss_sum += float(loss_sum.detach())
            opt.step()
            train_w_sum += float(class_w[y].sum())
            n_cells += len(y)
            n_tokens += int(batch["n_tokens"].sum())
            epoch_steps += 1
            if counter is not None:  # fire-and-forget: the step never waits on the bar
                counter.add.remote(1, train_loss_sum / train_w_sum if train_w_sum else math.nan, epoch)
        steps += epoch_steps
        train_seconds = time.perf_counter() - t0

        classifier.eval()
        val_loss_sum, val_w_sum = 0.0, 0.0
        with torch.no_grad():
            for batch in val_shard.iter_batches(batch_size=max(per_worker, 64), batch_format="numpy"):
                y = torch.from_numpy(batch["label"].astype(np.int64)).to(device)
                for idx in token_budget_batches(batch["n_tokens"], settings.batch_tokens):
                    logits = forward_batch(batch, idx)
                    val_loss_sum += float(F.cross_entropy(logits, y[idx], weight=class_w, reduction="sum"))
                val_w_sum += float(class_w[y].sum())
        tl, tw, vl, vw = _all_sum([train_loss_sum, train_w_sum, val_loss_sum, val_w_sum], device)
        per_worker_speed = _all_gather({"rank": rank, "cells": n_cells, "tokens": n_tokens, "seconds": train_seconds})
        val_loss = vl / vw if (use_val and vw > 0) else math.nan
        improved = (not use_val) or val_loss < best["val_loss"]
        if improved:
            best = {"val_loss": val_loss if use_val else math.nan, "epoch": epoch,
                    "state": _trainable_state(peft_backbone, inner.head)}
            bad_epochs = 0
        else:
            bad_epochs += 1
        metrics = {
            "epoch": epoch,
            "train_loss": tl / tw if tw else math.nan,
            "val_loss": val_loss,
            "best_epoch": best["epoch"],
            "cells_per_s_per_worker": [round(s["cells"] / s["seconds"], 2) if s["seconds"] else 0.0
                                       for s in per_worker_speed],
            "tokens_per_s_per_worker": [round(s["tokens"] / s["seconds"], 1) if s["seconds"] else 0.0
                                        for s in per_worker_speed],
        }
        history.append(metrics)
        stop = use_val and bad_epochs >= settings.patience
        if counter is not None:  # the steps still to come, as this epoch counted them (none after a stop)
            counter.set_total.remote(steps + (0 if stop else (settings.epochs - epoch) * epoch_steps))
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                d = Path(tmp)
                last = _trainable_state(peft_backbone, inner.head)
                _write_state(d / "last", last)
                _write_state(d / "best", best["state"])
                torch.save(opt.state_dict(), d / "optimizer.pt")
                write_json(d / "state.json", {
                    "epoch": epoch, "best_epoch": best["epoch"], "best_val_loss": best["val_loss"],
                    "bad_epochs": bad_epochs, "history": history, "head": head_meta, "stopped_early": stop,
                    "resumed_at": resumed, "steps": steps,
                })
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)
        if stop:
            break


def _write_state(directory: Path, state: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state["adapter"].items()}, str(directory / "adapter.safetensors"))
    save_file({k: v.contiguous() for k, v in state["head"].items()}, str(directory / HEAD_WEIGHTS))


# ------------------------------------------------------------------------------------------- driver


class StepCounter:
    """Optimizer steps done (of how many), the running training loss and the epoch, as rank 0 of the
    training loop tells them; run as a Ray actor (no CPU of its own) that the driver polls for its bar."""

    def __init__(self, total: int) -> None:
        self.done, self.total, self.first = 0, total, 0
        self.loss, self.epoch = math.nan, 0

    def start(self, done: int, epoch: int) -> None:
        """Training (re)starts with ``done`` steps behind it (a resumed run's finished epochs)."""
        self.done = self.first = done
        self.epoch = epoch

    def add(self, steps: int, loss: float, epoch: int) -> None:
        self.done += steps
        self.loss, self.epoch = loss, epoch

    def set_total(self, total: int) -> None:
        self.total = total

    def read(self) -> dict[str, float]:
        return {"done": self.done, "total": self.total, "first": self.first, "loss": self.loss,
                "epoch": self.epoch}


class StepBar:
    """The driver's bar of training steps (steps done of all, steps/s, running loss, epoch). Entering it
    starts a ``StepCounter`` actor and returns its handle, for the training loop's config (``None`` when not
    ``enabled``: no actor, no bar); a thread redraws the bar from the actor every ``poll_s`` seconds, and
    leaving reads it once more, so the bar ends where training did (``done`` / ``total``: as last drawn)."""

    def __init__(self, enabled: bool, description: str, total: int, epochs: int, poll_s: float = 0.5) -> None:
        self.enabled, self.description, self.epochs, self.poll_s = enabled, description, epochs, poll_s
        self.done, self.total = 0, total
        self._stop = threading.Event()
        self._counter: Any = None
        self._bar: Any = None
        self._task: Any = None
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    def __enter__(self) -> Any:
        if not self.enabled:
            return None
        import ray

        self._counter = ray.remote(num_cpus=0)(StepCounter).remote(self.total)
        self._t0 = time.perf_counter()
        self._bar = progress_bar(True, rate=True)
        self._bar.start()
        self._task = self._bar.add_task(self.description, total=self.total, rate="")
        self._thread = threading.Thread(target=self._poll, name="lora-progress", daemon=True)
        self._thread.start()
        return self._counter

    def __exit__(self, *exc: object) -> None:
        if not self.enabled:
            return
        import ray

        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self._draw(ray.get(self._counter.read.remote(), timeout=10))
        except Exception as err:  # training's own outcome (its result or its error) is what counts
            log.debug("training progress not read: %s", err)
        finally:
            self._bar.stop()
            ray.kill(self._counter)

    def _poll(self) -> None:
        import ray

        while not self._stop.wait(self.poll_s):
            try:
                self._draw(ray.get(self._counter.read.remote(), timeout=10))
            except Exception as err:  # a slow or lost read only delays the bar, never the training
                log.debug("training progress not read: %s", err)

    def _draw(self, state: dict[str, float]) -> None:
        done, first = int(state["done"]), int(state["first"])
        self.done, self.total = done, max(int(state["total"]), done)
        parts = [rate_text(done - first, self._t0, unit="steps", digits=2) if done > first else "",
                 f"loss {state['loss']:.4f}" if not math.isnan(state["loss"]) else "",
                 f"epoch {int(state['epoch'])}/{self.epochs}" if state["epoch"] else ""]
        self._bar.update(self._task, completed=done, total=self.total, rate="  ".join(p for p in parts if p))


@dataclass
class FinetuneResult:
    model_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)


def class_weights(y: np.ndarray) -> list[float]:
    counts = np.bincount(y, minlength=2).astype(np.float64)
    if (counts == 0).any():
        raise UserError("the training cells hold one class only; LoRA fine-tuning needs sensitive and resistant cells")
    return (counts.sum() / (2 * counts)).tolist()


def resolve_scaling(settings: LoraSettings) -> LoraSettings:
    """Workers and GPU use from the CLUSTER (not the driver): one worker per GPU when it has GPUs."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = bool(gpus) if settings.use_gpu is None else settings.use_gpu
    if use_gpu and not gpus:
        raise UserError("lora settings: use_gpu is true but the Ray cluster has no GPU")
    workers = settings.workers or (gpus if use_gpu else 1)
    if settings.batch_cells < workers:
        raise UserError(f"lora settings: batch_cells ({settings.batch_cells}) must be at least the number of "
                        f"workers ({workers})")
    return replace(settings, workers=workers, use_gpu=use_gpu)


def finetune(
    fm: FoundationModel,
    store: CellStore,
    train: LabelledCells | Mapping[str, int],
    val: LabelledCells | Mapping[str, int],
    out_dir: Path,
    settings: LoraSettings,
    progress: bool = False,
) -> FinetuneResult:
    """Train LoRA + head on the given cells (store rows + labels, or a cell_id -> label mapping); write the
    model under ``out_dir/model``. Re-running with the same ``out_dir`` resumes from the last checkpoint
    (or returns the finished model). ``progress``: a bar of optimizer steps on this terminal (``StepBar``)."""
    import ray
    from ray.train import CheckpointConfig, DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out_dir = Path(out_dir).absolute()
    final = out_dir / MODEL_DIR
    if (final / CONFIG).exists():
        log.info("%s is already trained; nothing to do", final)
        return FinetuneResult(final, json.loads((final / METRICS).read_text()))
    fm.check_store(store)
    train_cells, val_cells = LabelledCells.of(store, train), LabelledCells.of(store, val)
    weights = class_weights(train_cells.labels)
    use_val = len(val_cells) > 0 and len(np.unique(val_cells.labels)) == 2
    if not use_val:
        log.warning("validation cells are missing or one-class: LoRA trains %d epochs without early stopping",
                    settings.epochs)

    probe = probe_cell(fm, store, int(train_cells.rows[0]))
    fields = list(probe)
    # a bad checkpoint or LoRA target fails here, in one line, before Ray starts
    resolve_targets(fm, fm.load(device="cpu"), settings.targets, probe)  # type: ignore[attr-defined]

    init_ray()
    quiet_ray_data()
    settings = resolve_scaling(settings)
    assert settings.workers is not None
    if len(train_cells) < settings.workers:
        raise UserError(f"{len(train_cells)} training cells cannot be shared by {settings.workers} workers")
    # Streamed, never materialized on the driver. Stores are often sorted by sample, so batches must mix
    # the whole training set: a seeded global shuffle when it is small enough for the object store, else a
    # seeded block order; each worker also shuffles within a buffer of cells, reseeded every epoch.
    train_ds = labelled_dataset(fm, store, train_cells)
    if len(train_cells) <= settings.full_shuffle_cells:
        train_ds = train_ds.random_shuffle(seed=settings.seed)
    else:
        train_ds = train_ds.randomize_block_order(seed=settings.seed)
    val_ds = labelled_dataset(fm, store, val_cells) if len(val_cells) else train_ds.limit(0)
    spare = ray.cluster_resources().get("CPU", 0) - settings.workers * settings.cpus_per_worker
    if spare < 1:
        # Ray Data's tasks need a CPU beside the training workers; a cluster this small (a laptop, a CI
        # runner) has none left while they train, so its data is produced before training instead.
        log.info("%g CPU(s) left beside %d training worker(s): the tokenized training data is materialized "
                 "in the object store before training (streamed on larger clusters)", spare, settings.workers)
        with user_errors():
            train_ds, val_ds = train_ds.materialize(), val_ds.materialize()

    # each worker's shard holds len // workers cells (Ray Train splits equally), cut into batches of its share
    steps_per_epoch = math.ceil((len(train_cells) // settings.workers) / (settings.batch_cells // settings.workers))
    bar = StepBar(progress, f"finetune {fm.name}", settings.epochs * steps_per_epoch, settings.epochs)
    with bar as counter:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "settings": asdict(settings),
                "model_name": fm.name,
                "model_options": fm.options,
                "probe": probe,
                "fields": fields,
                "class_weights": weights,
                "use_val": use_val,
                "steps_per_epoch": steps_per_epoch,
                "progress": counter,  # an ActorHandle (it pickles), or None
            },
            scaling_config=ScalingConfig(num_workers=settings.workers, use_gpu=bool(settings.use_gpu),
                                         resources_per_worker={"CPU": settings.cpus_per_worker}),
            run_config=RunConfig(storage_path=str(out_dir / "ray"), name="train",
                                 checkpoint_config=CheckpointConfig(num_to_keep=2)),
            datasets={"train": train_ds, "val": val_ds},
            dataset_config=DataConfig(datasets_to_split="all"),
        )
        with user_errors():
            result = trainer.fit()
    if progress:
        log.info("LoRA training: %d of %d optimizer steps", bar.done, bar.total)
    if result.checkpoint is None:
        raise RuntimeError("LoRA training ended without a checkpoint")
    with result.checkpoint.as_directory() as d:
        return _export(fm, store, Path(d), final, settings, probe)


def _export(
    fm: FoundationModel, store: CellStore, ckpt: Path, final: Path, settings: LoraSettings, probe: dict[str, Any]
) -> FinetuneResult:
    """The best epoch's adapter and head, with what loading them needs, into ``final`` (atomically)."""
    from safetensors.torch import load_file

    state = json.loads((ckpt / "state.json").read_text())
    backbone = fm.load(device="cpu")  # type: ignore[attr-defined]
    peft_backbone = add_lora(fm, backbone, replace(settings, gradient_checkpointing=False), probe)
    best = {"adapter": load_file(str(ckpt / "best" / "adapter.safetensors")),
            "head": load_file(str(ckpt / "best" / HEAD_WEIGHTS))}
    metrics = {
        "best_epoch": state["best_epoch"],
        "best_val_loss": state["best_val_loss"],
        "epochs_run": state["epoch"],
        "stopped_early": state["stopped_early"],
        "resumed_at": state.get("resumed_at", []),
        "history": state["history"],
    }
    with atomic_dir(final) as tmp:
        save_weights(tmp, peft_backbone, best, state["head"])
        write_json(tmp / CONFIG, {
            "model": fm.name,
            "model_options": fm.options,
            "model_identity": fm.identity(),
            "random_weights": fm.random_weights,
            "lora": {k: v for k, v in asdict(settings).items()},
            "head": state["head"],
        })
        store.genes.to_parquet(tmp / GENES, index=False)
        write_json(tmp / METRICS, metrics)
    return FinetuneResult(final, metrics)


