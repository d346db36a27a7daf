"""Simulated drug-response scRNA-seq data, for demos, tests and scale runs.

Generative model (per cell c of sample s in dataset d, gene g):

    rate[c, g]   = p[g] * exp(batch[d, g] + sample[s, g] + label[s] * program[g] * ln 2)   (renormalised)
    count[c, g] ~ NegativeBinomial(mean = L[c] * rate[c, g], dispersion = phi[g])        (gamma-Poisson)

* ``p``: gene abundances, log-normal, so a few genes take most reads (as in 10x / Drop-seq data);
  with library sizes L ~ log-normal around 2,000 (about 1e3-1e4) about 90% of entries are zero.
* ``phi``: gene-wise over-dispersion, log-normal around 0.3.
* ``batch``: dataset batch effects (per-gene log shifts, sd 0.3) and per-dataset library-size shifts.
* ``sample``: per-sample random effects (sd 0.15): cells of one sample resemble each other, which is why
  sample-grouped cross-validation is honestly harder than a cell-level split.
* Labels are per SAMPLE (each sample all sensitive or all resistant, balanced inside each dataset), as
  in the scDrugMap collection. The resistance program: 50 genes up and 50 down in resistant cells, with
  log2 fold changes ``effect * U(0.5, 1.0)``, recorded per gene in ``var["resistance_effect"]`` (0 for
  genes outside it). ``effect=0`` makes labels independent of expression.

The .h5ad is written chunk by chunk with h5py in AnnData's on-disk format (X as CSR), so memory is
bounded by the chunk: 1,000,000 cells are fine. The file appears whole (temp name, then rename).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from ..fsutil import atomic_file
from .gene_ids import gene_table

log = logging.getLogger(__name__)

PROGRAM_SIZE = 50  # genes up and genes down in resistant cells

CONTEXTS = [  # (cancer_type, tissue, therapy, regimen), cycled over datasets
    ("lung adenocarcinoma", "lung", "targeted therapy", "erlotinib"),
    ("breast cancer", "breast", "chemotherapy", "paclitaxel"),
    ("melanoma", "skin", "targeted therapy", "vemurafenib"),
    ("multiple myeloma", "bone marrow", "targeted therapy", "bortezomib"),
    ("prostate cancer", "prostate", "hormone therapy", "enzalutamide"),
    ("colorectal cancer", "colon", "chemotherapy", "5-fluorouracil"),
    ("head and neck squamous cell carcinoma", "oral cavity", "targeted therapy", "cetuximab"),
    ("acute myeloid leukemia", "blood", "chemotherapy", "cytarabine"),
]


@dataclass
class SimulationSummary:
    path: Path
    n_cells: int
    n_genes: int
    fraction_zeros: float
    median_library_size: float
    datasets: list[str]
    n_samples: int
    planted_up: list[str] = field(default_factory=list)
    planted_down: list[str] = field(default_factory=list)


def _pick_genes(n_genes: int, rng: np.random.Generator) -> pd.DataFrame:
    """Real human symbols with Ensembl IDs, skipping non-coding-looking names."""
    t = gene_table().dropna(subset=["ensembl_id"]).drop_duplicates("symbol").drop_duplicates("ensembl_id")
    # RNA genes, antisense/divergent transcripts, open reading frames, and pseudogenes: numbered ones
    # (ZBED9P1) and a parent symbol + P + number (EEF1DP5 from EEF1D).
    sym = t["symbol"]
    noncoding = sym.str.contains(r"^(?:LOC|LINC|MIR|SNOR|RNU|RNA5|Y_RNA)|-AS\d|-DT$|orf|\dP\d*$", regex=True)
    noncoding |= sym.str.replace(r"B?P\d+$", "", regex=True).isin(set(sym)) & sym.str.contains(r"P\d+$")
    t = t[~noncoding].sort_values("symbol").reset_index(drop=True)
    if n_genes > len(t):
        raise ValueError(f"at most {len(t)} genes can be simulated")
    pick = np.sort(rng.choice(len(t), size=n_genes, replace=False))
    return t.iloc[pick].reset_index(drop=True)


def simulate_h5ad(
    out: Path,
    n_cells: int,
    n_datasets: int,
    samples_per_dataset: int = 4,
    effect: float = 1.0,
    seed: int = 0,
    n_genes: int = 5000,
    chunk_cells: int = 5000,
    progress: bool = True,
) -> SimulationSummary:
    import anndata as ad
    from rich.progress import Progress

    out = Path(out)
    rng = np.random.default_rng(seed)
    genes = _pick_genes(n_genes, rng)

    log_p = rng.normal(0.0, 2.5, n_genes)
    phi = np.exp(rng.normal(np.log(0.3), 0.5, n_genes))
    # The program uses moderately-to-highly expressed genes, so it is visible in sparse counts.
    candidates = np.argsort(-log_p)[: max(4 * PROGRAM_SIZE, n_genes // 4)]
    program_idx = rng.choice(candidates, size=min(2 * PROGRAM_SIZE, len(candidates)), replace=False)
    half = len(program_idx) // 2
    lfc = np.zeros(n_genes)
    lfc[program_idx[:half]] = effect * rng.uniform(0.5, 1.0, half)
    lfc[program_idx[half:]] = -effect * rng.uniform(0.5, 1.0, len(program_idx) - half)

    shape, phi32 = (1.0 / phi).astype(np.float32), phi.astype(np.float32)
    n_samples = n_datasets * samples_per_dataset
    batch = rng.normal(0.0, 0.3, (n_datasets, n_genes))
    lib_shift = rng.normal(0.0, 0.3, n_datasets)
    sample_fx = rng.normal(0.0, 0.15, (n_samples, n_genes))
    resistant = np.zeros(n_samples, dtype=bool)
    for d in range(n_datasets):  # balanced labels inside each dataset
        flags = np.arange(samples_per_dataset) % 2 == 0
        resistant[d * samples_per_dataset : (d + 1) * samples_per_dataset] = rng.permutation(flags)
    sample_of_cell = np.sort(np.arange(n_cells) % n_samples)  # cells grouped by sample, near-equal sizes
    dataset_of_sample = np.arange(n_samples) // samples_per_dataset

    dataset_names = [f"sim{d + 1:02d}" for d in range(n_datasets)]
    sample_names = [f"{dataset_names[dataset_of_sample[s]]}_s{s % samples_per_dataset + 1}" for s in range(n_samples)]
    ctx = [CONTEXTS[d % len(CONTEXTS)] for d in range(n_datasets)]
    ds_of_cell = dataset_of_sample[sample_of_cell]
    obs = pd.DataFrame(
        {
            "response": pd.Categorical(np.where(resistant[sample_of_cell], "resistant", "sensitive")),
            "dataset": pd.Categorical(np.asarray(dataset_names)[ds_of_cell]),
            "sample": pd.Categorical(np.asarray(sample_names)[sample_of_cell]),
            "cancer_type": pd.Categorical([ctx[d][0] for d in ds_of_cell]),
            "tissue": pd.Categorical([ctx[d][1] for d in ds_of_cell]),
            "therapy": pd.Categorical([ctx[d][2] for d in ds_of_cell]),
            "regimen": pd.Categorical([ctx[d][3] for d in ds_of_cell]),
        },
        index=pd.Index([f"cell{i:07d}" for i in range(n_cells)], name="cell_id"),
    )
    var = pd.DataFrame(
        {"ensembl_id": genes["ensembl_id"].to_numpy(), "resistance_effect": lfc.astype(np.float32)},
        index=pd.Index(genes["symbol"].to_numpy(), name="gene_symbol"),
    )

    nnz_total = 0
    lib_sizes = []
    with atomic_file(out) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        ad.io.write_elem(f, "obs", obs)
        ad.io.write_elem(f, "var", var)
        for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            ad.io.write_elem(f, key, {})
        x = f.create_group("X")
        x.attrs["encoding-type"] = "csr_matrix"
        x.attrs["encoding-version"] = "0.1.0"
        x.attrs["shape"] = (n_cells, n_genes)
        data = x.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(1 << 18,))
        indices = x.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 18,))
        indptr = [np.zeros(1, dtype=np.int64)]
        with Progress(disable=not progress) as bar:
            task = bar.add_task(f"simulate {out.name}", total=n_cells)
            for start in range(0, n_cells, chunk_cells):
                stop = min(start + chunk_cells, n_cells)
                s = sample_of_cell[start:stop]
                d = dataset_of_sample[s]
                # float32 throughout the dense (cells x genes) arrays: half the memory and time
                log_rate = (log_p + batch[d] + sample_fx[s] + resistant[s][:, None] * (lfc * np.log(2))).astype(
                    np.float32
                )
                rate = np.exp(log_rate - log_rate.max(axis=1, keepdims=True))
                rate /= rate.sum(axis=1, keepdims=True)
                lib = np.exp(rng.normal(np.log(2000), 0.6, stop - start) + lib_shift[d]).astype(np.float32)
                # gamma-Poisson = negative binomial with mean mu and dispersion phi
                lam = rng.standard_gamma(np.broadcast_to(shape, rate.shape), dtype=np.float32)
                lam *= rate * lib[:, None] * phi32
                counts = rng.poisson(lam).astype(np.float32)
                rows, cols = np.nonzero(counts)
                vals = counts[rows, cols]
                n_old = data.shape[0]
                data.resize((n_old + len(vals),))
                indices.resize((n_old + len(vals),))
                data[n_old:] = vals
                indices[n_old:] = cols.astype(np.int32)
                indptr.append(n_old + np.cumsum(np.bincount(rows, minlength=stop - start)))
                nnz_total += len(vals)
                lib_sizes.append(counts.sum(axis=1))
                bar.advance(task, stop - start)
        x.create_dataset("indptr", data=np.concatenate(indptr).astype(np.int64))

    libs = np.concatenate(lib_sizes)
    summary = SimulationSummary(
        path=out,
        n_cells=n_cells,
        n_genes=n_genes,
        fraction_zeros=1 - nnz_total / (n_cells * n_genes),
        median_library_size=float(np.median(libs)),
        datasets=dataset_names,
        n_samples=n_samples,
        planted_up=var.index[lfc > 0].tolist(),
        planted_down=var.index[lfc < 0].tolist(),
    )
    log.info("simulated %s: %d cells, %.1f%% zeros", out, n_cells, 100 * summary.fraction_zeros)
    return summary
