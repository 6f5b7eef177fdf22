"""Opening a study store: an embedded SQLite file by default, PostgreSQL for teams and clusters.

Both are Optuna's own RDB storage (riding out dropped connections, tuner.store._reconnect), so
`optuna.load_study` and the `optuna` CLI open them too.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tuner.common import extras
from tuner.common.errors import StorageError
from tuner.common.settings import get_settings
from tuner.store._urls import mask_text, mask_url, resolve_url, sqlite_path

if TYPE_CHECKING:
    import optuna
    import sqlalchemy


class NoStore(StorageError):
    """There is no study store at the URL (no SQLite file, or a database without Optuna's
    tables), and the caller asked not to make one."""


def open_storage(
    url: str | None = None,
    *,
    heartbeat: bool = False,
    tables: bool = True,
    must_exist: bool = False,
) -> optuna.storages.RDBStorage:
    """Open (and create the tables of) the store at `url`; unreachable → StorageError.

    `tables=False` skips making (and so inspecting) the tables: for a process of a run, whose
    study exists, so that a hundred workers starting at once do not each inspect the schema.

    `must_exist`: make nothing, neither the SQLite file nor the tables; no store there → NoStore.
    For commands that only read (`study list`, `study show`, ...): a mistyped --storage or the
    wrong folder must not leave an empty tuner.db (or schema) behind.

    Connections are checked before use (pre-ping), so a restarted server costs a reconnect, not
    the sweep. With `heartbeat`, running trials beat every `TUNER_HEARTBEAT_INTERVAL` seconds
    and a trial silent for `TUNER_GRACE_PERIOD` is failed by the next worker that starts a
    trial: that is how a crashed worker's trials stop being RUNNING forever.
    """
    import sqlalchemy.exc

    from tuner.store._reconnect import ReconnectingRDBStorage

    settings = get_settings()
    url = resolve_url(url, settings)
    engine_kwargs: dict = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        # Several worker processes share the file: wait for the lock rather than fail.
        engine_kwargs["connect_args"] = {"timeout": 60}
        if not must_exist:
            _prepare_sqlite(url)
    else:
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
        # One connection kept per process, so a sweep holds about one per running trial however
        # big the cluster. The overflow one, closed as soon as it is returned, serves the moments
        # when Optuna nests a query (its schema check) or a heartbeat meets a trial's report.
        engine_kwargs["pool_size"] = 1
        engine_kwargs["max_overflow"] = 1
        engine_kwargs["pool_timeout"] = 120
    for attempt in range(3):
        try:
            if must_exist:
                _check_exists(url, engine_kwargs)
            storage = ReconnectingRDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=settings.heartbeat_interval if heartbeat else None,
                grace_period=settings.grace_period if heartbeat else None,
                skip_table_creation=must_exist or not tables,
            )
            if url.startswith("sqlite"):
                _serialize_sqlite(storage.engine)
            return storage
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as e:
            # Several processes making the tables of a new database at once: one wins, the
            # others find the tables there on the next try.
            if attempt == 2:
                raise _cannot_open(url, e) from None
            time.sleep(0.5 * (attempt + 1))
        except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as e:
            # A postgresql:// URL without psycopg2: the 'postgres' extra, not a broken store.
            missing = extras.missing_extra(e, what=f"the study store {mask_url(url)}")
            raise (missing or _cannot_open(url, e)) from None
    raise AssertionError("unreachable")


def _check_exists(url: str, engine_kwargs: dict) -> None:
    """NoStore unless the store at `url` holds Optuna's tables. Checked before Optuna opens it:
    its version check writes a version row into a database without one."""
    import sqlalchemy

    missing = NoStore(
        f"there is no study store at {mask_url(url)} yet "
        "(`tuner study create --space FILE` makes one)"
    )
    needed = {"studies", "version_info"}
    path = sqlite_path(url)
    if path is not None:
        if not path.exists():
            raise missing  # connecting would create the file
        _check_sqlite_file(url, path)
        # Opened read-only (mode=ro), by the standard library: no second engine to set up.
        read_only = f"{Path(path).as_uri()}?mode=ro"
        try:
            with contextlib.closing(sqlite3.connect(read_only, uri=True)) as db:
                tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        except sqlite3.Error as e:
            raise _cannot_open(url, e) from None
        if not needed <= tables:
            raise missing
        return
    engine = sqlalchemy.create_engine(url, **engine_kwargs)
    try:
        inspector = sqlalchemy.inspect(engine)
        if not all(inspector.has_table(t) for t in needed):
            raise missing
    finally:
        engine.dispose()


def _serialize_sqlite(engine: sqlalchemy.Engine) -> None:
    """Make each of Optuna's transactions on SQLite one serialized unit.

    Python's sqlite3 driver starts a transaction only at the first write, so Optuna's "read the
    trial, then mark it RUNNING if it was WAITING" runs its read outside the transaction: two
    workers asking at once both took the same enqueued trial (and one then failed with "Cannot
    tell a COMPLETE trial"). BEGIN IMMEDIATE takes the write lock up front; the others wait on
    the driver's busy timeout. This is SQLAlchemy's documented recipe for pysqlite.
    """
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_driver_transactions(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections made while Optuna created the tables lack the listener


def _cannot_open(url: str, error: Exception) -> StorageError:
    reason = mask_text(str(getattr(error, "orig", None) or error), url).strip().splitlines()
    first = reason[0] if reason else type(error).__name__
    return StorageError(f"cannot open the study store {mask_url(url)}: {first}")


def _prepare_sqlite(url: str) -> None:
    path = sqlite_path(url)
    assert path is not None  # resolve_url refused the in-memory stores
    if path.exists():
        _check_sqlite_file(url, path)
        return
    if not path.parent.is_dir():
        raise StorageError(
            f"cannot open the study store {url}: folder {path.parent} does not exist"
        )
    # Made here, where a place that takes no file (/proc, a read-only mount) is one line
    # naming it, rather than deep inside SQLAlchemy.
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except FileExistsError:
        return  # another process of the run made it a moment ago
    except OSError as e:
        raise StorageError(f"cannot create the study store {url}: {e.strerror}") from None
    try:
        # WAL lets the dashboard and `study show` read while workers write; the file keeps it.
        with contextlib.closing(sqlite3.connect(path)) as db:
            db.execute("PRAGMA journal_mode=WAL")
    except sqlite3.Error as e:
        path.unlink(missing_ok=True)  # nothing half-made is left
        raise StorageError(f"cannot create the study store {url}: {e}") from None


class StoreFile:
    """An SQLite store's file as a run opened it, to tell when it is deleted or replaced under
    the run: SQLite goes on writing to the unlinked file, and the run would end "done" with
    every trial lost."""

    def __init__(self, url: str) -> None:
        self.path = sqlite_path(url)
        self.opened = _identity(self.path) if self.path is not None else None

    def check(self) -> None:
        """StorageError (exit status 1) if the file is no longer the one opened."""
        if self.path is None or _identity(self.path) == self.opened:
            return
        error = StorageError(
            f"the study store {self.path} was deleted or replaced during the run, and the "
            "trials it held with it; the run stopped"
        )
        error.exit_code = 1
        raise error


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at `path`; None when there is none."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


def _check_sqlite_file(url: str, path: Path) -> None:
    """A store that exists must be a regular file: SQLite would block on a FIFO, and fails
    obscurely on a folder or a device."""
    if not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file"
        raise StorageError(f"the study store {url}: {path} is {kind}; it must be an SQLite file")
