"""Optuna's RDB storage, riding out a database server that restarts or drops its connections.

`pool_pre_ping` replaces a connection found dead when it is taken from the pool; a connection
cut while in use (a restart in the middle of a report, a heartbeat, the stale-trial check at a
trial's start) still fails that one call with `StorageInternalError`, and with it a trial that
may have trained for hours. Here such a call is made again on a fresh connection. Only lost
connections are retried: a constraint violation or a lock timeout is raised at once.

A write whose commit reached the server just before the connection went is made twice; the
store's writes are idempotent (attrs, params, intermediate values), or raise on the second try
(a trial already finished), so nothing is recorded that did not happen.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

import optuna
import sqlalchemy.exc

from tuner.common.errors import StoreFull

logger = logging.getLogger(__name__)

# Waits between attempts: about 45 s in all, longer than a server restart and than the
# heartbeat grace period a restart should not outlast.
WAITS_S = (1.0, 2.0, 4.0, 8.0, 15.0, 15.0)
ATTEMPTS = len(WAITS_S) + 1

# RDBStorage's methods that talk to the database, the private ones Optuna's own cache layer
# (`_CachedStorage`, which every Study wraps around an RDBStorage) calls included.
_METHODS = (
    "create_new_study",
    "delete_study",
    "set_study_user_attr",
    "set_study_system_attr",
    "get_study_id_from_name",
    "get_study_name_from_id",
    "get_study_directions",
    "get_study_user_attrs",
    "get_study_system_attrs",
    "get_trial_user_attrs",
    "get_trial_system_attrs",
    "get_all_studies",
    "create_new_trial",
    "set_trial_param",
    "get_trial_param",
    "set_trial_state_values",
    "set_trial_intermediate_value",
    "set_trial_user_attr",
    "set_trial_system_attr",
    "get_trial_id_from_study_id_trial_number",
    "get_trial",
    "get_all_trials",
    "get_best_trial",
    "_get_stale_trial_ids",
    "_create_new_trial",
    "_set_trial_param",
    "_get_best_trial_id",
    "_get_trials",
)


# PostgreSQL's SQLSTATEs for a server that went away or is not up yet: class 08 (connection
# exception) and the shutdown and start-up states of class 57.
_GONE = ("08", "57P01", "57P02", "57P03")


def connection_lost(error: BaseException) -> bool:
    """Whether a storage error came from a server that closed the connection, or that cannot
    be reached while it restarts (refused, shutting down, starting up)."""
    cause = _cause(error)
    if isinstance(cause, sqlalchemy.exc.PendingRollbackError) and "reconnect" in str(cause):
        # The connection died inside a transaction, and the session tried once more on it (as
        # Optuna's fallback query for trial attrs does): a fresh call gets a fresh connection.
        return True
    if not isinstance(cause, sqlalchemy.exc.DBAPIError):
        return False
    if cause.connection_invalidated:
        return True
    if isinstance(cause, sqlalchemy.exc.InterfaceError) and "closed" in str(cause.orig):
        return True  # psycopg2's "connection already closed": dropped while it was in use
    if not isinstance(cause, sqlalchemy.exc.OperationalError):
        return False
    # psycopg2 sets pgcode to None when no server answered (connection refused). SQLite's
    # errors have no pgcode at all: a locked database is not a lost connection.
    code = getattr(cause.orig, "pgcode", "no server code")
    return code is None or code.startswith(_GONE)


_FULL_PG_CODE = "53100"  # PostgreSQL's disk_full


def _cause(error: BaseException) -> BaseException:
    """The driver's error behind one Optuna wrapped in StorageInternalError."""
    wrapped = isinstance(error, optuna.exceptions.StorageInternalError)
    return (error.__cause__ or error) if wrapped else error


def store_full(error: BaseException) -> bool:
    """Whether a storage error came from a store whose disk is full."""
    cause = _cause(error)
    if not isinstance(cause, sqlalchemy.exc.OperationalError):
        return False
    orig = cause.orig
    return (
        getattr(orig, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
        or getattr(orig, "pgcode", None) == _FULL_PG_CODE
    )


def _full(storage: Any) -> StoreFull:
    from tuner.store._urls import mask_url

    return StoreFull(
        f"the study store {mask_url(storage.url)} is out of disk space; free some there, then "
        "run again"
    )


_calling = threading.local()  # set while a retried call runs: the calls it makes are not retried


def _call(
    method: Callable[..., Any], self: Any, args: Any, kwargs: Any, *, until: float | None = None
) -> Any:
    """`method(self, *args, **kwargs)`, made again on a lost connection, ATTEMPTS times at most
    and never past `until` (time.monotonic()); then the last error is raised."""
    if getattr(_calling, "active", False):
        return method(self, *args, **kwargs)
    for attempt in range(1, ATTEMPTS + 1):
        _calling.active = True
        try:
            return method(self, *args, **kwargs)
        except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.DBAPIError) as e:
            if store_full(e):
                raise _full(self) from None
            wait = WAITS_S[attempt - 1] if attempt < ATTEMPTS else 0.0
            late = until is not None and time.monotonic() + wait > until
            if attempt == ATTEMPTS or late or not connection_lost(e):
                raise
            logger.warning(
                "study store connection lost (%s); reconnecting, try %d of %d",
                method.__name__,
                attempt + 1,
                ATTEMPTS,
            )
            time.sleep(wait)
        finally:
            _calling.active = False
    raise AssertionError("unreachable")


def _reconnecting(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(self: ReconnectingRDBStorage, *args: Any, **kwargs: Any) -> Any:
        return _call(method, self, args, kwargs)

    return call


class ReconnectingRDBStorage(optuna.storages.RDBStorage):
    """`optuna.storages.RDBStorage` whose calls survive a dropped connection."""

    def record_heartbeat(self, trial_id: int) -> None:
        """Record a running trial's heartbeat (Optuna's heartbeat thread calls this every
        interval), retrying a lost connection only within the grace period since the trial's
        last recorded beat. Past it, the trial is stale for every process, which may already
        have failed it and enqueued its retry: beating again would make a failed trial look
        alive, so this trial's heartbeat stops. A beat that cannot be recorded is logged, not
        raised: Optuna's heartbeat thread would end with a traceback."""
        beats = self.__dict__.setdefault("_beats", {})  # trial id -> last recorded (monotonic)
        if beats.get(trial_id) == _GAVE_UP:
            return
        last = beats.setdefault(trial_id, time.monotonic())
        grace = self.grace_period or 2 * (self.heartbeat_interval or 0)
        try:
            _call(optuna.storages.RDBStorage.record_heartbeat, self, (trial_id,), {},
                  until=last + grace)  # fmt: skip
        except Exception as e:  # noqa: BLE001 - the trial goes on; its heartbeat may not
            if time.monotonic() - last < grace:
                logger.warning("trial heartbeat not recorded: %s", str(e).splitlines()[0])
                return
            beats[trial_id] = _GAVE_UP
            logger.warning(
                "trial heartbeat not recorded for the grace period (%ss); the trial is stale and "
                "will be failed and retried",
                grace,
            )
            return
        beats[trial_id] = time.monotonic()
        while len(beats) > 64:  # the trials of long ago
            del beats[next(iter(beats))]


_GAVE_UP = -1.0


for _name in _METHODS:
    setattr(
        ReconnectingRDBStorage, _name, _reconnecting(getattr(optuna.storages.RDBStorage, _name))
    )
