"""Where a study's artifacts may live, as a user names it (`--artifacts`, `$TUNER_ARTIFACTS`, a
space's `artifacts:`): a local path, or `s3://BUCKET[/PREFIX]`. Read here, below every layer, so
that a space file's `artifacts:` is checked where the space is read; the store opens it
(tuner/store/_artifacts.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tuner.common.errors import TunerError

ALLOWED = "a local path, or s3://BUCKET[/PREFIX]"
# S3's bucket naming rules, as every S3 API enforces them.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


class ArtifactsError(TunerError):
    """An artifact location that tuner cannot use: the message names where it came from."""


@dataclass(frozen=True)
class Location:
    """A checked artifact location: `path` for a local one, `bucket` and `prefix` for S3."""

    url: str
    path: Path | None = None
    bucket: str | None = None
    prefix: str = ""


def parse_location(url: str, *, source: str, base_dir: Path | None = None) -> Location:
    """Check an artifact location; `source` names where it came from (`--artifacts`,
    `TUNER_ARTIFACTS`, `space.yaml: artifacts`) for the one-line error. A relative path is taken
    from `base_dir` (the working directory by default) and stored absolute."""
    text = str(url).strip()
    scheme = _SCHEME.match(text)
    if scheme is None:
        if not text:
            raise ArtifactsError(f"{source}: is empty (allowed: {ALLOWED})")
        path = Path(text).expanduser()
        path = (base_dir or Path.cwd()) / path if not path.is_absolute() else path
        return Location(url=str(path.resolve()), path=path.resolve())
    kind = scheme[1].lower()
    if kind == "file":
        return parse_location(text[len("file://") :], source=source, base_dir=base_dir)
    if kind != "s3":
        raise ArtifactsError(
            f"{source}: {kind}:// is not supported (got {text!r}; allowed: {ALLOWED})"
        )
    bucket, _, prefix = text[len(scheme[0]) :].partition("/")
    if not _BUCKET.fullmatch(bucket):
        got = f"bucket {bucket!r}" if bucket else "no bucket"
        raise ArtifactsError(
            f"{source}: {text!r} has {got}; a bucket name is 3-63 lowercase letters, digits, "
            f"dots and hyphens (allowed: {ALLOWED})"
        )
    prefix = prefix.strip("/")
    normal = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    return Location(url=normal, bucket=bucket, prefix=prefix)
