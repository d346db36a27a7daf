"""Typed nested options: a model's ``options``, a head's ``head_options``, the ``lora`` and ``prompting`` blocks.

Each is checked by a strict pydantic model built from what the engine declares: a model's or head's
``default_options`` (the type of each default: an int default wants an integer, a float one a number, a
bool one true/false, a string one a string or null; null and list defaults take anything) and the
typed fields of ``LoraSettings`` / ``PromptSettings``. A wrong type or an unknown key is one line naming
the key path, e.g. ``models[2].options.n_components: expected an integer, got 'fifty'``, found while the
spec is read: before any conversion, before Ray starts.

Numbers written the YAML 1.1 way without a dot (``lr: 1e-3`` is the string ``'1e-3'`` to PyYAML) are taken
as the numbers they spell.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, create_model
from scdrugmap_ray.engine.errors import UserError


def number_from_text(value: Any) -> Any:
    """``'1e-3'`` -> 0.001 (PyYAML reads exponents without a dot as strings); anything else unchanged."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


Number = Annotated[float, BeforeValidator(number_from_text)]

#: what a pydantic error type means, said plainly
EXPECTED = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number",
    "bool_type": "true or false", "bool_parsing": "true or false",
    "string_type": "a string", "list_type": "a list", "dict_type": "a mapping", "model_type": "a mapping",
    "literal_error": None, "none_required": "null",
}


def annotation_of_default(value: Any) -> Any:
    """The type an option with this default takes."""
    if isinstance(value, bool):
        return bool
    if isinstance(value, int):
        return int
    if isinstance(value, float):
        return Number
    if isinstance(value, str):
        return str | None
    if isinstance(value, dict):
        return dict[str, Any]
    return Any  # None (the option is free-form or optional) and lists (a grid, or one value)


def widen(annotation: Any) -> Any:
    """A dataclass field's annotation with ``float`` taking numbers written as text too."""
    if annotation is float:
        return Number
    args = typing.get_args(annotation)
    if args and type(None) in args and float in args:
        return Number | None
    return annotation


def schema_from_defaults(name: str, defaults: dict[str, Any]) -> type[BaseModel]:
    """A strict pydantic model whose fields are the ``default_options``, typed by their defaults."""
    fields: dict[str, Any] = {k: (annotation_of_default(v), v) for k, v in defaults.items()}
    return create_model(name, __config__=ConfigDict(extra="forbid", strict=True), **fields)


def schema_from_dataclass(cls: type, exclude: tuple[str, ...] = ()) -> type[BaseModel]:
    """A strict pydantic model with a settings dataclass's typed fields and defaults."""
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        fields[f.name] = (widen(hints[f.name]), default)
    return create_model(f"{cls.__name__}Options", __config__=ConfigDict(extra="forbid", strict=True), **fields)


def check(schema: type[BaseModel], values: Any, where: str) -> dict[str, Any]:
    """``values`` validated by ``schema``: the values given, with numbers written as text made numbers. A
    wrong type or unknown key is a UserError: ``<where>.<key>: expected an integer, got 'fifty'``."""
    if not isinstance(values, dict):
        raise UserError(f"{where}: expected a mapping of settings, got {values!r}")
    try:
        model = schema.model_validate(values)
    except ValidationError as err:
        raise UserError(explain(err, schema, where)) from None
    return {k: getattr(model, k) for k in values}


def explain(err: ValidationError, schema: type[BaseModel], where: str) -> str:
    errors = err.errors()
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = list(first["loc"])
    path = where + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[:1] or [])
    key = str(loc[0]) if loc else ""
    if first["type"] == "extra_forbidden":
        allowed = list(schema.model_fields)
        hint = difflib.get_close_matches(key, allowed, n=1)
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        return f"{path}: unknown key{did_you_mean}; allowed: {', '.join(allowed) or 'none'}"
    return f"{path}: {expected_line(first)}"


def expected_line(error: Any) -> str:
    """``expected an integer, got 'fifty'`` from one pydantic error (its own message where no plain one fits)."""
    what = EXPECTED.get(error["type"])
    if what is None:
        return str(error["msg"]).removeprefix("Value error, ")
    return f"expected {what}, got {error['input']!r}"


# ------------------------------------------------------------------------------------ the engine's


def model_options(model_name: str, options: dict[str, Any], where: str) -> dict[str, Any]:
    """Check a model's options by its class's declared defaults; returns them with numbers made numbers."""
    from scdrugmap_ray.engine.models.base import FoundationModel, model_class

    if ":" in model_name:  # obsm:<key> and other parametric names take no options here
        return dict(options)
    cls = model_class(model_name)
    defaults = dict(cls.default_options)
    if issubclass(cls, FoundationModel) and getattr(cls, "has_dtype_option", True):
        defaults.setdefault("dtype", "upstream")
    return check(schema_from_defaults(f"{cls.__name__}Options", defaults), options, where)


def head_options(head: str, options: dict[str, Any], where: str) -> dict[str, Any]:
    from scdrugmap_ray.engine.train.heads import LogRegHead, MLPHead

    cls = {c.name: c for c in (MLPHead, LogRegHead)}.get(head)
    if cls is None:
        return dict(options)
    return check(schema_from_defaults(f"{cls.__name__}Options", dict(cls.default_options)), options, where)


def lora_options(options: dict[str, Any], where: str) -> dict[str, Any]:
    from scdrugmap_ray.engine.train.lora import LoraSettings

    return check(schema_from_dataclass(LoraSettings, exclude=("seed",)), options, where)


def prompting_options(options: dict[str, Any], where: str) -> dict[str, Any]:
    from scdrugmap_ray.engine.llm.predict import PromptSettings

    return check(schema_from_dataclass(PromptSettings), options, where)
