"""The one-line messages of a refused space: a pydantic error as `KEY message (got VALUE)`, with
the allowed keys or the closest one (`explain`), and a YAML error with its line and column
(`yaml_message`)."""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tuner.common.errors import did_you_mean
from tuner.common.text import shown

_MESSAGES = {
    "missing": "is required",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "int_parsing": "must be a whole number",
    "int_type": "must be a whole number",
    "int_from_float": "must be a whole number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "too_short": "must not be empty",
    "finite_number": "must be a finite number",
}
_BOUNDS = {
    "greater_than": ">",
    "greater_than_equal": ">=",
    "less_than": "<",
    "less_than_equal": "<=",
}


def explain(error: ValidationError, model: type[BaseModel], *, prefix: str = "") -> str:
    """The first pydantic error as `key message (got value)`."""
    err = error.errors()[0]
    loc = [part for part in err["loc"] if isinstance(part, int) or not _is_type_tag(part)]
    key = ".".join(
        [prefix] * bool(prefix) + [str(p) if isinstance(p, str) else f"[{p}]" for p in loc]
    ).replace(".[", "[")
    kind = err["type"]
    got = f" (got {shown(err['input'])})" if kind != "missing" else ""
    if kind == "extra_forbidden":
        fields = _fields_at(model, loc[:-1])
        hint = did_you_mean(loc[-1], fields)
        return f"{key} is not a known key{hint} (allowed: {', '.join(fields)})"
    if kind == "literal_error":
        return f"{key} must be {err['ctx']['expected']}{got}"
    if kind in _BOUNDS:
        (bound,) = err["ctx"].values()
        if isinstance(bound, int | float):
            bound = f"{bound:,}" if isinstance(bound, int) else f"{bound:g}"
        return f"{key} must be {_BOUNDS[kind]} {bound}{got}"
    if kind in _MESSAGES:
        return f"{key} {_MESSAGES[kind]}{got}"
    message = err["msg"].removeprefix("Value error, ")
    first = message.split(" ", 1)[0]
    if first == "must":
        return f"{key} {message}"
    if not loc and first in model.model_fields:  # a check across fields names the field first
        return f"{key}.{message}"
    return f"{key}: {message}"


def _is_type_tag(part: str) -> bool:
    # pydantic names the union member it tried (`str`, `list[str]`, `function-after[...]`).
    return part in {"str", "int", "float", "bool", "none", "list", "dict"} or "[" in part


def _fields_at(model: type[BaseModel], loc: list[Any]) -> list[str]:
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = getattr(field, "annotation", None)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
    return list(model.model_fields)


def yaml_message(error: yaml.YAMLError, *, display: str) -> str:
    """A YAML error as `FILE: line L, column C: what is wrong`."""
    if isinstance(error, yaml.constructor.ConstructorError):
        where = _mark(error.problem_mark)
        if error.problem and "constructor for the tag" in error.problem:
            tag = error.problem.split("tag", 1)[1].strip().strip("'")
            return f"{display}:{where} YAML tag {tag} is not allowed (a space is plain data)"
        return f"{display}:{where} {error.problem}"
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"{display}:{_mark(getattr(error, 'problem_mark', None))} invalid YAML: {problem}"


def _mark(mark: Any) -> str:
    return f" line {mark.line + 1}, column {mark.column + 1}:" if mark is not None else ""
