"""Where an export may be written, and how it replaces an earlier one without destroying work.

An export replaces its folder, so a mistyped `--out` (`.`, `~`, `""`, the base model's folder)
would delete what is there. The rules, which `--force` never overrides:

- `--out` is not empty (`--out "$UNSET"`);
- it is not, and does not contain, the working directory, the home folder, `/`, the base model,
  the data set or its folder, the study's artifact location or its SQLite store; and it does not
  lie inside the base model, a data set folder or the artifact location (symlinks resolved
  first);
- what is there already is nothing, an empty folder, or an earlier export (it holds
  `tuner_export.json`); only the last is replaced, and only with `--force`.

The new folder is built beside `--out` and renamed into place; an earlier export is moved
aside first and removed only once the new one is there. Both temporary folders carry this
host's name and this process's id, so that the next export into the same place removes those a
killed export left behind, and never a running one's.
"""

from __future__ import annotations

import errno
import glob
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

from tuner.common.errors import ExportError
from tuner.store import sqlite_path

logger = logging.getLogger(__name__)

PROVENANCE = "tuner_export.json"  # what marks a folder as an export, so --force may replace it
_OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DestinationError(ExportError):
    """`--out` names a place an export must not write to; nothing was written."""


def requested(out: str | Path, *, flag: str = "--out") -> Path:
    """`out` as an absolute path with symlinks resolved; an empty one refused (`Path("")` would
    be the working directory)."""
    if not str(out).strip():
        raise DestinationError(
            f"{flag} is empty (an unset variable?): name the folder to write, "
            f"e.g. {flag} best-model"
        )
    return Path(out).expanduser().resolve()


def protected(opened: Any, *configs: Any) -> tuple[dict[str, Path], dict[str, Path]]:
    """What an export must not replace (name → path), and what it must not write inside: for the
    study `opened` and the trial configs (or the space's `fixed`) it reads its model and data
    from. Hub ids and S3 locations are no local paths, and are left out."""
    keep = {
        "the root folder": Path("/"),
        "the home folder": Path.home(),
        "the working directory": Path.cwd(),
    }
    inside: dict[str, Path] = {}
    for config in configs:
        model = _get(config, "model_name_or_path")
        if model and Path(model).exists():
            keep["the base model"] = inside["the base model"] = Path(model).resolve()
        dataset = _get(config, "dataset")
        data = _get(dataset, "path") if dataset is not None else None
        if data and Path(data).exists():
            data = Path(data).resolve()
            keep["the data set"] = data
            if data.is_file():
                keep["the data set's folder"] = data.parent
            else:  # a saved `datasets` folder: an export inside it would be read as its data
                inside["the data set"] = data
    if "://" not in opened.artifacts:
        artifacts = Path(opened.artifacts).resolve()
        keep["the study's artifacts"] = inside["the study's artifacts"] = artifacts
    store = sqlite_path(opened.url)
    if store is not None:
        keep["the study store"] = store.resolve()
    return keep, inside


def check(
    out: Path, *, keep: dict[str, Path], inside: dict[str, Path], force: bool, flag: str = "--out"
) -> None:
    """Refuse `out` (resolved) if writing there could destroy anything but an earlier export."""
    for what, path in keep.items():
        if out == path:
            raise DestinationError(f"{flag} {out} is {what}; an export replaces its folder: {_NEW}")
        if out in path.parents:
            raise DestinationError(
                f"{flag} {out} contains {what} ({path}); an export replaces its folder: {_NEW}"
            )
    for what, path in inside.items():
        if path in out.parents:
            raise DestinationError(f"{flag} {out} is inside {what} ({path}): {_NEW}")
    if not out.exists():
        return
    if not out.is_dir():
        raise DestinationError(
            f"{flag} {out} is a file, and --force replaces only an earlier export: {_NEW}"
        )
    if not any(out.iterdir()):
        return
    if not (out / PROVENANCE).is_file():
        raise DestinationError(
            f"{flag} {out} holds files that are not an export (no {PROVENANCE}), and --force "
            f"replaces only an earlier export: {_NEW}"
        )
    if not force:
        raise DestinationError(f"{out} exists and is not empty; pass --force to replace it")


_NEW = "choose a new folder"


def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


# ----------------------------------------------------------------------------- writing


def staging(out: Path) -> Path:
    """A new empty folder beside `out` to build the export in (same file system: the final
    rename is atomic). Leftovers of killed exports into `out` go first."""
    _remove_leftovers(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=_prefix(out, "export"), dir=out.parent))
    except OSError as e:
        raise write_error(out, e) from None


def replace(tmp: Path, out: Path) -> None:
    """Put the finished folder `tmp` at `out`. An earlier export there is moved aside first and
    removed only once the new one is in place; if the rename fails, it is put back."""
    if not out.exists():
        os.rename(tmp, out)
        return
    aside = Path(tempfile.mkdtemp(prefix=_prefix(out, "old"), dir=out.parent))
    os.rename(out, aside / out.name)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(aside / out.name, out)
        aside.rmdir()
        raise
    remove(aside)


def remove(folder: Path) -> None:
    """Remove a folder of ours; what cannot be removed is said, not silently left."""

    def writable_then_retry(function: Any, path: str, _exc: Any) -> None:
        os.chmod(os.path.dirname(path), 0o700)  # a read-only folder inside an old export
        function(path)

    try:
        shutil.rmtree(folder, onerror=writable_then_retry)
    except OSError as e:
        logger.warning("could not remove %s: %s; remove it by hand", folder, e.strerror or e)


def out_of_space(error: BaseException) -> bool:
    """A full disk or quota, as an OSError or as safetensors' error (which carries the OS's
    message, not its errno)."""
    if isinstance(error, OSError) and error.errno in _OUT_OF_SPACE:
        return True
    return any(os.strerror(code) in str(error) for code in _OUT_OF_SPACE)


def failed_writing(error: BaseException, folder: Path) -> bool:
    """Whether `error` came from writing into `folder` (or from a full disk anywhere)."""
    if out_of_space(error):
        return True
    written = getattr(error, "filename", None) if isinstance(error, OSError) else None
    return bool(written) and (Path(written) == folder or folder in Path(written).parents)


def write_error(out: Path, error: BaseException) -> DestinationError:
    """One line naming where the export could not be written, and why."""
    if out_of_space(error):
        return DestinationError(
            f"no space left on the file system of {out.parent} for the export to {out}; free some "
            "or choose another --out"
        )
    reason = getattr(error, "strerror", None) or str(error)
    return DestinationError(f"cannot write the export to {out}: {reason}")


def _prefix(out: Path, kind: str) -> str:
    return f".{out.name}.{kind}-{socket.gethostname()}-{os.getpid()}-"


def _remove_leftovers(out: Path) -> None:
    """Folders a killed export into `out` left beside it: this host's, of processes gone."""
    if not out.parent.is_dir():
        return
    for kind in ("export", "old"):
        head = _prefix(out, kind).rsplit("-", 2)[0] + "-"  # up to the process id
        for path in out.parent.glob(f"{glob.escape(head)}*"):
            pid = path.name[len(head) :].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)) and path.is_dir():
                logger.info("removing %s, left by an export that did not finish", path)
                remove(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True
