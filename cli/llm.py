"""CLI of the LLM arm: ``prompt`` (zero/few-shot prediction of a store's cells with a chat model) and
the llama branch of ``bench embed`` (vLLM vs transformers). Registered by cli/main.py."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from scdrugmap_ray.engine.errors import UserError

log = logging.getLogger(__name__)


def bench_llama_cli(data: Path, checkpoint: Path | None, preset: str | None, cells: int, batch_tokens: int,
                    say: Any) -> None:
    from scdrugmap_ray.engine.data.store import CellStore
    from scdrugmap_ray.engine.llm.bench import bench_llama

    if (checkpoint is None) == (preset is None):
        raise UserError("give exactly one of --checkpoint DIR or --preset NAME")
    opts = {"checkpoint": str(checkpoint) if checkpoint else None, "preset": preset}
    for line in bench_llama(opts, CellStore.open(data), cells, batch_tokens):
        say(line)


def prompt(
    store: Annotated[Path, typer.Argument(help="A cell store directory.")],
    out: Annotated[Path, typer.Option(help="Output Parquet file (one row per prompted cell).")],
    model: Annotated[str, typer.Option(help="Served model name (OpenAI-compatible endpoint).")] = "gpt-4o-mini",
    base_url: Annotated[str, typer.Option(help="OpenAI-compatible base URL.")] = "https://api.openai.com/v1",
    api_key_env: Annotated[str, typer.Option(help="NAME of the environment variable holding the API key.")] = (
        "OPENAI_API_KEY"),
    llama: Annotated[Path | None, typer.Option(help="Prompt a local chat Llama directory with vLLM instead.")] = None,
    few_shot: Annotated[int, typer.Option(help="Labelled example cells per prompt (0: zero-shot).")] = 0,
    cells: Annotated[int, typer.Option(help="Labelled cells to predict (a seeded sample).")] = 100,
    top_k: Annotated[int, typer.Option(help="Genes per cell sentence.")] = 100,
    context: Annotated[bool, typer.Option(help="Put cancer type / tissue / drug in the prompt.")] = True,
    concurrency: Annotated[int, typer.Option(help="Requests in flight.")] = 8,
    cache: Annotated[Path | None, typer.Option(help="Response cache directory (default: the user cache).")] = None,
    seed: int = 0,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Zero/few-shot drug-response prediction of a store's labelled cells by a chat model; prints metrics,
    abstentions, tokens and cost. Few-shot examples come from the store's other labelled cells."""
    import numpy as np
    import pandas as pd
    from scdrugmap_ray.engine.data.splits import Fold
    from scdrugmap_ray.engine.data.store import CellStore
    from scdrugmap_ray.engine.eval.metrics import compute_metrics
    from scdrugmap_ray.engine.fsutil import atomic_file
    from scdrugmap_ray.engine.llm.predict import PromptSettings, chat_backend_of, predict_prompts
    from scdrugmap_ray.engine.models.base import cache_root, get_model

    cs = CellStore.open(store)
    obs = cs.obs()
    rows = np.flatnonzero(obs["label"].notna().to_numpy())
    if len(rows) == 0:
        raise UserError(f"{store} has no labelled cells to predict")
    rng = np.random.default_rng(seed)
    rows = rng.permutation(rows)
    test, train = np.sort(rows[:cells]), rows[cells:]
    if few_shot and len(train) < few_shot:
        raise UserError(f"--few-shot {few_shot} needs that many labelled cells besides the {len(test)} predicted")
    fold = Fold("prompt", 0, "prompt", train, np.zeros(0, np.int64), test, None, 0)
    settings = PromptSettings(k=max(1, few_shot), context=context, top_k=top_k)
    if llama is not None:
        m = get_model("llama", {"checkpoint": str(llama)})
    else:
        m = get_model("openai-chat", {"base_url": base_url, "model": model, "api_key_env": api_key_env,
                                      "concurrency": concurrency})
    backend = chat_backend_of(m, cache or cache_root() / "llm-responses")
    try:
        res = predict_prompts(backend, cs, obs, fold, "few_shot" if few_shot else "zero_shot", settings, seed,
                              progress=not quiet)
    finally:
        backend.close()
    df = pd.DataFrame({"cell_id": obs["cell_id"].to_numpy()[res.test_rows], "y_true": res.y_true,
                       "p_sensitive": res.p_sensitive, "abstained": res.abstained,
                       "abstain_reason": res.reasons, "answer": res.answers, "genes_dropped": res.genes_dropped})
    with atomic_file(out) as tmp:
        df.to_parquet(tmp, index=False)
    mt = compute_metrics(res.y_true, res.p_sensitive)
    u = res.usage
    typer.echo(f"cells={len(df)} n_abstain={int(res.abstained.sum())} abstain_rate={res.abstained.mean():.3f} "
               f"n_truncated={int((res.genes_dropped > 0).sum())} f1={mt['f1']:.3f} auroc={mt['auroc']:.3f}")
    typer.echo(f"requests={u.n_requests} cached={u.n_cached} retries={u.retries} prompt_tokens={u.prompt_tokens} "
               f"completion_tokens={u.completion_tokens} cost_usd={u.cost_usd:.4f}")
    typer.echo(f"wrote {out}")


def register(app: Any, bench_app: Any) -> None:
    app.command("prompt")(prompt)
