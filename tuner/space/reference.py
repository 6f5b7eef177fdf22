"""The search-space reference, generated from the pydantic models' field descriptions.

The models are the one source of truth (TRL's way with its config dataclasses): `tuner spaces
--fields` prints this Markdown and docs/space-reference.md is its committed copy, which
tests/test_space_reference.py keeps equal to what the models say.
"""

from __future__ import annotations

import re
import types
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel, BeforeValidator
from pydantic.fields import FieldInfo

from trials.config import SEARCHABLE, DatasetSpec, SimulatedArgs, TrialConfig
from tuner.search import algorithms
from tuner.space.checks import ALIASES
from tuner.space.models import (
    Budget,
    CategoricalParam,
    FloatParam,
    Generation,
    IntParam,
    MultipleParam,
    ObjectiveSpec,
    Resources,
    Space,
    SweepPolicy,
)

REGENERATE = "tuner spaces --fields > docs/space-reference.md"


@dataclass(frozen=True)
class Section:
    key: str  # where its keys sit in a space file, e.g. `fixed.dataset`
    model: type[BaseModel]
    level: int = 2


SECTIONS = (
    Section("top level", Space),
    Section("params", FloatParam, 3),
    Section("params", IntParam, 3),
    Section("params", CategoricalParam, 3),
    Section("params", MultipleParam, 3),
    Section("fixed", TrialConfig),
    Section("fixed.dataset", DatasetSpec, 3),
    Section("fixed.simulated", SimulatedArgs, 3),
    Section("objective", ObjectiveSpec),
    Section("objective.generation", Generation, 3),
    Section("budget", Budget),
    Section("resources", Resources),
    Section("sweep", SweepPolicy),
)

# Defaults that the loader, not the model, supplies.
_SHOWN_DEFAULTS = {
    (Space, "name"): "the file's name",
    (TrialConfig, "model_name_or_path"): "required (sft)",
    (TrialConfig, "dataset"): "required (sft)",
}

_INTRO = f"""\
# Search-space reference

<!-- Generated from the pydantic models' field descriptions (tuner/space.py, trials/config.py).
     Do not edit: change a description, then run `{REGENERATE}`. -->

A space is one YAML file with the sections below; every packaged one (`tuner spaces`) opens with
the commands that run it. The YAML is safe YAML under this schema: `1e-5` is read as a number
(plain YAML 1.1 would read a string), a key written twice is an error, as is any YAML tag, and an
unknown key is refused with the closest known name. Names from other tools are refused with the
name to use instead: {", ".join(f"`{a}` → `{b}`" for a, b in ALIASES.items())}.
"""


def reference_markdown() -> str:
    """The whole reference as Markdown, ending with a newline."""
    parts = [_INTRO]
    for section in SECTIONS:
        parts.append(_section(section))
    return "\n".join(parts).rstrip("\n") + "\n"


def documented_models() -> list[type[BaseModel]]:
    return [s.model for s in SECTIONS]


def reachable_models(model: type[BaseModel]) -> set[type[BaseModel]]:
    """Every model a space file can reach from `model` through its fields' annotations."""
    seen: set[type[BaseModel]] = set()
    stack = [model]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        for field in current.model_fields.values():
            stack.extend(_models_in(field.annotation))
    return seen


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


def _section(section: Section) -> str:
    model = section.model
    lines = []
    if model is FloatParam:  # the params section opens before its first kind
        lines += ["## params", "", _PARAMS_LEAD, ""]
    title = section.key
    if model in PARAM_KINDS:
        title = f"`type: {get_args(model.model_fields['type'].annotation)[0]}`"
    lines += [f"{'#' * section.level} {title}", ""]
    if model.__doc__:
        lines += [_clean(model.__doc__), ""]
    searchable = model is TrialConfig
    if searchable:
        lines += ["| key | type | default | searchable | meaning |", "|---|---|---|---|---|"]
    else:
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        cells = [f"`{name}`", _type(field), _default(model, name, field)]
        if searchable:
            cells.append("yes" if name in SEARCHABLE else "")
        cells.append(_meaning(model, name, field))
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


PARAM_KINDS = (FloatParam, IntParam, CategoricalParam, MultipleParam)

_PARAMS_LEAD = (
    "One block per searched option, `NAME: {type: KIND, ...}`; NAME is one of the options of "
    "`fixed` marked searchable: " + ", ".join(f"`{n}`" for n in sorted(SEARCHABLE)) + "."
)


def _meaning(model: type[BaseModel], name: str, field: FieldInfo) -> str:
    text = field.description or ""
    if model is Space and name == "sampler":
        text += " Names: " + ", ".join(f"`{n}`" for n in algorithms.SAMPLERS) + "."
    if model is Space and name == "pruner":
        text += " Names: " + ", ".join(f"`{n}`" for n in algorithms.PRUNERS) + "."
    return text


def _clean(text: str) -> str:
    """A docstring as one paragraph per blank-line-separated block."""
    blocks = re.split(r"\n\s*\n", text.strip())
    return "\n\n".join(" ".join(line.strip() for line in b.splitlines()) for b in blocks)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# ----------------------------------------------------------------------------- types and values


def _type(field: FieldInfo) -> str:
    shown = _annotation(field.annotation)
    if _is_seconds(field.metadata):
        shown = _SECONDS
    bounds = _bounds(field.metadata)
    return f"{shown} {bounds}".strip()


def _annotation(annotation: Any) -> str:
    origin = get_origin(annotation)
    args = get_args(annotation)
    if annotation is type(None):
        return "null"
    if hasattr(annotation, "__metadata__"):  # Annotated[...]
        return _SECONDS if _is_seconds(annotation.__metadata__) else _annotation(args[0])
    if origin is Literal:
        return " | ".join(f"`{_value(a)}`" for a in args)
    if origin in (Union, types.UnionType):
        named = [_annotation(a) for a in args if a is not type(None)]
        shown = " or ".join(dict.fromkeys(named))
        return f"{shown} or null" if type(None) in args else shown
    if origin is list:
        return f"list of {_annotation(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    names = {int: "int", float: "number", str: "string", bool: "bool", Any: "any"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


_SECONDS = "seconds or a duration (30m, 2h)"


def _is_seconds(metadata: Any) -> bool:
    """`Seconds` in models.py: a number, or a duration turned into one before validation."""
    return any(isinstance(m, BeforeValidator) for m in metadata)


def _bounds(metadata: list[Any]) -> str:
    signs = {
        annotated_types.Gt: ("> ", "gt"),
        annotated_types.Ge: (">= ", "ge"),
        annotated_types.Lt: ("< ", "lt"),
        annotated_types.Le: ("<= ", "le"),
    }
    out = []
    for m in metadata:
        for kind, (sign, attr) in signs.items():
            if isinstance(m, kind):
                out.append(sign + _value(getattr(m, attr)))
        if isinstance(m, annotated_types.MinLen):
            out.append(f"(at least {m.min_length})")
    return ", ".join(out)


def _default(model: type[BaseModel], name: str, field: FieldInfo) -> str:
    if (model, name) in _SHOWN_DEFAULTS:
        return _SHOWN_DEFAULTS[(model, name)]
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return "see below"
    return f"`{_value(value)}`"


def _value(value: Any) -> str:
    """A value as it is written in a space file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = f"{value:g}"
        return re.sub(r"e([+-])0*(\d)", lambda m: f"e{m[1].replace('+', '')}{m[2]}", text)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str) and value == "":
        return '""'
    return str(value)
