# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # scdrugmap-ray in a notebook
#
# The Python API in the scanpy style: embed cells of an AnnData with a single-cell foundation model,
# benchmark a model on labelled cells, register the trained model and predict drug response of new cells.
# Every step below runs on a laptop on real cells from `../shared/data/` (open it with
# `jupytext --to notebook docs/notebook.py`, or run it as a script: `python docs/notebook.py`).
#
# The foundation model here has RANDOM weights (a tiny Geneformer written by `sdr.models.init_random`):
# its embeddings exercise the machinery but carry no biology. Point `checkpoint=` at a real checkpoint
# directory for real results.

# %%
import os
import tempfile
from pathlib import Path

import anndata as ad
import pandas as pd
import scdrugmap_ray as sdr

DATA = Path(os.environ.get("SCDRUGMAP_DATA", "../shared/data"))
WORK = Path(os.environ.get("SDR_NOTEBOOK_DIR") or tempfile.mkdtemp(prefix="sdr-notebook-"))
print("scdrugmap-ray", sdr.__version__, "| working in", WORK)

# %% [markdown]
# ## 1. Embed cells with a foundation model
#
# 200 PC9 lung-adenocarcinoma cells after 11 days of erlotinib (GSE149383, raw Drop-seq counts). An
# in-memory AnnData this small is embedded in this process, without starting Ray; a backed AnnData, an
# .h5ad path or more than `sdr.tl.IN_MEMORY_MAX_CELLS` cells go through the Ray Data engine instead.

# %%
pc9 = ad.read_h5ad(DATA / "gse149383_PC9_erlotinib_day11_rawcounts.h5ad")
cells = pc9[-200:].copy()
checkpoint = WORK / "geneformer-tiny"
if not checkpoint.exists():
    sdr.models.init_random("geneformer", checkpoint, preset="tiny")

sdr.tl.embed(cells, model="geneformer", checkpoint=checkpoint)
print(cells.obsm["X_geneformer"].shape)
print({k: v for k, v in cells.uns["X_geneformer"].items() if k != "options"})

# %% [markdown]
# `obsm["X_geneformer"]` is a plain matrix: use it with scanpy (`sc.pp.neighbors(cells, use_rep="X_geneformer")`)
# or anything else. `uns["X_geneformer"]` records the model, its options, the checkpoint's SHA-256 and
# whether the weights were random.

# %% [markdown]
# ## 2. Benchmark a model on labelled cells
#
# SCAD's JHU006 target cells (GSE157220, 120 cells, 60 sensitive / 60 resistant to afatinib; z-scored
# expression, so a baseline rather than a count-based foundation model). `sdr.run` takes the benchmark YAML's
# path or its contents as a dict, runs every unit on an embedded local Ray and returns a `RunResult`.

# %%
jhu006 = DATA / "scad_target_JHU006_Kinker2020_GSE157220.h5ad"
result = sdr.run({
    "name": "notebook-jhu006",
    "data": [{"path": str(jhu006), "name": "jhu006", "label_key": "response_Afatinib"}],
    "models": [{"name": "pca-logreg", "options": {"n_components": 10}}],
    "strategies": ["frozen"],
    "evaluation": {"pooled": {"folds": 2, "split": "cell"}, "bootstrap": 0},
    "output": str(WORK / "run"),
}, progress=False)
print(result.summary().round(3).to_string(index=False))
print("report:", result.report)

# %% [markdown]
# ## 3. Register the trained model and predict
#
# The best fold's model becomes version 1 of `jhu006-pca` in a registry folder; `sdr.tl.predict` writes
# `obs["pca_p_sensitive"]`, `obs["pca_label"]` and the provenance in `uns["pca"]`. Another model under
# another `key_added` keeps these columns.

# %%
registry = WORK / "registry"
sdr.registry.register(result.run_dir, "jhu006-pca", best="auroc", registry=registry)
print([f"{m['name']}@{m['version']}" for m in sdr.registry.Registry(registry).list()])

target = ad.read_h5ad(jhu006)
sdr.tl.predict(target, "jhu006-pca@1", registry=registry, key_added="pca")
print(pd.crosstab(target.obs["response_Afatinib"], target.obs["pca_label"]))
print(target.uns["pca"]["model"], "threshold", target.uns["pca"]["threshold"])

# %% [markdown]
# ## 4. The scDrugMap collection
#
# The catalog of the 60 curated datasets (the expression data is on Zenodo/GEO).

# %%
lung = sdr.datasets.list(cancer_type="lung")
print(lung[["id", "geo", "therapy", "regimen"]].head())
