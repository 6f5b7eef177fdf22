"""LLaMA-Factory's data set descriptions, read as they are.

A LLaMA-Factory user describes each data set once, in `dataset_info.json`:

    "my_set": {"file_name": "my_set.json", "formatting": "sharegpt",
               "columns": {"messages": "conversations", "system": "system"},
               "tags": {"role_tag": "from", "content_tag": "value",
                        "user_tag": "human", "assistant_tag": "gpt"}}

A space's `fixed.dataset` takes such an entry by reference (`dataset_info: path#my_set`, the
path being the JSON file or the folder holding it, LLaMA-Factory's `dataset_dir`) or the same
keys inline. `translate` turns them into tuner's own: `file_name` → `path` (relative to the
entry's folder), `formatting` → `format`, LLaMA-Factory's column names (`prompt`, `query`,
`response`, `messages`) → tuner's (`instruction`, `input`, `output`, `conversations`); `tags`
keep their names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FILE = "dataset_info.json"
TAGS = (
    "role_tag",
    "content_tag",
    "user_tag",
    "assistant_tag",
    "observation_tag",
    "function_tag",
    "system_tag",
)
_COLUMNS = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output"},
    "sharegpt": {"messages": "conversations"},
}
# Keys of an entry that describe where else the same data lives: taken for a hub id, or ignored.
_HUBS = ("hf_hub_url", "ms_hub_url", "om_hub_url")
# Keys of an entry that tuner does not read; a set that needs one is refused, not half-read.
_UNSUPPORTED = {
    "ranking": "preference (ranking) data is for DPO/RM, not SFT",
    "subset": "hub subsets are not read; export the subset to a file",
    "folder": "hub folders are not read; point file_name at the files",
    "num_samples": "sampling is not done here; cut the file instead",
    "script_url": "loading scripts are not run",
    "cloud_file_name": "cloud files are not read; download the file first",
}


class DatasetInfoError(ValueError):
    """The entry cannot be read; the message starts with the key it is about."""


def translate(spec: dict[str, Any]) -> dict[str, Any]:
    """A `fixed.dataset` mapping with LLaMA-Factory's keys → one with tuner's keys only."""
    spec = dict(spec)
    ref = spec.pop("dataset_info", None)
    if ref is not None:
        spec = {**read_entry(ref), **spec}  # keys given beside the reference override it
    for key, why in _UNSUPPORTED.items():
        if spec.get(key) not in (None, False):
            raise DatasetInfoError(f"{key}: not supported ({why})")
        spec.pop(key, None)
    hub = spec.pop("hf_hub_url", None)
    for key in _HUBS:
        spec.pop(key, None)
    _rename(spec, "file_name", "path")
    _rename(spec, "formatting", "format")
    if hub is not None and "path" not in spec:
        spec["path"] = hub
    theirs = _COLUMNS.get(spec.get("format", "alpaca"), {})
    if isinstance(spec.get("columns"), dict):
        spec["columns"] = {theirs.get(k, k): v for k, v in spec["columns"].items()}
    if isinstance(spec.get("tags"), dict):
        for key in spec["tags"]:
            if key not in TAGS:
                raise DatasetInfoError(
                    f"tags.{key}: not a LLaMA-Factory tag (allowed: {', '.join(TAGS)})"
                )
    return spec


def read_entry(ref: Any) -> dict[str, Any]:
    """The entry `path#name` names, with its `file_name` made relative to the entry's folder."""
    if not isinstance(ref, str) or "#" not in ref:
        raise DatasetInfoError(
            f"dataset_info: must be PATH#NAME, the dataset_info.json (or its folder) and the "
            f"entry's name (got {ref!r})"
        )
    where, _, name = ref.rpartition("#")
    path = Path(where).expanduser()
    if path.is_dir():
        path = path / FILE
    if not path.is_file():
        raise DatasetInfoError(f"dataset_info: no such file {str(path)!r}")
    try:
        entries = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetInfoError(f"dataset_info: {path.name} is not valid JSON ({e})") from None
    if not isinstance(entries, dict) or name not in entries:
        names = ", ".join(sorted(entries)) if isinstance(entries, dict) else "none"
        raise DatasetInfoError(
            f"dataset_info: {path.name} has no entry {name!r} (entries: {names})"
        )
    entry = entries[name]
    if not isinstance(entry, dict):
        raise DatasetInfoError(f"dataset_info: {path.name}: entry {name!r} is not an object")
    entry = dict(entry)
    if isinstance(entry.get("file_name"), str):
        entry["file_name"] = str((path.parent / entry["file_name"]).resolve())
    return entry


def _rename(spec: dict[str, Any], theirs: str, ours: str) -> None:
    if theirs not in spec:
        return
    if ours in spec:
        raise DatasetInfoError(f"{theirs}: give {theirs} or {ours}, not both")
    spec[ours] = spec.pop(theirs)
