"""The command line as a user runs it: real subprocesses, exit codes, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CLI = str(Path(sys.executable).parent / "scdrugmap-ray")


def cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args], capture_output=True, text=True, cwd=cwd, timeout=600,
        env={**os.environ, **(env or {})},
    )


def assert_user_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_help_lists_commands() -> None:
    proc = cli("--help")
    assert proc.returncode == 0
    for command in ("convert", "validate", "simulate", "run", "report", "submit", "status", "logs", "stop", "models"):
        assert command in proc.stdout


def test_models_list() -> None:
    proc = cli("models", "list")
    assert proc.returncode == 0
    assert {"pca-logreg", "hvg-mlp", "obsm:<key>"} <= set(proc.stdout.split())


def test_convert_errors_are_one_line(tmp_path: Path, shared_dir: Path) -> None:
    text = tmp_path / "cells.h5ad"
    text.write_text("not hdf5\n")
    out = tmp_path / "store"
    assert_user_error(cli("convert", str(text), str(out), "--label-key", "response"), str(text))
    assert not out.exists()
    assert_user_error(cli("convert", str(tmp_path / "missing.h5ad"), str(out)), "missing.h5ad")
    real = shared_dir / "data" / "gse149383_PC9_erlotinib_day11_rawcounts.h5ad"
    assert_user_error(cli("convert", str(real), str(out), "--label-key", "nope"), "nope", "scdeal_label")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temp leftovers"


def test_validate_and_convert_real_counts(tmp_path: Path, shared_dir: Path) -> None:
    real = shared_dir / "data" / "gse149383_PC9_erlotinib_day11_rawcounts.h5ad"
    proc = cli("validate", str(real), "--label-key", "scdeal_label", "--dataset", "PC9")
    assert proc.returncode == 0, proc.stderr
    assert "8600" in proc.stdout.replace(",", "") and "counts" in proc.stdout
    out = tmp_path / "store"
    args = ["--label-key", "scdeal_label", "--dataset", "PC9", "--chunk-size", "3000"]
    proc = cli("convert", str(real), str(out), *args)
    assert proc.returncode == 0, proc.stderr
    assert (out / "meta.json").exists() and (out / "genes.parquet").exists()
    assert_user_error(cli("convert", str(real), str(out), "--label-key", "scdeal_label"), "already exists")


def test_run_errors(tmp_path: Path) -> None:
    bad = tmp_path / "b.yaml"
    bad.write_text("name: x\nmodles: []\n")
    assert_user_error(cli("run", str(bad)), "did you mean 'models'")
    assert_user_error(cli("run", str(tmp_path / "nothing.yaml")), "not found")
    assert_user_error(cli("report", str(tmp_path)), "results.parquet")


@pytest.mark.slow
def test_simulate_and_run_from_the_command_line(tmp_path: Path) -> None:
    sim = tmp_path / "sim.h5ad"
    proc = cli("simulate", str(sim), "--cells", "800", "--datasets", "2", "--genes", "1000", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    spec = tmp_path / "bench.yaml"
    spec.write_text(
        f"name: cli\ndata:\n  - path: {sim}\n    label_key: response\n    dataset_key: dataset\n"
        "    sample_key: sample\nmodels:\n  - name: pca-logreg\n"
        "evaluation:\n  pooled: {folds: 2, split: sample}\n  bootstrap: 50\n"
        f"output: {tmp_path / 'run'}\ncache: {tmp_path / 'cache'}\n"
    )
    proc = cli("run", str(spec), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pca-logreg" in proc.stdout and "report.html" in proc.stdout
    assert (tmp_path / "run" / "results.parquet").exists()
    proc = cli("report", str(tmp_path / "run"))
    assert proc.returncode == 0 and "report.html" in proc.stdout


@pytest.mark.slow
def test_foundation_model_commands(tmp_path: Path, shared_dir: Path) -> None:
    """init-random -> tokenize -> embed on real cells, as a user runs them; bad checkpoints are one line."""
    import anndata as ad
    import pyarrow.parquet as pq

    env = {"SCDRUGMAP_RAY_CACHE": str(tmp_path / "cache")}
    src = ad.read_h5ad(shared_dir / "data" / "gse149383_PC9_erlotinib_day11_rawcounts.h5ad")
    src[:120].copy().write_h5ad(tmp_path / "pc9.h5ad")
    assert cli("convert", str(tmp_path / "pc9.h5ad"), str(tmp_path / "store"), "--dataset", "PC9").returncode == 0

    ckpt = tmp_path / "gf"
    proc = cli("models", "init-random", "geneformer", str(ckpt), "--preset", "tiny", env=env)
    assert proc.returncode == 0 and "RANDOM WEIGHTS" in proc.stdout, proc.stderr
    assert (ckpt / "config.json").exists() and (ckpt / "model.safetensors").exists()
    assert_user_error(cli("models", "init-random", "geneformer", str(ckpt), env=env), "already exists")
    not_fm = cli("models", "init-random", "pca-logreg", str(tmp_path / "x"), env=env)
    assert_user_error(not_fm, "not a foundation model")

    proc = cli("tokenize", str(tmp_path / "store"), "--model", "geneformer", "--checkpoint", str(ckpt),
               "--out", str(tmp_path / "tokens"), env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    tokens = pq.read_table(tmp_path / "tokens")
    assert {"cell_id", "input_ids"} <= set(tokens.column_names) and tokens.num_rows == 120

    proc = cli("embed", str(tmp_path / "store"), "--model", "geneformer", "--checkpoint", str(ckpt),
               "--out", str(tmp_path / "emb"), env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    emb = pq.read_table(tmp_path / "emb")  # a folder of parts, one per store shard
    assert emb.num_rows == 120 and emb.schema.field("embedding").type.list_size == 64

    (ckpt / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes()[:5000])
    proc = cli("embed", str(tmp_path / "store"), "--model", "geneformer", "--checkpoint", str(ckpt),
               "--out", str(tmp_path / "emb2"), env=env)
    # The error reaches the user as its one line, exit 2; Ray's own start-up lines may precede it.
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: truncated or corrupt checkpoint file"), last
    assert not (tmp_path / "emb2").exists()
