"""Study store URLs: the default (an SQLite file here), the spellings people use, and passwords
that never show: URLs are masked wherever they are shown, so a password never reaches a log, an
error, a hint, an attribute or an exported model card.

URLs are read by SQLAlchemy's own parser (`make_url`), the one that connects with them, so what
is masked is what would be sent. Two things it does not hide by itself are handled here: a
password in the query (`?password=`, which psycopg2 takes as well), and a raw `@` in the
password, where SQLAlchemy ends the password at the first `@` and takes the rest for the host
(whose name an error would then print).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from sqlalchemy.engine.url import URL, make_url
from sqlalchemy.exc import ArgumentError

from tuner.common.errors import StorageError
from tuner.common.settings import DEFAULT_ARTIFACT_DIR, DEFAULT_SQLITE_FILE, Settings, get_settings
from tuner.store import attrs

MASK = "***"
# Query parameters that carry a secret: psycopg2 passes them on to libpq as connection keywords.
SECRET_QUERY_KEYS = ("password", "sslpassword")
# A URL inside some text (an error message): up to the next blank or quote.
_URL_IN_TEXT = re.compile(r"[A-Za-z][\w+.-]*://[^\s'\"<>`]+?(?=[.,;:)\]]*(?:[\s'\"<>`]|$))")
# Last resort, for what SQLAlchemy cannot parse at all: everything between `user:` and the last
# `@` of the URL.
_USERINFO = re.compile(r"(?P<head>[A-Za-z][\w+.-]*://[^:/@\s]*:)(?P<password>\S*)@")
# userinfo@host: the userinfo ends at the last `@` (hosts hold none), the host at `/` or `?`.
_RAW_AT = re.compile(r"^(?P<scheme>[\w+]+://)(?P<userinfo>.*)@(?P<rest>[^@]*)$", re.S)


def resolve_url(url: str | None = None, settings: Settings | None = None) -> str:
    """The URL to use: the one given, else `TUNER_STORAGE`, else `tuner.db` here.

    `postgres://` (Heroku, many dashboards) and `postgresql://` are read as psycopg2 URLs;
    relative SQLite paths are made absolute so that worker processes agree on the file. A
    given URL that is empty (`--storage "$UNSET"`) is refused, not taken for the default; so
    is an in-memory SQLite store, which each worker process would see empty.
    """
    if url is not None and not url.strip():
        raise StorageError(
            "--storage is empty: give a store URL (sqlite:///FILE or postgresql://USER@HOST/DB), "
            "or leave the flag out for $TUNER_STORAGE, else sqlite:///tuner.db here"
        )
    settings = settings or get_settings()
    url = url or settings.storage or f"sqlite:///{DEFAULT_SQLITE_FILE}"
    parsed = parse_url(url)
    if parsed is None or "://" not in url:
        raise StorageError(
            f"storage URL must look like sqlite:///FILE or postgresql://... (got {mask_url(url)!r})"
        )
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_url(parsed, url)
    if parsed.drivername in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+psycopg2")
    return parsed.render_as_string(hide_password=False)


def _sqlite_url(parsed: URL, url: str) -> str:
    database = parsed.database or ""
    if database in ("", ":memory:") or parsed.query.get("mode") == "memory":
        raise StorageError(
            f"{url!r} is an in-memory SQLite store: it lives and dies with one process, and a "
            "study's trials run in others; give a file, sqlite:///FILE"
        )
    if Path(database).is_absolute():
        return url
    return parsed.set(database=str(Path(database).resolve())).render_as_string(False)


def sqlite_path(url: str) -> Path | None:
    """The file of an SQLite store URL (as resolve_url gives it); None for other stores."""
    parsed = parse_url(url)
    if parsed is None or parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    return Path(parsed.database)


def parse_url(url: str) -> URL | None:
    """`url` as SQLAlchemy's URL object, a raw `@` in the password read as part of it; None if
    it is no URL."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # ValueError: a port that is no number
        parsed = None
    if parsed is not None and "@" not in (parsed.host or ""):
        return parsed
    # SQLAlchemy ended the userinfo at the first `@`: a host with an `@` in it, or a "port"
    # that is the rest of the password. The userinfo ends at the last `@` instead.
    match = _RAW_AT.match(url)
    if match is None or match["scheme"].startswith("sqlite"):
        return parsed
    user, colon, password = match["userinfo"].partition(":")
    try:
        rest = make_url(match["scheme"] + match["rest"])
    except (ArgumentError, ValueError):
        return None
    return rest.set(username=unquote(user), password=unquote(password) if colon else None)


def mask_url(url: str) -> str:
    """The URL with its password, and any password in its query, shown as ***. Given some text
    instead (an error message), each URL in it."""
    parsed = parse_url(url) if re.match(r"[\w+]+://", url) else None
    if parsed is None or not _secrets(parsed):
        return _URL_IN_TEXT.sub(lambda m: _mask_one(m[0]), url)
    return _masked(parsed)


def strip_password(url: str) -> str:
    """The URL without its password (nor one in its query), for processes that read it from
    PGPASSWORD or ~/.pgpass."""
    parsed = parse_url(url)
    if parsed is None or not _secrets(parsed):
        return url
    # URL.set(password=None) would keep the password: None there means "unchanged".
    stripped = URL.create(
        parsed.drivername,
        username=parsed.username,
        host=parsed.host,
        port=parsed.port,
        database=parsed.database,
        query={k: v for k, v in parsed.query.items() if k not in SECRET_QUERY_KEYS},
    )
    return stripped.render_as_string(hide_password=False)


def mask_text(text: str, url: str) -> str:
    """Remove the URL's password from any text (a driver's error message, say): every URL in
    it masked, and the password itself wherever it appears, as typed or percent-encoded."""
    text = mask_url(text)
    parsed = parse_url(url)
    for secret in _secrets(parsed) if parsed is not None else []:
        for form in {secret, quote(secret, safe=""), quote(secret)}:
            text = text.replace(form, MASK)
    return text


def _mask_one(url: str) -> str:
    parsed = parse_url(url)
    if parsed is None:
        return _USERINFO.sub(lambda m: f"{m['head']}{MASK}@", url)
    return _masked(parsed) if _secrets(parsed) else url


def _masked(parsed: URL) -> str:
    hidden = {k: MASK for k in SECRET_QUERY_KEYS if k in parsed.query}
    text = parsed.update_query_dict(hidden).render_as_string(hide_password=True)
    return text.replace(quote(MASK, safe=""), MASK)  # the query's *** is percent-encoded


def _secrets(parsed: URL) -> list[str]:
    found = [parsed.password] if parsed.password else []
    for key in SECRET_QUERY_KEYS:
        value = parsed.query.get(key)
        found += [v for v in ([value] if isinstance(value, str) else value or ()) if v]
    return found


def default_artifact_dir(url: str) -> Path:
    """Where a study keeps its artifacts when nothing chose a place: beside an SQLite store, else
    under the working directory."""
    path = sqlite_path(url)
    if path is not None:
        return path.resolve().parent / DEFAULT_ARTIFACT_DIR
    return Path(DEFAULT_ARTIFACT_DIR).resolve()


def study_location(user_attrs: dict[str, Any], storage_url: str) -> str:
    """The artifact location a study records; an older study's folder, else the default. Here,
    not in tuner.store._artifacts, so that opening a study (a read) does not load Optuna's
    artifact stores (and boto3 with them)."""
    return (
        user_attrs.get(attrs.ARTIFACTS)
        or user_attrs.get(attrs.ARTIFACT_DIR)
        or str(default_artifact_dir(storage_url))
    )
