"""Locks that live in the study store's own world: one driver per sweep series, and the first run
of a study (tuner.store._runs).

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

from tuner.common.errors import StorageError
from tuner.store._urls import mask_url, sqlite_path

logger = logging.getLogger(__name__)


class Busy(StorageError):
    """Another process holds the lock."""


@contextmanager
def series_lock(url: str, series: str, *, wait: bool = False) -> Iterator[None]:
    """Hold the lock of `series` in the store at `url`; `Busy` at once if taken (unless `wait`)."""
    with _lock(url, "sweep", series, what=f"sweep of series {series!r}", wait=wait):
        yield


@contextmanager
def try_lock(url: str, kind: str, name: str) -> Iterator[bool]:
    """Take the lock of `kind` `name` if it is free, without waiting; yields whether this
    process holds it. A store that cannot lock (another kind of URL, unreachable) yields False:
    the caller acts as one that found the lock taken."""
    held = contextlib.ExitStack()
    try:
        held.enter_context(_lock(url, kind, name, what=f"{kind} {name!r}", wait=False))
        taken = True
    except Busy:
        taken = False
    except Exception as e:  # noqa: BLE001 - a lock not taken is the caller's safe answer
        logger.debug("could not lock %s %r: %s", kind, name, e)
        taken = False
    with held:
        yield taken


@contextmanager
def _lock(url: str, kind: str, name: str, *, what: str, wait: bool) -> Iterator[None]:
    if url.startswith("postgresql"):
        with _advisory_lock(url, kind, name, what=what, wait=wait):
            yield
    elif (path := sqlite_path(url)) is not None:
        with _file_lock(path, kind, name, what=what, wait=wait):
            yield
    else:
        raise StorageError(
            f"locking the {what} needs a PostgreSQL or SQLite store "
            f"(got {mask_url(url).split(':', 1)[0]})"
        )


def _key(kind: str, name: str) -> int:
    """A stable signed 64-bit key for pg_advisory_lock, from the kind and name."""
    digest = hashlib.sha256(f"tuner-{kind}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextmanager
def _advisory_lock(url: str, kind: str, name: str, *, what: str, wait: bool) -> Iterator[None]:
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    engine = sqlalchemy.create_engine(url, poolclass=NullPool)
    try:
        conn = engine.connect()
    except sqlalchemy.exc.OperationalError as e:
        raise StorageError(f"cannot reach {mask_url(url)} to lock {what}") from e
    try:
        key = _key(kind, name)
        # Autocommit: a session lock must not sit inside a transaction that stays open all night.
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        if wait:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
        elif not conn.execute(
            sqlalchemy.text("SELECT pg_try_advisory_lock(:k)"), {"k": key}
        ).scalar():
            raise Busy(f"another {what} is running (PostgreSQL lock {key})")
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
def _file_lock(database: Path, kind: str, name: str, *, what: str, wait: bool) -> Iterator[None]:
    import fcntl

    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    path = database.resolve().parent / f".{database.name}.{safe}.{kind}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise Busy(f"another {what} is running (lock {path})") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
