"""One driver per sweep series: a lock that lives in the study store's own world.

PostgreSQL: a session advisory lock, held by one connection for the sweep's life; the server
drops it when that connection ends, so a sweep killed at 3 a.m. leaves no stale lock. SQLite: an
exclusive `flock` on a file beside the database, which the kernel drops when the process dies.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tuner.errors import StorageError
from tuner.store.urls import mask_url, sqlite_path

logger = logging.getLogger(__name__)


class Busy(StorageError):
    """Another process holds the lock."""


@contextmanager
def series_lock(url: str, series: str, *, wait: bool = False) -> Iterator[None]:
    """Hold the lock of `series` in the store at `url`; `Busy` at once if taken (unless `wait`)."""
    if url.startswith("postgresql"):
        with _advisory_lock(url, series, wait=wait):
            yield
    elif (path := sqlite_path(url)) is not None:
        with _file_lock(path, series, wait=wait):
            yield
    else:
        raise StorageError(
            f"sweeps need a PostgreSQL or SQLite store to lock the series "
            f"(got {mask_url(url).split(':', 1)[0]})"
        )


def _key(series: str) -> int:
    """A stable signed 64-bit key for pg_advisory_lock, from the series name."""
    digest = hashlib.sha256(f"tuner-sweep:{series}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextmanager
def _advisory_lock(url: str, series: str, *, wait: bool) -> Iterator[None]:
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    engine = sqlalchemy.create_engine(url, poolclass=NullPool)
    try:
        conn = engine.connect()
    except sqlalchemy.exc.OperationalError as e:
        raise StorageError(f"cannot reach {mask_url(url)} to lock sweep {series!r}") from e
    try:
        key = _key(series)
        # Autocommit: a session lock must not sit inside a transaction that stays open all night.
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        if wait:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
        elif not conn.execute(
            sqlalchemy.text("SELECT pg_try_advisory_lock(:k)"), {"k": key}
        ).scalar():
            raise Busy(f"another sweep of series {series!r} is running (PostgreSQL lock {key})")
        try:
            yield
        finally:
            # A connection that is gone took the lock with it.
            with contextlib.suppress(sqlalchemy.exc.DBAPIError):
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    finally:
        conn.close()
        engine.dispose()


@contextmanager
def _file_lock(database: Path, series: str, *, wait: bool) -> Iterator[None]:
    import fcntl

    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", series)
    path = database.resolve().parent / f".{database.name}.{safe}.sweep.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise Busy(f"another sweep of series {series!r} is running (lock {path})") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
