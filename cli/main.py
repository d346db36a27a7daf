"""The ``scdrugmap-ray`` command line: thin, it parses and calls engine / jobs.

Bad input is one line on stderr (``error: ...``) and exit status 2, never a traceback.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from scdrugmap_ray.engine.defaults import DEFAULT_BATCH_TOKENS
from scdrugmap_ray.engine.errors import UserError
from scdrugmap_ray.engine.runtime import ray_native_notices_dropped, show_ray_worker_logs

log = logging.getLogger("scdrugmap_ray")


class _App(typer.Typer):
    """Typer app that turns UserError (also from inside Ray tasks) and bad command lines (an option out of
    its range, a missing argument) into one line and exit status 2."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        verbose = bool({"-v", "--verbose"} & set(sys.argv[1:]))
        with ray_native_notices_dropped(enabled=not verbose):  # Ray's C++ notices: only with --verbose
            return self._run(*args, **kwargs)

    def _run(self, *args: Any, **kwargs: Any) -> Any:
        try:
            rv = super().__call__(*args, standalone_mode=False, **kwargs)
        except UserError as err:
            cause = getattr(err, "cause", None)  # ray.exceptions.RayTaskError keeps the original here
            message = str(cause) if isinstance(cause, UserError) else str(err).strip().splitlines()[-1]
            typer.echo(f"error: {message}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as err:  # typer's (vendored) click errors: bad option values, missing arguments
            name = type(err).__name__
            if name == "NoArgsIsHelpError":
                err.show()  # type: ignore[attr-defined]
                sys.exit(2)
            if name == "Abort":
                typer.echo("aborted", err=True)
                sys.exit(1)
            code, fmt = getattr(err, "exit_code", None), getattr(err, "format_message", None)
            if not (isinstance(code, int) and callable(fmt)):
                raise
            typer.echo(f"error: {fmt()}", err=True)
            sys.exit(code)
        if isinstance(rv, int) and not isinstance(rv, bool):  # typer.Exit(code) in non-standalone mode
            sys.exit(rv)
        return rv


app = _App(
    name="scdrugmap-ray",
    help="Predict and benchmark single-cell drug response with foundation models, on Ray.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
models_app = _App(help="List models; write random-weight checkpoints.", no_args_is_help=True)
app.add_typer(models_app, name="models")
bench_app = _App(help="Benchmarks of the engine that print figures.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


def _print_version(value: bool) -> None:
    if value:
        import scdrugmap_ray

        typer.echo(f"scdrugmap-ray {scdrugmap_ray.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="More log output, Ray's worker logs too.")]
    = False,
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(show_path=False, rich_tracebacks=False, console=_stderr_console())],
        force=True,
    )
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    show_ray_worker_logs(verbose)  # Ray's worker logs on this terminal: only with --verbose


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def _say(line: str) -> None:
    typer.echo(line)


# ------------------------------------------------------------------------------------------ data


LabelKey = Annotated[str | None, typer.Option(help="obs column with drug-response labels (absent: unlabelled).")]
Sensitive = Annotated[list[str] | None, typer.Option(help="A label value meaning sensitive (repeatable).")]
Resistant = Annotated[list[str] | None, typer.Option(help="A label value meaning resistant (repeatable).")]
DatasetKey = Annotated[str | None, typer.Option(help="obs column naming each cell's dataset.")]
DatasetName = Annotated[str | None, typer.Option("--dataset", help="One dataset name for all cells.")]
SampleKey = Annotated[str | None, typer.Option(help="obs column naming each cell's sample (for grouped splits).")]
Layer = Annotated[str | None, typer.Option(help="Read this layer instead of X (e.g. counts).")]
GeneKey = Annotated[str | None, typer.Option(help="var column with gene names (default: var_names).")]
ObsMap = Annotated[
    list[str] | None,
    typer.Option(help="COLUMN=OBS_COLUMN for cancer_type, tissue, therapy or regimen (repeatable)."),
]
Catalog = Annotated[
    str | None,
    typer.Option(help="Fill cancer_type, tissue, therapy, regimen from the scDrugMap catalog: the dataset column "
                 "holds DataN ids or GEO names of this collection (primary or external; `datasets list`)."),
]


def _convert_options(
    label_key: str | None,
    sensitive: list[str] | None,
    resistant: list[str] | None,
    dataset_key: str | None,
    dataset: str | None,
    sample_key: str | None,
    layer: str | None,
    gene_key: str | None,
    obs_map: list[str] | None,
    catalog: str | None = None,
) -> Any:
    from scdrugmap_ray.engine.data.convert import ConvertOptions
    from scdrugmap_ray.engine.data.schema import METADATA_COLUMNS

    mapping: dict[str, str] = {}
    for item in obs_map or []:
        key, sep, col = item.partition("=")
        if not sep or not col or key not in METADATA_COLUMNS:
            raise UserError(
                f"--obs-map {item!r}: expected COLUMN=OBS_COLUMN with COLUMN one of {', '.join(METADATA_COLUMNS)}"
            )
        mapping[key] = col
    if dataset_key and dataset:
        raise UserError("give either --dataset-key (an obs column) or --dataset (one name), not both")
    if catalog not in (None, "primary", "external"):
        raise UserError(f"--catalog {catalog!r}: expected primary or external")
    return ConvertOptions(
        label_key=label_key,
        sensitive=tuple(sensitive or ()),
        resistant=tuple(resistant or ()),
        dataset_key=dataset_key,
        dataset=dataset,
        sample_key=sample_key,
        layer=layer,
        gene_key=gene_key,
        obs_map=mapping,
        catalog=catalog,
    )


@app.command()
def convert(
    input: Annotated[Path, typer.Argument(help="An .h5ad file.")],
    out_dir: Annotated[Path, typer.Argument(help="The cell store directory to write.")],
    label_key: LabelKey = None,
    sensitive: Sensitive = None,
    resistant: Resistant = None,
    dataset_key: DatasetKey = None,
    dataset: DatasetName = None,
    sample_key: SampleKey = None,
    layer: Layer = None,
    gene_key: GeneKey = None,
    obs_map: ObsMap = None,
    catalog: Catalog = None,
    chunk_size: Annotated[int, typer.Option(min=1, help="Cells read per chunk (bounds memory).")] = 10000,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT_DIR if it exists.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Convert an AnnData .h5ad into a cell store (streaming, bounded memory)."""
    from dataclasses import replace

    from scdrugmap_ray.engine.data.convert import convert_h5ad

    opts = _convert_options(
        label_key, sensitive, resistant, dataset_key, dataset, sample_key, layer, gene_key, obs_map, catalog
    )
    if out_dir.exists() and not overwrite:
        raise UserError(f"{out_dir} already exists; choose another OUT_DIR or pass --overwrite")
    report = convert_h5ad(input, out_dir, replace(opts, chunk_size=chunk_size), progress=not quiet,
                          overwrite=overwrite)
    for line in report.lines():
        _say(line)
    _say(f"wrote cell store {out_dir}")


@app.command()
def validate(
    input: Annotated[Path, typer.Argument(help="An .h5ad file.")],
    label_key: LabelKey = None,
    sensitive: Sensitive = None,
    resistant: Resistant = None,
    dataset_key: DatasetKey = None,
    dataset: DatasetName = None,
    sample_key: SampleKey = None,
    layer: Layer = None,
    gene_key: GeneKey = None,
    obs_map: ObsMap = None,
    catalog: Catalog = None,
) -> None:
    """Report what convert would do with an .h5ad, writing nothing."""
    from scdrugmap_ray.engine.data.convert import inspect_h5ad

    opts = _convert_options(
        label_key, sensitive, resistant, dataset_key, dataset, sample_key, layer, gene_key, obs_map, catalog
    )
    for line in inspect_h5ad(input, opts).lines():
        _say(line)
    _say("ok: convert would succeed")


@app.command()
def simulate(
    out: Annotated[Path, typer.Argument(help="The .h5ad file to write.")],
    cells: Annotated[int, typer.Option(min=10, help="Number of cells.")] = 4000,
    datasets: Annotated[int, typer.Option(min=1, help="Number of datasets (batches).")] = 4,
    samples_per_dataset: Annotated[int, typer.Option(min=1, help="Samples per dataset.")] = 4,
    effect: Annotated[float, typer.Option(min=0.0, help="Strength of the resistance program (0: none).")] = 1.0,
    genes: Annotated[int, typer.Option(min=100, help="Number of genes.")] = 5000,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Simulate drug-response scRNA-seq counts (sample-level labels, planted resistance program)."""
    from scdrugmap_ray.engine.data.simulate import simulate_h5ad

    if out.suffix != ".h5ad":
        raise UserError(f"{out}: the output must be an .h5ad file name")
    summary = simulate_h5ad(
        out,
        n_cells=cells,
        n_datasets=datasets,
        samples_per_dataset=samples_per_dataset,
        effect=effect,
        seed=seed,
        n_genes=genes,
    )
    _say(
        f"wrote {out}: {summary.n_cells} cells x {summary.n_genes} genes, "
        f"{summary.fraction_zeros:.1%} zeros, median library size {summary.median_library_size:.0f}"
    )


# ------------------------------------------------------------------------------------- benchmarks


@app.command()
def run(
    benchmark: Annotated[Path, typer.Argument(help="The benchmark YAML.")],
    out: Annotated[str | None, typer.Option(help="Run directory (default: the YAML's output).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue a run: skip finished folds.")] = False,
    address: Annotated[
        str | None, typer.Option(help="Connect to this Ray cluster instead of starting a local one.")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars (as --no-progress).")] = False,
) -> None:
    """Run a benchmark on an embedded local Ray (or an existing cluster with --address)."""
    import scdrugmap_ray as sdr

    result = sdr.run(benchmark, out=out, resume=resume, address=address, progress=progress and not quiet)
    _print_summary(result)


def _print_summary(result: Any) -> None:
    random = result.random_weight_models
    if random:
        _say(f"WARNING: RANDOM WEIGHTS (not pretrained) for {', '.join(random)}: their scores mean nothing")
    _say(result.summary().round(3).to_string(index=False))
    _say(f"results: {result.run_dir / 'results.parquet'}")
    _say(f"report:  {result.report}")


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="A run directory.")]) -> None:
    """Rebuild report.html of a run."""
    from scdrugmap_ray.jobs.report import build_report

    if not (run_dir / "results.parquet").exists():
        raise UserError(f"{run_dir} has no results.parquet; is it the output directory of scdrugmap-ray run?")
    _say(f"wrote {build_report(run_dir)}")


# ---------------------------------------------------------------------------------------- cluster

Address = Annotated[
    str, typer.Option(envvar="RAY_ADDRESS", help="The cluster's dashboard, e.g. http://HEAD:8265.")
]


@app.command()
def submit(
    benchmark: Annotated[Path, typer.Argument(help="The benchmark YAML.")],
    address: Address,
    out: Annotated[str | None, typer.Option(help="Run directory on the cluster's storage.")] = None,
    pip: Annotated[list[str] | None, typer.Option(help="Extra pip package for the job (repeatable).")] = None,
    wait: Annotated[bool, typer.Option(help="Wait for the job to finish and print its logs.")] = False,
) -> None:
    """Submit a benchmark to a Ray cluster through the Ray Jobs API."""
    from scdrugmap_ray.jobs import submit as jobs_submit
    from scdrugmap_ray.jobs.spec import load_spec

    load_spec(benchmark)  # refuse a bad spec here, not on the cluster
    job_id = jobs_submit.submit(benchmark, address, out=out, pip=pip)
    _say(f"submitted {job_id}")
    if wait:
        final = jobs_submit.wait(address, job_id)
        _say(jobs_submit.logs(address, job_id))
        _say(f"{job_id}: {final}")
        if final != "SUCCEEDED":
            raise typer.Exit(1)


@app.command()
def status(job_id: Annotated[str, typer.Argument()], address: Address) -> None:
    """Show a submitted job's status."""
    from scdrugmap_ray.jobs import submit as jobs_submit

    _say(f"{job_id}: {jobs_submit.status(address, job_id)}")


@app.command()
def logs(job_id: Annotated[str, typer.Argument()], address: Address) -> None:
    """Print a submitted job's logs."""
    from scdrugmap_ray.jobs import submit as jobs_submit

    _say(jobs_submit.logs(address, job_id))


@app.command()
def stop(job_id: Annotated[str, typer.Argument()], address: Address) -> None:
    """Stop a submitted job."""
    from scdrugmap_ray.jobs import submit as jobs_submit

    stopped = jobs_submit.stop(address, job_id)
    _say(f"{job_id}: {'stop requested' if stopped else 'already finished'}")


# ------------------------------------------------------------------------------------------ models


@models_app.command("list")
def models_list() -> None:
    """List the models a benchmark can name."""
    from scdrugmap_ray.engine.models.base import available_models

    for name in available_models():
        _say(name)


@models_app.command("init-random")
def models_init_random(
    name: Annotated[str, typer.Argument(help="A foundation model name (see `models list`).")],
    out_dir: Annotated[Path, typer.Argument(help="Directory to write the checkpoint into.")],
    preset: Annotated[str, typer.Option(help="Size preset (tiny, or the real sizes).")] = "tiny",
    config: Annotated[Path | None, typer.Option(help="JSON file overriding the preset's config.")] = None,
) -> None:
    """Write a RANDOM-WEIGHT checkpoint in the model's official format (tests, demos, smoke tests)."""
    import json

    import scdrugmap_ray as sdr

    overrides = None
    if config is not None:
        try:
            overrides = json.loads(config.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"--config {config}: not a readable JSON file ({err})") from None
    sdr.models.init_random(name, out_dir, preset, overrides)
    _say(f"wrote {name} checkpoint ({preset}) to {out_dir}: RANDOM WEIGHTS, not pretrained")


def _foundation_model(name: str, checkpoint: Path | None, preset: str | None) -> Any:
    from scdrugmap_ray.tl import foundation_model

    if (checkpoint is None) == (preset is None):
        raise UserError("give exactly one of --checkpoint DIR or --preset NAME")
    model = foundation_model(name, checkpoint, preset, None)
    if model.random_weights:
        _say(f"{name}: RANDOM WEIGHTS (not pretrained): embeddings carry no biology")
    return model


Checkpoint = Annotated[Path | None, typer.Option(help="Checkpoint directory in the model's official format.")]
Preset = Annotated[str | None, typer.Option(help="Random-weight preset instead of a checkpoint (e.g. tiny).")]


@app.command()
def tokenize(
    store: Annotated[Path, typer.Argument(help="A cell store directory.")],
    model: Annotated[str, typer.Option(help="Model name.")],
    out: Annotated[Path, typer.Option(help="Output directory (Parquet).")],
    checkpoint: Checkpoint = None,
    preset: Preset = None,
) -> None:
    """Write what a model sees for each cell: cell_id, input_ids and model-specific columns."""
    from scdrugmap_ray.engine.data.store import CellStore
    from scdrugmap_ray.engine.pipeline.embed import tokenize_store

    fm = _foundation_model(model, checkpoint, preset)
    if out.exists():
        raise UserError(f"{out} already exists; choose a new output directory")
    coverage = tokenize_store(fm, CellStore.open(store), out)
    _say(f"wrote tokens to {out}; vocabulary coverage {coverage:.1%}")


Device = Annotated[str | None, typer.Option(help="cpu or cuda; default: cuda when the Ray cluster has GPUs.")]
Actors = Annotated[int | None, typer.Option(min=1, help="Most model actors (default: one per GPU, or per node).")]
ActorResource = Annotated[list[str] | None, typer.Option(
    "--actor-resource", help="A Ray resource every model actor needs, NAME=AMOUNT (repeatable), e.g. accelerator=1.")]


@app.command()
def embed(
    store: Annotated[Path, typer.Argument(help="A cell store directory, or an .h5ad (converted once into the cache; "
                                                "--layer names a layer of it).")],
    model: Annotated[str, typer.Option(help="Model name.")],
    out: Annotated[str, typer.Option(help="Output folder (a path every node reaches, or s3://, gs://): one "
                                          "part-NNNNN.parquet per store shard; the same folder again resumes. Or, "
                                          "for an .h5ad input, an .h5ad: a copy with obsm[KEY] and uns[KEY].")],
    checkpoint: Checkpoint = None,
    preset: Preset = None,
    batch_tokens: Annotated[int | None, typer.Option(
        min=1, help="Tokens per model batch (cells x longest cell); default 16,384 on GPU, 2,048 on CPU.")] = None,
    device: Device = None,
    actors: Actors = None,
    actor_resource: ActorResource = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
    layer: Layer = None,
    key_added: Annotated[str | None, typer.Option(help="obsm/uns key of an .h5ad --out (default X_<model>), as "
                                                  "sdr.tl.embed(key_added=...).")] = None,
) -> None:
    """Embed every cell of a store with a foundation model: Ray Data streams the cells through an actor
    pool whose actors write the embeddings; the driver's memory does not grow with the number of cells.
    With an .h5ad --out, the embeddings go into a copy of the input's obsm (sdr.tl.embed, as in a notebook)."""
    from scdrugmap_ray.engine.data.convert import ConvertOptions, ensure_store
    from scdrugmap_ray.engine.models.base import cache_root
    from scdrugmap_ray.engine.pipeline.embed import embed_to_dir
    from scdrugmap_ray.engine.runtime import parse_resources

    fm = _foundation_model(model, checkpoint, preset)
    if store.is_dir() and layer:
        raise UserError("--layer applies to an .h5ad input, not to a cell store")
    if out.endswith(".h5ad"):
        _embed_into_h5ad(store, Path(out), model, checkpoint, preset, key_added, batch_tokens, layer, device)
        return
    if key_added is not None:
        raise UserError("--key-added names the obsm key of an .h5ad --out; this --out is a folder of Parquet parts")
    cells = ensure_store(store, ConvertOptions(layer=layer), cache_root() / "stores", progress=not quiet)
    res = embed_to_dir(fm, cells, out, batch_tokens=batch_tokens, device=device, num_actors=actors,
                       actor_resources=parse_resources(actor_resource), progress=not quiet)
    resumed = f" ({res.shards_skipped} shards were already written)" if res.shards_skipped else ""
    _say(f"wrote {res.n_cells} x {res.dim} embeddings to {res.out} in {res.n_shards} parts{resumed}; "
         f"{res.cells_embedded} cells embedded now on {res.device} ({res.cells_per_s:,.1f} cells/s)")
    if res.cells_per_node:
        _say("cells per node: " + ", ".join(f"{node[:12]}={n}" for node, n in sorted(res.cells_per_node.items())))


def _embed_into_h5ad(src: Path, out: Path, model: str, checkpoint: Path | None, preset: str | None,
                     key_added: str | None, batch_tokens: int | None, layer: str | None, device: str | None) -> None:
    """``embed DATA.h5ad --out OUT.h5ad``: sdr.tl.embed on the file (the Ray Data engine), written as a copy."""
    import scdrugmap_ray as sdr
    from scdrugmap_ray.engine.fsutil import atomic_file

    if src.is_dir() or src.suffix != ".h5ad":
        raise UserError(f"--out {out}: an .h5ad output is the input .h5ad with obsm added; {src} is not an .h5ad")
    if out.exists():
        raise UserError(f"{out} already exists; choose another --out")
    adata = sdr.tl.embed(src, model, checkpoint=checkpoint, preset=preset, key_added=key_added,
                         batch_tokens=batch_tokens, layer=layer, device=device, backend="ray")
    assert adata is not None
    key = key_added or f"X_{model}"
    with atomic_file(out) as tmp:
        adata.write_h5ad(tmp)
    adata.file.close()
    _say(f"wrote {out}: obsm[{key!r}] {adata.obsm[key].shape[0]} x {adata.obsm[key].shape[1]} "
         f"({adata.uns[key]['n_cells_embedded']} cells embedded), provenance in uns[{key!r}]")


@bench_app.command("embed")
def bench_embed(
    model: Annotated[str, typer.Option(help="Model name.")],
    data: Annotated[Path, typer.Option(help="A cell store directory.")],
    checkpoint: Checkpoint = None,
    preset: Preset = None,
    cells: Annotated[int, typer.Option(min=1, help="Cells to embed.")] = 2000,
    batch_tokens: Annotated[int | None, typer.Option(
        min=1, help="Engine tokens per batch; default 16,384 on GPU, 2,048 on CPU (llama: 16,384).")] = None,
    naive_batch: Annotated[int, typer.Option(min=1, help="Cells per batch of the naive loop.")] = 8,
) -> None:
    """Engine vs the naive loop (fixed batches padded to the maximum, fp32): cells/s, padding, memory.
    For llama: vLLM vs the transformers backend on the same checkpoint and cells."""
    from scdrugmap_ray.engine.data.store import CellStore
    from scdrugmap_ray.engine.pipeline.bench import bench_embed as run_bench

    if model == "llama":
        from .llm import bench_llama_cli

        return bench_llama_cli(data, checkpoint, preset, cells, batch_tokens or DEFAULT_BATCH_TOKENS, _say)
    fm = _foundation_model(model, checkpoint, preset)
    res = run_bench(fm, CellStore.open(data), cells, batch_tokens=batch_tokens, naive_batch_cells=naive_batch)
    for side in ("engine", "in_process", "naive"):
        _say(res[side]["line"])  # type: ignore[index]
    _say(f"speedup_vs_naive={res['speedup_vs_naive']:.2f} "
         f"speedup_in_process_vs_naive={res['speedup_in_process_vs_naive']:.2f} "
         f"cpu_speedup_vs_naive={res['cpu_speedup_vs_naive']:.2f} max_abs_diff={res['max_abs_diff']:.2e} "
         f"batch_tokens={batch_tokens or 'device default'}")


def _lora_settings(seed: int, **given: Any) -> Any:
    from scdrugmap_ray.engine.train.lora import LoraSettings

    return LoraSettings.from_options({k: v for k, v in given.items() if v is not None}, seed=seed)


@app.command()
def finetune(
    store: Annotated[Path, typer.Argument(help="A cell store directory with labelled cells.")],
    model: Annotated[str, typer.Option(help="Model name.")],
    out: Annotated[Path, typer.Option(help="Output directory; the same one again resumes a killed run.")],
    checkpoint: Checkpoint = None,
    preset: Preset = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Most epochs (early stopping on validation loss).")]
    = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Ray Train workers (DDP).")] = None,
    gpu: Annotated[bool, typer.Option("--gpu", help="One GPU per worker (NCCL, bf16).")] = False,
    r: Annotated[int | None, typer.Option(min=1, help="LoRA rank (default 8).")] = None,
    alpha: Annotated[float | None, typer.Option(min=0.0, help="LoRA alpha (default 8).")] = None,
    dropout: Annotated[float | None, typer.Option(min=0.0, max=0.99, help="LoRA dropout (default 0.05).")] = None,
    target: Annotated[list[str] | None, typer.Option(help="LoRA target module suffix (repeatable).")] = None,
    batch_cells: Annotated[int | None, typer.Option(min=1, help="Cells per optimizer step, all workers.")] = None,
    batch_tokens: Annotated[int | None, typer.Option(min=1, help="Tokens per micro-batch on one worker.")] = None,
    gradient_checkpointing: Annotated[bool, typer.Option(help="Recompute activations (long sequences).")] = False,
    val_fraction: Annotated[float, typer.Option(min=0.0, max=0.5, help="Share of samples (or cells) held out for "
                                                "validation.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the split and of training.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Fine-tune a foundation model with LoRA + a classifier head on all labelled cells of a store."""
    from scdrugmap_ray.engine.data.splits import train_val_split
    from scdrugmap_ray.engine.data.store import CellStore
    from scdrugmap_ray.engine.train.lora import LabelledCells
    from scdrugmap_ray.engine.train.lora import finetune as run_finetune

    fm = _foundation_model(model, checkpoint, preset)
    settings = _lora_settings(
        epochs=epochs, workers=workers, use_gpu=gpu or None, r=r, alpha=alpha, dropout=dropout, targets=target,
        batch_cells=batch_cells, batch_tokens=batch_tokens, gradient_checkpointing=gradient_checkpointing or None,
        seed=seed,
    )
    cells = CellStore.open(store)
    obs = cells.obs(["cell_id", "label", "dataset", "sample"])
    train_rows, val_rows = train_val_split(obs, val_fraction, seed)
    labels = obs["label"].to_numpy()
    res = run_finetune(fm, cells, LabelledCells(train_rows, labels[train_rows]),
                       LabelledCells(val_rows, labels[val_rows]), out, settings, progress=not quiet)
    m = res.metrics
    _say(f"trained {m['epochs_run']} epochs (best {m['best_epoch']}, validation loss {m['best_val_loss']:.4f}); "
         f"model in {res.model_dir}")


@bench_app.command("finetune")
def bench_finetune(
    model: Annotated[str, typer.Option(help="Model name.")],
    data: Annotated[Path, typer.Option(help="A cell store directory with labelled cells.")],
    checkpoint: Checkpoint = None,
    preset: Preset = None,
    cells: Annotated[int, typer.Option(min=2, help="Training cells.")] = 256,
    workers: Annotated[list[int] | None, typer.Option(help="Worker counts to compare (repeatable).")] = None,
    epochs: Annotated[int, typer.Option(min=1, help="Epochs per run (the first warms up).")] = 2,
    batch_cells: Annotated[int, typer.Option(min=1, help="Cells per optimizer step, all workers.")] = 32,
    gpu: Annotated[bool, typer.Option("--gpu", help="One GPU per worker.")] = False,
) -> None:
    """LoRA training throughput (cells/s per worker and in all) for 1 vs N Ray Train workers."""
    from scdrugmap_ray.engine.data.store import CellStore
    from scdrugmap_ray.engine.pipeline.bench import bench_finetune as run_bench

    fm = _foundation_model(model, checkpoint, preset)
    for line in run_bench(fm, CellStore.open(data), cells, workers or [1, 2], epochs, batch_cells, gpu):
        _say(line)


# Model registry, atlas-scale predict and the server (cli/serve.py).
from .serve import register as _register_serve  # noqa: E402

_register_serve(app, models_app, bench_app)

# Gene attributions, DE, biomarkers and resistance analysis of a run (cli/explain.py).
from .explain import register as _register_explain  # noqa: E402

_register_explain(app)

# The LLM arm: zero/few-shot prompting of a store's cells (cli/llm.py).
from .llm import register as _register_llm  # noqa: E402

_register_llm(app, bench_app)

# The scDrugMap collection's catalog (cli/datasets.py) and the benchmark planner with its cost estimate (cli/plan.py).
from .datasets import register as _register_datasets  # noqa: E402

_register_datasets(app)
from .plan import register as _register_plan  # noqa: E402

_register_plan(app)

if __name__ == "__main__":
    app()
