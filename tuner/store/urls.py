"""Study store URLs: the default (an SQLite file here), the spellings people use, and passwords
that never show: URLs are masked wherever they are shown, so a password never reaches a log or an
error.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tuner.errors import StorageError
from tuner.settings import DEFAULT_ARTIFACT_DIR, DEFAULT_SQLITE_FILE, Settings, get_settings
from tuner.store import attrs

_PASSWORD_IN_URL = re.compile(r"(?P<head>[a-zA-Z][\w+.-]*://[^:/@\s]*:)(?P<password>[^@\s]*)@")


def resolve_url(url: str | None = None, settings: Settings | None = None) -> str:
    """The URL to use: the one given, else `TUNER_STORAGE`, else `tuner.db` here.

    `postgres://` (Heroku, many dashboards) and `postgresql://` are read as psycopg2 URLs;
    relative SQLite paths are made absolute so that worker processes agree on the file.
    """
    settings = settings or get_settings()
    url = url or settings.storage or f"sqlite:///{DEFAULT_SQLITE_FILE}"
    if url.startswith("postgres://"):
        url = "postgresql+psycopg2://" + url.removeprefix("postgres://")
    elif url.startswith("postgresql://"):
        url = "postgresql+psycopg2://" + url.removeprefix("postgresql://")
    elif url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        path = url.removeprefix("sqlite:///")
        if path and path != ":memory:":
            url = f"sqlite:///{Path(path).resolve()}"
    elif "://" not in url:
        raise StorageError(
            f"storage URL must look like sqlite:///FILE or postgresql://... (got {mask_url(url)!r})"
        )
    return url


def mask_url(url: str) -> str:
    """The URL with its password replaced by ***."""
    return _PASSWORD_IN_URL.sub(lambda m: f"{m['head']}***@", url)


def strip_password(url: str) -> str:
    """The URL without its password, for processes that read it from PGPASSWORD or ~/.pgpass."""
    return _PASSWORD_IN_URL.sub(lambda m: f"{m['head'][:-1]}@", url)


def mask_text(text: str, url: str) -> str:
    """Remove the URL's password from any text (a driver's error message, say)."""
    text = _PASSWORD_IN_URL.sub(lambda m: f"{m['head']}***@", text)
    password = _password(url)
    return text.replace(password, "***") if password else text


def _password(url: str) -> str | None:
    match = _PASSWORD_IN_URL.search(url)
    return match["password"] if match and match["password"] else None


def default_artifact_dir(url: str) -> Path:
    """Where a study keeps its artifacts when nothing chose a place: beside an SQLite store, else
    under the working directory."""
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///")).resolve().parent / DEFAULT_ARTIFACT_DIR
    return Path(DEFAULT_ARTIFACT_DIR).resolve()


def study_location(user_attrs: dict[str, Any], storage_url: str) -> str:
    """The artifact location a study records; an older study's folder, else the default. Here,
    not in tuner.store.artifacts, so that opening a study (a read) does not load Optuna's
    artifact stores (and boto3 with them)."""
    return (
        user_attrs.get(attrs.ARTIFACTS)
        or user_attrs.get(attrs.ARTIFACT_DIR)
        or str(default_artifact_dir(storage_url))
    )
