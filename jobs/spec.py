"""The benchmark specification: one YAML file, validated strictly.

Unknown keys are errors with a "did you mean"; every error is one line (a UserError). Relative paths
are taken relative to the current directory, as in any command-line tool.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from scdrugmap_ray.engine.errors import UserError
from scdrugmap_ray.engine.models.base import HEADS, cache_root

STRATEGIES = ("frozen", "lora", "zero_shot", "few_shot")
#: strategies that prompt a chat model (settings in the benchmark's `prompting:` block)
PROMPT_STRATEGIES = ("zero_shot", "few_shot")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SimulateSpec(_Strict):
    """Simulated data generated on the fly (cached): the quickstart needs no download."""

    cells: int = Field(4000, ge=10)
    datasets: int = Field(4, ge=1)
    samples_per_dataset: int = Field(4, ge=1)
    effect: float = Field(1.0, ge=0)
    genes: int = Field(5000, ge=100)
    seed: int = 0


class DataSpec(_Strict):
    path: str | None = None
    simulate: SimulateSpec | None = None
    name: str | None = None
    label_key: str | None = None
    sensitive: list[str] = []
    resistant: list[str] = []
    dataset_key: str | None = None
    dataset: str | None = None
    sample_key: str | None = None
    layer: str | None = None
    gene_key: str | None = None
    obs_map: dict[str, str] = {}
    # fill cancer_type/tissue/therapy/regimen from the scDrugMap catalog (the dataset column holds DataN ids
    # or GEO names); true = the primary collection, "external": bare DataN ids are external datasets
    catalog: bool | Literal["primary", "external"] = False

    @property
    def catalog_collection(self) -> str | None:
        return ("primary" if self.catalog is True else self.catalog) or None

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if (self.path is None) == (self.simulate is None):
            raise ValueError("each data entry needs exactly one of 'path' or 'simulate'")
        if self.dataset_key and self.dataset:
            raise ValueError("give either 'dataset_key' (an obs column) or 'dataset' (one name), not both")
        return self

    @property
    def display_name(self) -> str:
        if self.name:
            return self.name
        if self.path:
            return Path(self.path).name.removesuffix(".h5ad")
        return "simulated"


class ModelSpec(_Strict):
    name: str
    head: Literal["mlp", "logreg"] | None = None
    options: dict[str, Any] = {}
    head_options: dict[str, Any] = {}
    lora: dict[str, Any] = {}  # this model's LoRA settings (over the benchmark's lora block)
    strategies: list[str] | None = None  # this model's strategies (default: the benchmark's it can run)


class PooledSpec(_Strict):
    folds: int = Field(5, ge=2)
    split: Literal["sample", "cell"] | list[Literal["sample", "cell"]] = "sample"

    @property
    def splits(self) -> list[str]:
        return [self.split] if isinstance(self.split, str) else list(dict.fromkeys(self.split))


class CrossDataSpec(_Strict):
    holdout: Literal["each"] | list[str] = "each"
    train: list[str] | None = None
    few_shot: list[int] = []

    @field_validator("few_shot")
    @classmethod
    def _positive(cls, ks: list[int]) -> list[int]:
        if any(k <= 0 for k in ks):
            raise ValueError("few_shot values are cells per class and must be positive (0-shot always runs)")
        return sorted(set(ks))


class EvaluationSpec(_Strict):
    pooled: PooledSpec | None = None
    cross_data: CrossDataSpec | None = None
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    bootstrap: int = Field(1000, ge=0)

    @model_validator(mode="after")
    def _some_scheme(self) -> EvaluationSpec:
        if self.pooled is None and self.cross_data is None:
            raise ValueError("evaluation needs at least one of 'pooled' or 'cross_data'")
        return self


class ResourcesSpec(_Strict):
    cpus_per_unit: float = Field(1, gt=0)
    gpus_per_unit: float = Field(0, ge=0)


class ExplainSpec(_Strict):
    """``explain:`` block: explain a unit when the run finishes (see ``scdrugmap-ray explain --help``)."""

    unit: str | None = None  # default: the best unit by mean AUROC
    method: Literal["ig", "gxi", "attention"] = "ig"  # attention: geneformer and tgpt only
    max_cells: int = Field(1000, ge=1)
    fm_max_cells: int = Field(64, ge=1)
    de_max_cells: int = Field(2000, ge=1)
    top: int = Field(20, ge=1)
    workers: int = Field(1, ge=1)
    out: str | None = None  # default: <run dir>/explain/<unit>


class BenchmarkSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,80}$")
    data: list[DataSpec] = Field(min_length=1)
    models: list[ModelSpec] = Field(min_length=1)
    strategies: list[str] = ["frozen"]
    evaluation: EvaluationSpec
    seeds: list[int] = Field([0], min_length=1)
    resources: ResourcesSpec = ResourcesSpec()
    lora: dict[str, Any] = {}  # LoRA settings of every model (r, alpha, dropout, epochs, workers, ...)
    prompting: dict[str, Any] = {}  # zero_shot/few_shot settings (k, context, top_k, max_test_cells, ...)
    explain: ExplainSpec | None = None  # explain a unit at the end of the run
    output: str | None = None
    cache: str | None = None

    @field_validator("strategies")
    @classmethod
    def _known_strategies(cls, strategies: list[str]) -> list[str]:
        for s in strategies:
            if s not in STRATEGIES:
                raise ValueError(f"strategy {s!r} is not available yet (available: {', '.join(STRATEGIES)})")
        return strategies

    @model_validator(mode="after")
    def _unique_names(self) -> BenchmarkSpec:
        names = [d.display_name for d in self.data]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"data entries share the name(s) {sorted(dup)}: give each a distinct 'name'")
        return self

    def output_dir(self, override: str | None = None) -> Path:
        return Path(override or self.output or f"runs/{self.name}")

    def cache_dir(self) -> Path:
        return Path(self.cache) if self.cache else cache_root()


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Walk the schema along an error location to list the keys allowed at that point."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(str(part))
        if field is None:
            return []
        current = _inner_model(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _inner_model(annotation: Any) -> Any:
    for arg in getattr(annotation, "__args__", ()) or ():
        inner = _inner_model(arg)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            return inner
    return annotation


def _explain(err: ValidationError, source: str) -> str:
    errors = err.errors()
    # A misspelt key also makes the key it was meant to be "missing": report the misspelling.
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = tuple(first["loc"])
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "(top level)"
    if first["type"] == "extra_forbidden":
        key = str(loc[-1])
        allowed = _allowed_keys(BenchmarkSpec, loc)
        hint = difflib.get_close_matches(key, allowed, n=1)
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        return f"{source}: unknown key {where!r}{did_you_mean}; allowed here: {', '.join(allowed)}"
    from .options import expected_line

    return f"{source}: {where}: {expected_line(first)}"


def parse_spec(data: Any, source: str = "benchmark") -> BenchmarkSpec:
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a YAML mapping with keys name, data, models, evaluation")
    try:
        spec = BenchmarkSpec.model_validate(data)
    except ValidationError as err:
        raise UserError(_explain(err, source)) from None
    for m in spec.models:
        if m.head is not None and m.head not in HEADS:
            raise UserError(f"{source}: model {m.name!r}: unknown head {m.head!r} (heads: {', '.join(HEADS)})")
    _check_option_types(spec, source)
    for m in spec.models:
        if "lora" in (m.strategies or spec.strategies):
            _check_lora(spec, m, source)
    _check_strategies(spec, source)
    return spec


def _check_option_types(spec: BenchmarkSpec, source: str) -> None:
    """Every nested settings block typed (jobs/options.py): one line naming the key path on a wrong type or
    an unknown key, here, before any conversion or Ray start. Numbers written as text become numbers."""
    from scdrugmap_ray.engine.models.base import model_class

    from . import options as typed

    for i, m in enumerate(spec.models):
        where = f"{source}: models[{i}]"
        m.options.update(typed.model_options(m.name, m.options, f"{where}.options"))
        if m.head_options:
            head = m.head or ("mlp" if ":" in m.name else model_class(m.name).default_head)
            m.head_options.update(typed.head_options(head, m.head_options, f"{where}.head_options"))
        if m.lora:
            m.lora.update(typed.lora_options(m.lora, f"{where}.lora"))
    if spec.lora:
        spec.lora.update(typed.lora_options(spec.lora, f"{source}: lora"))
    if spec.prompting:
        spec.prompting.update(typed.prompting_options(spec.prompting, f"{source}: prompting"))


def can_run(model_name: str, strategy: str) -> bool:
    """Whether a model can run a strategy: frozen needs features, lora a foundation model, zero/few-shot a
    chat model. A benchmark runs each model with the listed strategies it can run."""
    from scdrugmap_ray.engine.models.base import EmbeddingModel, FittedFeatureModel, FoundationModel, model_class

    if ":" in model_name:  # obsm:<key>, precomputed embeddings
        return strategy == "frozen"
    cls = model_class(model_name)
    if strategy == "frozen":
        return issubclass(cls, EmbeddingModel | FittedFeatureModel)
    if strategy == "lora":  # a model may opt out (llama: its vLLM backend has no trainable module)
        return issubclass(cls, FoundationModel) and getattr(cls, "supports_lora", True)
    return hasattr(cls, "chat_backend")


def _check_strategies(spec: BenchmarkSpec, source: str) -> None:
    for m in spec.models:
        for s in m.strategies or []:
            if s not in STRATEGIES or not can_run(m.name, s):
                raise UserError(f"{source}: model {m.name!r} cannot run strategy {s!r} (strategies: "
                                f"{', '.join(STRATEGIES)}; zero_shot/few_shot need a chat model)")
        if not any(can_run(m.name, s) for s in m.strategies or spec.strategies):
            raise UserError(f"{source}: model {m.name!r} can run none of the strategies {spec.strategies} "
                            "(zero_shot/few_shot need a chat model: llama or openai-chat; frozen needs embeddings)")
    if any(s in PROMPT_STRATEGIES for m in spec.models for s in m.strategies or spec.strategies):
        from scdrugmap_ray.engine.llm.predict import PromptSettings

        try:
            PromptSettings.from_options(dict(spec.prompting))
        except (UserError, TypeError) as err:
            raise UserError(f"{source}: prompting: {err}") from None


def _check_lora(spec: BenchmarkSpec, m: ModelSpec, source: str) -> None:
    from scdrugmap_ray.engine.models.base import FoundationModel, model_class
    from scdrugmap_ray.engine.train.lora import LoraSettings

    cls = model_class(m.name) if ":" not in m.name else None
    can = cls is not None and issubclass(cls, FoundationModel) and getattr(cls, "supports_lora", True)
    if not can:
        # In the benchmark's strategies a model runs those it can (a baseline beside LoRA'd models runs
        # frozen); asked for by the model's own `strategies:`, it is an error.
        if m.strategies and "lora" in m.strategies:
            raise UserError(
                f"{source}: model {m.name!r} cannot do strategy 'lora' (it has no transformer to adapt); "
                "give it strategies: [frozen], or fine-tune a foundation model"
            )
        return
    try:
        LoraSettings.from_options({**spec.lora, **m.lora})
    except UserError as err:
        raise UserError(f"{source}: model {m.name!r}: {err}") from None


def load_spec(path: str | Path) -> BenchmarkSpec:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"benchmark file {path} not found; see configs/quickstart.yaml for an example")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', err)}") from None
    return parse_spec(data, str(path))
