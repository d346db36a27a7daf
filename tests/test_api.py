"""The Python API (``import scdrugmap_ray as sdr``) on real cells: in-memory embedding without Ray, backed
and path inputs through Ray Data, prediction with a registry model, a benchmark run; the API and the CLI
give the same numbers on the same cells. Also the package's surface: version, light import, declared
dependencies, package data that exists."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "scdrugmap-ray")
PC9 = "data/gse149383_PC9_erlotinib_day11_rawcounts.h5ad"
JHU = "data/scad_target_JHU006_Kinker2020_GSE157220.h5ad"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})}, cwd="/")


# ------------------------------------------------------------------------------------------ surface


def test_import_is_light_and_versioned() -> None:
    """From outside the repository: the root package imports without torch, Ray or pandas; --version."""
    code = ("import sys, scdrugmap_ray as sdr; print(sdr.__version__); "
            "print(sorted(m for m in ('torch', 'ray', 'pandas') if m in sys.modules)); "
            "print(sdr.models.list()[:1], sdr.registry.Registry.__name__, callable(sdr.run), "
            "sdr.tl.IN_MEMORY_MAX_CELLS)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", check=True).stdout
    version, loaded, rest = out.splitlines()
    from importlib.metadata import version as dist_version

    assert version == dist_version("scdrugmap-ray")
    assert loaded == "[]"
    assert "Registry" in rest and "True" in rest
    res = cli("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"scdrugmap-ray {version}"


def test_packaging_declares_what_it_imports() -> None:
    """Every third-party package imported by the code is a declared dependency; every package folder is
    packaged; every package-data folder exists."""
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    project, st = meta["project"], meta["tool"]["setuptools"]
    declared = {re.split(r"[<>=!\[; ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in project["dependencies"]}
    declared |= {re.split(r"[<>=!\[; ]", d, maxsplit=1)[0].lower() for extra in ("llm", "report")
                 for d in project["optional-dependencies"][extra]}
    dist_of = {"yaml": "pyyaml", "sklearn": "scikit-learn", "performer_pytorch": "performer-pytorch",
               "swagger_ui_bundle": "swagger-ui-bundle-v2", "multipart": "python-multipart", "umap": "umap-learn"}
    imported: dict[str, str] = {}
    dirs = {v: k for k, v in st["package-dir"].items()}
    for folder in dirs:
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top != "scdrugmap_ray":
                        imported.setdefault(top, str(path.relative_to(REPO)))
    missing = {top: where for top, where in imported.items() if dist_of.get(top, top).replace("_", "-") not in declared}
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
    for folder, pkg in dirs.items():
        for init in (REPO / folder).rglob("__init__.py"):
            sub = ".".join([pkg, *init.parent.relative_to(REPO / folder).parts])
            assert sub in st["packages"], f"{sub} ({init.parent}) is not in [tool.setuptools] packages"
    for pkg, patterns in st["package-data"].items():
        folder = REPO / st["package-dir"][".".join(pkg.split(".")[:2])] / Path(*pkg.split(".")[2:])
        for pattern in patterns:
            assert list(folder.glob(pattern)), f"package data {pkg}: {pattern} matches nothing in {folder}"


# ------------------------------------------------------------------------------------------- embed


@pytest.fixture(scope="module")
def cells300(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The first 300 real PC9 cells (raw Drop-seq counts) in memory and as an .h5ad, a tiny random Geneformer."""
    import scdrugmap_ray as sdr

    d = tmp_path_factory.mktemp("api")
    adata = ad.read_h5ad(shared_dir / PC9)[:300].copy()
    path = d / "pc9_300.h5ad"
    adata.write_h5ad(path)
    ckpt = sdr.models.init_random("geneformer", d / "gf", preset="tiny")
    return {"adata": adata, "path": path, "ckpt": ckpt, "dir": d, "cache": d / "cache"}


@pytest.fixture(scope="module")
def in_memory(cells300: dict[str, Any]) -> ad.AnnData:
    """sdr.tl.embed on the in-memory cells, with ray.init made to fail: the in-process path never starts Ray."""
    import ray
    import scdrugmap_ray as sdr

    was = ray.is_initialized()
    init = ray.init

    def no_ray(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the in-memory path started Ray")

    ray.init = no_ray
    try:
        adata = cells300["adata"].copy()
        assert sdr.tl.embed(adata, "geneformer", checkpoint=cells300["ckpt"]) is None
    finally:
        ray.init = init
    assert ray.is_initialized() == was
    return adata


def test_embed_in_memory(in_memory: ad.AnnData, cells300: dict[str, Any]) -> None:
    from scdrugmap_ray.engine.models.base import checkpoint_digest

    emb = in_memory.obsm["X_geneformer"]
    assert emb.shape == (300, 64) and emb.dtype == np.float32
    nonempty = np.asarray((in_memory.X != 0).sum(axis=1)).ravel() > 0
    assert np.isfinite(emb[nonempty]).all() and np.isnan(emb[~nonempty]).all()
    assert emb[nonempty].std(axis=0).min() > 0  # cells differ
    uns = in_memory.uns["X_geneformer"]
    assert uns["model"] == "geneformer" and uns["backend"] == "local" and uns["random_weights"] is True
    assert uns["checkpoint_sha256"] == checkpoint_digest(Path(cells300["ckpt"]))
    assert uns["n_cells_embedded"] == int(nonempty.sum())
    assert uns["options"]["dtype"] == "upstream" and uns["scdrugmap_ray_version"]
    in_memory.write_h5ad(cells300["dir"] / "written.h5ad")  # uns is storable in .h5ad


@pytest.mark.slow
def test_embed_api_equals_cli(in_memory: ad.AnnData, cells300: dict[str, Any]) -> None:
    """The CLI's `embed` (Ray Data actors) on the same cells gives the same numbers as sdr.tl.embed in memory."""
    out = cells300["dir"] / "cli_emb"
    res = cli("embed", str(cells300["path"]), "--model", "geneformer", "--checkpoint", str(cells300["ckpt"]),
              "--out", str(out), "--quiet", env={"SCDRUGMAP_RAY_CACHE": str(cells300["cache"])})
    assert res.returncode == 0, res.stderr
    table = pq.read_table(sorted(out.glob("part-*.parquet")))
    ids = table.column("cell_id").to_pylist()
    cli_emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    api_emb = in_memory[ids].obsm["X_geneformer"]
    assert len(ids) == int(np.isfinite(in_memory.obsm["X_geneformer"][:, 0]).sum())
    np.testing.assert_allclose(api_emb, cli_emb, rtol=0, atol=1e-5)
    # an .h5ad --out: a copy of the input with obsm/uns under --key-added
    h5 = cells300["dir"] / "embedded.h5ad"
    res = cli("embed", str(cells300["path"]), "--model", "geneformer", "--checkpoint", str(cells300["ckpt"]),
              "--out", str(h5), "--key-added", "gf", "--quiet", env={"SCDRUGMAP_RAY_CACHE": str(cells300["cache"])})
    assert res.returncode == 0, res.stderr
    written = ad.read_h5ad(h5)
    assert written.uns["gf"]["model"] == "geneformer" and written.uns["gf"]["backend"] == "ray"
    assert written.obs_names.equals(in_memory.obs_names) and written.n_vars == in_memory.n_vars
    np.testing.assert_allclose(written.obsm["gf"], in_memory.obsm["X_geneformer"], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_embed_backed_and_path(in_memory: ad.AnnData, cells300: dict[str, Any], ray_session: None,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A backed AnnData and an .h5ad path go through the Ray Data engine (cached store) with the same result."""
    import scdrugmap_ray as sdr

    monkeypatch.setenv("SCDRUGMAP_RAY_CACHE", str(cells300["cache"]))
    backed = ad.read_h5ad(cells300["path"], backed="r")
    sdr.tl.embed(backed, "geneformer", checkpoint=cells300["ckpt"], key_added="gf")
    assert backed.uns["gf"]["backend"] == "ray"
    np.testing.assert_allclose(backed.obsm["gf"], in_memory.obsm["X_geneformer"], rtol=0, atol=1e-5)
    from_path = sdr.tl.embed(cells300["path"], "geneformer", checkpoint=cells300["ckpt"])
    assert from_path is not None and from_path.isbacked
    np.testing.assert_allclose(from_path.obsm["X_geneformer"], in_memory.obsm["X_geneformer"], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------- run and predict


@pytest.fixture(scope="module")
def trained(shared_dir: Path, ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """sdr.run on real cells (SCAD JHU006, z-scored expression, Afatinib response 60/60) with a PCA baseline;
    its best unit registered with sdr.registry.register."""
    import scdrugmap_ray as sdr

    d = tmp_path_factory.mktemp("api_run")
    res = sdr.run({
        "name": "api-jhu006",
        "data": [{"path": str(shared_dir / JHU), "name": "jhu006", "label_key": "response_Afatinib"}],
        "models": [{"name": "pca-logreg", "options": {"n_components": 10}}],
        "strategies": ["frozen"],
        "evaluation": {"pooled": {"folds": 2, "split": "cell"}, "bootstrap": 0},
        "output": str(d / "run"), "cache": str(d / "cache"),
    }, progress=False)
    version_dir = sdr.registry.register(res.run_dir, "jhu-pca", best="auroc", registry=d / "registry")
    return {"result": res, "registry": d / "registry", "version_dir": version_dir, "dir": d}


@pytest.mark.slow
def test_run_result(trained: dict[str, Any]) -> None:
    import scdrugmap_ray as sdr

    res = trained["result"]
    assert isinstance(res, sdr.RunResult)
    assert len(res.results) == 2 and set(res.results["fold_name"]) == {"pooled/cell/fold0", "pooled/cell/fold1"}
    assert res.report.is_file() and res.report.name == "report.html"
    summary = res.summary()
    assert len(summary) == 1 and summary.loc[0, "auroc"] > 0.9  # SCAD targets are nearly separable
    assert res.random_weight_models == []
    assert sdr.RunResult.load(res.run_dir).results.equals(res.results)
    assert trained["version_dir"].name == "1"
    assert [m["name"] for m in sdr.registry.Registry(trained["registry"]).list()] == ["jhu-pca"]


@pytest.mark.slow
def test_predict_api_equals_cli(trained: dict[str, Any], shared_dir: Path) -> None:
    """sdr.tl.predict in memory, on a path (Ray Data) and the CLI's `predict --key-added` give the same numbers;
    a second key keeps the first one's columns; provenance in uns."""
    import scdrugmap_ray as sdr

    reg, src = trained["registry"], shared_dir / JHU
    adata = ad.read_h5ad(src)
    sdr.tl.predict(adata, "jhu-pca@1", registry=reg, embeddings=True)
    sdr.tl.predict(adata, "jhu-pca", registry=reg, key_added="second")
    p = adata.obs["scdrugmap_p_sensitive"].to_numpy()
    assert p.dtype == np.float32 and np.isfinite(p).all() and p.min() >= 0 and p.max() <= 1
    np.testing.assert_array_equal(adata.obs["second_p_sensitive"].to_numpy(), p)
    assert list(adata.obs["scdrugmap_label"].cat.categories) == ["resistant", "sensitive"]
    assert ((p >= 0.5) == (adata.obs["scdrugmap_label"] == "sensitive").to_numpy()).all()
    assert adata.obsm["X_scdrugmap"].shape == (120, 10)
    uns = adata.uns["scdrugmap"]
    assert uns["model"] == "jhu-pca@1" and uns["base_model"] == "pca-logreg" and uns["threshold"] == 0.5
    assert uns["random_weights"] is False and uns["n_cells_predicted"] == 120 and uns["backend"] == "local"
    # labels of the real cells: a model that reached AUROC > 0.9 in CV ranks them well here too
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(adata.obs["response_Afatinib"].astype(int), p) > 0.9

    via_ray = sdr.tl.predict(str(src), "jhu-pca@1", registry=reg, key_added="pca")
    assert via_ray is not None and via_ray.uns["pca"]["backend"] == "ray"
    np.testing.assert_array_equal(via_ray.obs["pca_p_sensitive"].to_numpy(), p)

    out = trained["dir"] / "pred.h5ad"
    res = cli("predict", str(src), "--model", "jhu-pca@1", "--registry", str(reg), "--out", str(out),
              "--key-added", "pca", "--embeddings", env={"SCDRUGMAP_RAY_CACHE": str(trained["dir"] / "cache")})
    assert res.returncode == 0, res.stderr
    written = ad.read_h5ad(out)
    np.testing.assert_array_equal(written.obs["pca_p_sensitive"].to_numpy(), p)
    assert "scdrugmap_p_sensitive" not in written.obs
    np.testing.assert_array_equal(written.obs["pca_label"].astype(str), adata.obs["scdrugmap_label"].astype(str))
    np.testing.assert_allclose(written.obsm["X_pca"], adata.obsm["X_scdrugmap"], rtol=0, atol=1e-6)
    assert written.uns["pca"]["model"] == "jhu-pca@1" and written.uns["pca"]["backend"] == "ray"
    # the default key keeps today's column names
    out2 = trained["dir"] / "pred_default.h5ad"
    res = cli("predict", str(src), "--model", "jhu-pca@1", "--registry", str(reg), "--out", str(out2),
              env={"SCDRUGMAP_RAY_CACHE": str(trained["dir"] / "cache")})
    assert res.returncode == 0, res.stderr
    again = ad.read_h5ad(out2)
    np.testing.assert_array_equal(again.obs["scdrugmap_p_sensitive"].to_numpy(), p)
    assert again.uns["scdrugmap"]["model"] == "jhu-pca@1"


def test_datasets_and_models() -> None:
    import scdrugmap_ray as sdr

    df = sdr.datasets.list(cancer_type="lung")
    assert isinstance(df, pd.DataFrame) and len(df) > 0
    one = sdr.datasets.show(df["id"].iloc[0])
    assert one["id"] == df["id"].iloc[0] and isinstance(one["subgroups"], list)
    assert "geneformer" in sdr.models.list() and "tiny" in sdr.models.presets("geneformer")
    json.dumps(one, default=str)


@pytest.mark.parametrize(("call", "message"), [
    (lambda sdr, a: sdr.tl.embed(a, "pca-logreg", preset="tiny"), "not a foundation model"),
    (lambda sdr, a: sdr.tl.embed(a, "geneformer"), "exactly one of checkpoint"),
    (lambda sdr, a: sdr.tl.embed(a, "geneformr", preset="tiny"), "did you mean 'geneformer'"),
    (lambda sdr, a: sdr.tl.embed(a, "geneformer", preset="tiny", batch_tokens=0), "batch_tokens"),
    (lambda sdr, a: sdr.tl.embed(a, "geneformer", preset="tiny", backend="gpu"), "backend"),
    (lambda sdr, a: sdr.tl.embed(a, "geneformer", preset="tiny", layer="counts"), "no layer 'counts'"),
    (lambda sdr, a: sdr.tl.embed("/nonexistent.h5ad", "geneformer", preset="tiny"), "not found"),
    (lambda sdr, a: sdr.tl.predict(a, "no-such-model", registry="/nonexistent"), "no model 'no-such-model'"),
])
def test_api_errors_are_user_errors(call: Any, message: str) -> None:
    """Bad input to the API is a UserError with one line, raised before any work (and before Ray)."""
    import scdrugmap_ray as sdr

    a = ad.AnnData(np.ones((3, 4), dtype=np.float32))
    with pytest.raises(sdr.UserError, match=re.escape(message)) as info:
        call(sdr, a)
    assert "\n" not in str(info.value)


def test_embed_refuses_non_counts(shared_dir: Path) -> None:
    import scdrugmap_ray as sdr

    adata = ad.read_h5ad(shared_dir / JHU)
    with pytest.raises(sdr.UserError, match="needs raw counts"):
        sdr.tl.embed(adata, "geneformer", preset="tiny")


@pytest.mark.slow
def test_embed_many_cells_in_blocks(shared_dir: Path, cells300: dict[str, Any], ray_session: None,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """More than one block (1,024 cells) in memory: embedded block by block with a progress bar, the same
    numbers as the Ray Data engine (backend='ray') on the same 1,500 real cells."""
    import scdrugmap_ray as sdr

    monkeypatch.setenv("SCDRUGMAP_RAY_CACHE", str(cells300["cache"]))
    adata = ad.read_h5ad(shared_dir / PC9)[-1500:].copy()  # the file's smallest cells: quick on 2 cores
    local = adata.copy()
    sdr.tl.embed(local, "geneformer", checkpoint=cells300["ckpt"], progress=True)
    assert local.uns["X_geneformer"]["backend"] == "local"
    sdr.tl.embed(adata, "geneformer", checkpoint=cells300["ckpt"], backend="ray")
    assert adata.uns["X_geneformer"]["backend"] == "ray"
    ok = np.isfinite(adata.obsm["X_geneformer"][:, 0])
    assert ok.sum() > 1024
    np.testing.assert_array_equal(np.isfinite(local.obsm["X_geneformer"][:, 0]), ok)
    np.testing.assert_allclose(local.obsm["X_geneformer"][ok], adata.obsm["X_geneformer"][ok], rtol=0, atol=1e-5)
