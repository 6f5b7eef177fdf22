"""Reading a space: a file found (a path, or the name of a packaged space), its YAML read
safely (`read_yaml`), and its data checked into a `Space` (`parse_space`, which runs py's
checks in order, the first failure a one-line SpaceError). `load_space` does all of it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from trials import files
from trials.config import SEARCHABLE
from tuner.common.errors import SpaceError, did_you_mean
from tuner.common.text import shown
from tuner.space.checks import (
    ALIASES,
    artifact_location,
    check_against_trial_config,
    check_baseline,
    check_fixed_keys,
    check_objective,
    llama_factory_dataset,
    resolve_local_paths,
    resolve_scorer,
    sampler_and_pruner,
)
from tuner.space.messages import explain, yaml_message
from tuner.space.models import PARAM_TYPES, Param, Space

# ----------------------------------------------------------------------------- YAML


class _SpaceLoader(yaml.SafeLoader):
    """Safe YAML that reads `1e-5` as a number (YAML 1.1 wants `1.0e-5`) and refuses
    repeated keys instead of silently keeping the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice", key_node.start_mark
                )
            seen[key] = True
        return super().construct_mapping(node, deep=deep)


_SpaceLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


MAX_SPACE_BYTES = 10_000_000  # a space is a few KB; bigger is a wrong file, not a space


def read_yaml(path: Path, *, display: str) -> Any:
    # Looked at before it is opened: a FIFO would block, /dev/zero would fill the memory.
    try:
        what = files.kind(path)
        if what is None:
            raise SpaceError(f"{display}: no such file")
        if what == "folder":
            raise SpaceError(f"{display}: is a directory, not a YAML file")
        if what != "file":
            raise SpaceError(f"{display}: is {what}; a space must be a regular YAML file")
        raw = files.read_at_most(path, MAX_SPACE_BYTES)
    except OSError as e:
        raise SpaceError(f"{display}: cannot be read ({e.strerror})") from None
    if len(raw) > MAX_SPACE_BYTES:
        raise SpaceError(
            f"{display}: is larger than {MAX_SPACE_BYTES:,} bytes; a space is a few KB of YAML"
        )
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SpaceError(
            f"{display}: is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})"
        ) from None
    try:
        data = yaml.load(text, Loader=_SpaceLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise SpaceError(yaml_message(e, display=display)) from None
    if _values(data) > MAX_VALUES:
        # Aliases share one object, so loading a "billion laughs" file is cheap; printing it,
        # validating it or storing it in the study is not.
        raise SpaceError(
            f"{display}: expands to more than {MAX_VALUES:,} values (YAML aliases repeated);"
            " a space is a few dozen"
        )
    return data


MAX_VALUES = 100_000


def _values(data: Any) -> int:
    """How many values `data` holds with every alias expanded; stops counting past the limit."""
    count, stack = 0, [data]
    while stack and count <= MAX_VALUES:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


# ----------------------------------------------------------------------------- finding a file


def packaged_spaces_dir() -> Path:
    """The spaces that ship with tuner: inside the wheel, or beside the package in a checkout."""
    bundled = Path(str(resources.files("tuner"))) / "search_spaces"
    if bundled.is_dir():
        return bundled
    return Path(__file__).resolve().parents[2] / "search_spaces"


def packaged_spaces() -> dict[str, Path]:
    folder = packaged_spaces_dir()
    return {p.name: p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def find_space_file(space: str | Path) -> Path:
    """A path as given, else a bare name among the packaged spaces (`.yaml` may be left out)."""
    path = Path(space).expanduser()
    if path.exists() or path.parent != Path("."):
        return path
    packaged = packaged_spaces()
    for name in (path.name, f"{path.name}.yaml"):
        if name in packaged:
            return packaged[name]
    return path


def load_space(space: str | Path, *, base_dir: Path | None = None) -> Space:
    """Read and validate a space file. Relative paths inside it are read from `base_dir`
    (the working directory by default) and stored absolute."""
    path = find_space_file(space)
    display = str(space)
    data = read_yaml(path, display=display)
    if data is None:
        raise SpaceError(f"{display}: is empty; a space needs at least `params` and `fixed`")
    if not isinstance(data, dict):
        raise SpaceError(f"{display}: must be a mapping of sections (got {type(data).__name__})")
    data.setdefault("name", path.stem)
    try:
        return parse_space(data, base_dir=base_dir or Path.cwd())
    except SpaceError as e:
        raise SpaceError(f"{display}: {e}") from None


# ----------------------------------------------------------------------------- checking data


_SECTIONS = list(Space.model_fields)


def parse_space(
    data: dict[str, Any], *, base_dir: Path | None = None, resolve_paths: bool = True
) -> Space:
    """Validate a space's data; raises SpaceError with `KEY message` (the caller adds the file)."""
    for key in data:
        if key not in _SECTIONS:
            raise SpaceError(
                f"{key} is not a known section{did_you_mean(key, _SECTIONS)} "
                f"(allowed: {', '.join(_SECTIONS)})"
            )
    for section in ("params", "fixed"):
        if not isinstance(data.get(section), dict) or not data[section]:
            if section not in data or data[section] is None:
                raise SpaceError(f"{section} is required")
            raise SpaceError(f"{section} must be a non-empty mapping (got {shown(data[section])})")

    params = {name: _parse_param(name, spec) for name, spec in data["params"].items()}
    fixed = dict(data["fixed"])
    check_fixed_keys(fixed, params)
    if resolve_paths and isinstance(fixed.get("dataset"), dict):
        fixed["dataset"] = llama_factory_dataset(fixed["dataset"], base_dir or Path.cwd())
    sampler, pruner = sampler_and_pruner(data)

    try:
        space = Space.model_validate(
            {**data, "params": params, "fixed": fixed, "sampler": sampler, "pruner": pruner}
        )
    except ValidationError as e:
        raise SpaceError(explain(e, Space)) from None

    check_against_trial_config(space)
    if space.baseline is not None:
        check_baseline(space)
    check_objective(space)
    if resolve_paths:
        resolve_local_paths(space.fixed, base_dir or Path.cwd())
        resolve_scorer(space.objective, base_dir or Path.cwd())
        if space.artifacts is not None:
            space.artifacts = artifact_location(space.artifacts, base_dir or Path.cwd())
    return space


def from_stored(data: Mapping[str, Any]) -> Space:
    """The space a study stored (`Space.to_stored`), through the checks a file goes through;
    its paths were made absolute, and looked at, when the study was created."""
    return parse_space(dict(data), resolve_paths=False)


def _parse_param(name: Any, spec: Any) -> Param:
    where = f"params.{name}"
    if not isinstance(name, str) or name not in SEARCHABLE:
        raise SpaceError(
            f"{where} is not a searchable option{did_you_mean(name, SEARCHABLE, ALIASES)} "
            f"(searchable: {', '.join(sorted(SEARCHABLE))})"
        )
    if not isinstance(spec, dict):
        raise SpaceError(f"{where} must be a mapping with a `type` (got {shown(spec)})")
    kind = spec.get("type")
    if kind is None:
        raise SpaceError(f"{where}.type is required (one of {', '.join(PARAM_TYPES)})")
    if kind not in PARAM_TYPES:
        raise SpaceError(
            f"{where}.type: unknown type {kind!r}{did_you_mean(kind, PARAM_TYPES)} "
            f"(allowed: {', '.join(PARAM_TYPES)})"
        )
    cls = PARAM_TYPES[kind]
    try:
        return cls.model_validate(spec)
    except ValidationError as e:
        raise SpaceError(explain(e, cls, prefix=where)) from None
