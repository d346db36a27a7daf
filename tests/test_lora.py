"""LoRA fine-tuning: adapters really train on every single-cell model (no Ray), and the Ray Train
path: 1 vs 2 workers agree, a killed run resumes, the saved model predicts, bad input is one line."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from realcells import cells
from safetensors.torch import load_file
from scdrugmap_ray.engine.errors import UserError
from scdrugmap_ray.engine.models.base import get_model
from scdrugmap_ray.engine.train.lora import (
    LoraSettings,
    add_lora,
    build_head,
    finetune,
    make_classifier,
    predict_finetuned,
    resolve_targets,
)

MODELS = ["geneformer", "tgpt", "scgpt", "scfoundation", "uce", "scbert", "cellplm", "celllm"]


def _tiny_batch(name: str, pc9: dict, rows: list[int]) -> tuple:
    fm = get_model(name, {"preset": "tiny"})
    tokenized = fm.make_tokenizer(pc9["genes"])(*cells(pc9, rows))  # type: ignore[attr-defined]
    probe = {k: [v[0]] for k, v in tokenized.items()}
    return fm, fm.collate(tokenized), probe  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", MODELS)
def test_lora_really_trains(name: str, pc9: dict) -> None:
    fm, batch, probe = _tiny_batch(name, pc9, [0, 1, 2, 3])
    torch.manual_seed(0)
    backbone = fm.load()
    with torch.no_grad():
        base = fm.embed(backbone, batch).clone()
    peft_model = add_lora(fm, backbone, LoraSettings(dropout=0.0), probe)
    clf = make_classifier(fm, backbone, build_head(base.shape[1], 16, 0.0))

    # (a) only adapter and head weights train
    trainable = {n: p for n, p in clf.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("lora_B" in n for n in trainable)
    assert all("lora_" in n or n.startswith("head.") for n in trainable), sorted(trainable)

    # (b) every adapter weight changes (B in the first step, A once B is non-zero)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    opt = torch.optim.AdamW(list(trainable.values()), lr=1e-2)
    y = torch.tensor([0, 1, 0, 1])
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(clf(batch), y).backward()
        opt.step()
    unchanged = [n for n, p in trainable.items() if torch.equal(before[n], p.detach())]
    assert not unchanged, unchanged

    # (c) the backbone's output changes with the adapter on, and is the original with it off
    with torch.no_grad():
        adapted = fm.embed(backbone, batch)
        with peft_model.disable_adapter():
            off = fm.embed(backbone, batch)
    torch.testing.assert_close(off, base, rtol=1e-4, atol=1e-5)
    assert float((adapted - base).abs().max()) > 1e-4


def test_unknown_target_names_what_exists(pc9: dict) -> None:
    fm, _, probe = _tiny_batch("scfoundation", pc9, [0])
    with pytest.raises(UserError, match=r"matches no linear module .* end in: .*linear1"):
        resolve_targets(fm, fm.load(), ["out_proj_typo"], probe)


def test_targets_skip_modules_that_do_not_reach_the_embedding(pc9: dict) -> None:
    # Geneformer's embedding is read from the second-to-last layer: the last layer cannot be adapted
    fm, _, probe = _tiny_batch("geneformer", pc9, [0])
    backbone = fm.load()
    chosen = resolve_targets(fm, backbone, None, probe)
    n_layers = len(backbone.bert.encoder.layer) if hasattr(backbone, "bert") else len(backbone.encoder.layer)
    assert chosen and not any(f"layer.{n_layers - 1}." in c for c in chosen)


def test_bad_settings_are_one_line() -> None:
    with pytest.raises(UserError, match="unknown lora setting"):
        LoraSettings.from_options({"rank": 4})
    with pytest.raises(UserError, match="batch_cells must be at least"):
        LoraSettings.from_options({"workers": 4, "batch_cells": 2})


# ------------------------------------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def lora_store(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from scdrugmap_ray.engine.data.convert import ConvertOptions, convert_h5ad
    from scdrugmap_ray.engine.data.simulate import simulate_h5ad
    from scdrugmap_ray.engine.data.store import CellStore

    d = tmp_path_factory.mktemp("lora")
    simulate_h5ad(d / "sim.h5ad", n_cells=160, n_datasets=2, samples_per_dataset=2, effect=1.0, seed=0,
                  n_genes=2000, progress=False)
    convert_h5ad(d / "sim.h5ad", d / "store",
                 ConvertOptions(label_key="response", dataset_key="dataset", sample_key="sample"))
    return CellStore.open(d / "store")


def _labels(store, lo: int, hi: int) -> dict[str, int]:  # type: ignore[no-untyped-def]
    obs = store.obs()
    obs = obs[obs["label"].notna()].iloc[lo:hi]
    return dict(zip(obs["cell_id"].astype(str), obs["label"].astype(int), strict=True))


@pytest.mark.slow
def test_two_workers_match_one_worker(ray_session: None, lora_store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Same global batch (all 96 training cells in one step), no dropout: DDP over 2 workers gives
    the losses, weights and predictions of 1 worker within float tolerance (Adam normalises each
    gradient, so a weight whose gradient is ~0 may move by up to lr either way); throughput is
    reported per worker."""
    fm = get_model("geneformer", {"preset": "tiny"})
    train, val = _labels(lora_store, 0, 96), _labels(lora_store, 96, 128)
    weights, results = {}, {}
    for w in (1, 2):
        settings = LoraSettings(epochs=2, workers=w, batch_cells=96, dropout=0.0, head_dropout=0.0,
                                backbone_dropout=False, patience=5)
        res = finetune(fm, lora_store, train, val, tmp_path / f"w{w}", settings)
        results[w] = res
        weights[w] = {**load_file(str(res.model_dir / "adapter" / "adapter_model.safetensors")),
                      **load_file(str(res.model_dir / "head.safetensors"))}
        assert len(res.metrics["history"][-1]["cells_per_s_per_worker"]) == w
    assert set(weights[1]) == set(weights[2])
    lr = LoraSettings().lr
    for k in weights[1]:
        torch.testing.assert_close(weights[2][k], weights[1][k], rtol=0, atol=2 * lr, msg=lambda m, k=k: f"{k}: {m}")
    h1, h2 = results[1].metrics["history"], results[2].metrics["history"]
    for e1, e2 in zip(h1, h2, strict=True):
        assert e1["train_loss"] == pytest.approx(e2["train_loss"], rel=1e-4)
        assert e1["val_loss"] == pytest.approx(e2["val_loss"], rel=1e-3)

    # the saved model is self-contained: PEFT's files, loadable without the training state
    assert json.loads((results[1].model_dir / "adapter" / "adapter_config.json").read_text())["r"] == 8
    test_ids = list(_labels(lora_store, 128, 160))
    p1, emb = predict_finetuned(results[1].model_dir, lora_store, test_ids)
    p2, _ = predict_finetuned(results[2].model_dir, lora_store, test_ids)
    assert p1.shape == (len(test_ids),) and np.isfinite(p1).all() and ((p1 >= 0) & (p1 <= 1)).all()
    assert emb.shape[0] == len(test_ids)
    np.testing.assert_allclose(p2, p1, atol=1e-3)


@pytest.mark.slow
def test_killed_run_resumes_from_its_last_checkpoint(ray_session: None, lora_store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "ft"
    cmd = [sys.executable, "-m", "scdrugmap_ray.cli.main", "finetune", str(lora_store.path), "--model", "geneformer",
           "--preset", "tiny", "--out", str(out), "--epochs", "4", "--batch-cells", "16"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    # Killed once Ray Train has recorded a checkpoint in its manager snapshot (what a restart reads;
    # the checkpoint folder itself appears slightly earlier)
    snapshot = out / "ray" / "train" / "checkpoint_manager_snapshot.json"

    def recorded() -> bool:
        text = snapshot.read_text() if snapshot.is_file() else ""
        return re.search(r'"checkpoint_dir_name":\s*"checkpoint_', text) is not None

    deadline = time.time() + 300
    try:
        while time.time() < deadline and not recorded():
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]  # type: ignore[union-attr]
            time.sleep(0.2)
        assert recorded(), "no checkpoint within 300 s"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "model").exists()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    assert metrics["resumed_at"] and metrics["resumed_at"][0] >= 2
    assert [h["epoch"] for h in metrics["history"]] == list(range(1, metrics["epochs_run"] + 1))


@pytest.mark.slow
def test_finetune_cli_bar_counts_every_training_step(lora_store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The driver's bar is fed by the Ray Train workers (through a counter actor): it ends at epochs x
    steps per epoch, each step one batch of --batch-cells training cells, with steps/s, loss and epoch.
    Ray's own output (its workers' logs, core_worker lines, the token-auth notice) stays off the terminal."""
    from scdrugmap_ray.engine.data.splits import train_val_split

    obs = lora_store.obs(["cell_id", "label", "dataset", "sample"])
    train_rows, _ = train_val_split(obs, 0.1, 0)
    epochs, batch = 2, 32
    total = epochs * -(-len(train_rows) // batch)
    done = subprocess.run(
        [sys.executable, "-m", "scdrugmap_ray.cli.main", "finetune", str(lora_store.path), "--model", "geneformer",
         "--preset", "tiny", "--out", str(tmp_path / "ft"), "--epochs", str(epochs), "--batch-cells", str(batch)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    bar = [line for line in done.stdout.splitlines() if line.startswith("finetune geneformer")]
    assert bar, done.stdout[-2000:]
    assert re.search(rf" {total}/{total} \d+\.\d\d steps/s  loss \d\.\d{{4}}  epoch {epochs}/{epochs} ", bar[-1]), bar
    # (the raylet's own notices stay: they come on the channel that also reports OOM kills and dead workers)
    ray_noise = re.compile(r"Token authentication|core_worker|\((TrainController|RayTrainWorker|SplitCoordinator"
                           r"|PlacementGroupCleaner|DatasetManager)")
    assert not [line for line in (done.stdout + done.stderr).splitlines() if ray_noise.search(line)]


def test_finetune_cli_bad_target_is_one_line(lora_store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "bad"
    done = subprocess.run(
        [sys.executable, "-m", "scdrugmap_ray.cli.main", "finetune", str(lora_store.path), "--model", "geneformer",
         "--preset", "tiny", "--out", str(out), "--target", "nope"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: LoRA target 'nope' matches no linear module"), done.stderr[-1500:]
    assert "Traceback" not in done.stderr
    assert not (out / "model").exists()


@pytest.mark.parametrize("name", ["scfoundation", "celllm"])
def test_gradient_checkpointing_gives_the_same_gradients(name: str, pc9: dict) -> None:
    from scdrugmap_ray.engine.train.lora import enable_gradient_checkpointing

    fm, batch, probe = _tiny_batch(name, pc9, [0, 1])
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        backbone = fm.load()
        add_lora(fm, backbone, LoraSettings(dropout=0.0), probe)
        if checkpointing:
            assert enable_gradient_checkpointing(backbone) >= 2  # the layer stack of the tiny preset
        clf = make_classifier(fm, backbone, build_head(int(fm.embed(backbone, batch).shape[1]), 8, 0.0))
        for p in clf.parameters():  # a non-zero adapter, so every LoRA weight gets a gradient
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.02)
        F.cross_entropy(clf(batch), torch.tensor([0, 1])).backward()
        grads.append({n: p.grad.clone() for n, p in clf.named_parameters() if p.requires_grad})
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-6)
