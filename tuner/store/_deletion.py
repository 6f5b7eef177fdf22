"""Deleting a study that may be running: refused while its trials are alive, or stopped first
(`force`); the study looked for again before anyone is told it is gone, its artifacts removed
after its rows.

Optuna's `delete_study` ignores an IntegrityError: when a run writes (a new trial, a heartbeat)
while the study's rows are deleted, the delete is rolled back and returns as if it had deleted.
And a run whose study vanished under it failed in every process, with tracebacks. So:

1. the study's live trials (RUNNING, heartbeat fresh, worker not known dead) refuse the delete,
   named, unless it is forced;
2. the study is marked (study user attr `deleting`, who and when). Every process of a run reads
   the mark: a trial stops at its next report and ends FAIL "study deleted" (trials.reporter;
   every rank of a multi-GPU trial stops at the same step); a worker starts no trial; the
   driver hands out none, and the run ends with one line (`StudyDeleted`);
3. the delete waits for the trials to stop: at most the heartbeat grace period, after which
   the trial would count as dead anyway, and it fails those left;
4. the rows are deleted, and the study looked for again, until it is gone (else `NotDeleted`);
5. only then do the artifacts go: a delete that did not happen leaves a whole study, never
   trials without their adapters.

Optuna cannot remove a study attr: a delete interrupted after step 2 leaves the study marked,
and runs refuse it until `tuner study delete NAME --force` finishes the job (`check_not_marked`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

from optuna.trial import FrozenTrial, TrialState

from tuner.common.errors import StorageError
from tuner.common.settings import get_settings
from tuner.store import attrs, recovery
from tuner.store._optuna_private import stale_trial_ids
from tuner.store._optuna_private import storage as storage_of
from tuner.store._optuna_private import study_id as study_id_of
from tuner.store._optuna_private import trial_id as id_of
from tuner.store._urls import mask_url

if TYPE_CHECKING:
    from tuner.store._studies import OpenStudy

logger = logging.getLogger(__name__)

REASON = "study deleted"  # the fail reason of a trial stopped by a delete
POLL_S = 0.5
ATTEMPTS = 5  # deletes tried before giving up on a study that a run keeps writing to


class StudyInUse(StorageError):
    """A delete refused: trials of the study are running (exit status 2)."""


class NotDeleted(StorageError):
    """The delete ran and the study is still there (exit status 1)."""

    exit_code = 1


# ----------------------------------------------------------------------------- the mark


def mark(storage: Any, study_id: int) -> None:
    """Mark the study as being deleted (idempotent: a second delete keeps the first mark)."""
    if attrs.DELETING in storage.get_study_user_attrs(study_id):
        return
    who = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "at": datetime.now().isoformat(timespec="seconds"),
    }
    storage.set_study_user_attr(study_id, attrs.DELETING, who)


def marked(storage: Any, study_id: int) -> bool:
    """Whether the study is being deleted: marked, or gone already (its id is never reused for
    another study, even one made again under its name)."""
    try:
        return attrs.DELETING in storage.get_study_user_attrs(study_id)
    except KeyError:
        return True


def deleting(study: Any) -> bool:
    """`marked`, asked by a process of a run about its study: a store it cannot read now says
    no (the process's next call meets the same error, and reports it as such)."""
    try:
        return marked(storage_of(study), study_id_of(study))
    except Exception:  # noqa: BLE001 - not known to be deleted
        return False


def check_not_marked(name: str, stored: dict[str, Any]) -> None:
    """Refuse to run a study whose delete began (`stored`: its user attrs)."""
    who = stored.get(attrs.DELETING)
    if who is None:
        return
    by = f" (on {who.get('host')}, pid {who.get('pid')}, at {who.get('at')})" if who else ""
    raise StorageError(
        f"study {name!r} is being deleted{by}; `tuner study delete {name} --force` finishes it"
    )


# ----------------------------------------------------------------------------- live trials


def live_trials(opened: OpenStudy) -> list[FrozenTrial]:
    """The study's RUNNING trials that may still be training: not stale by their heartbeat,
    their worker not known dead, and not a trial that never recorded a worker in the grace
    period (an orphan: no run can stop it)."""
    store, study_id = opened.store, _study_id(opened)
    running = store.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
    if not running:
        return []
    stale = stale_trial_ids(store, study_id) if store.heartbeat_interval else set()
    grace = get_settings().grace_period
    live = []
    for trial in running:
        if id_of(trial) in stale or recovery.worker_gone(trial):
            continue
        if recovery.unmarked(trial, grace):
            continue
        live.append(trial)
    return live


def describe(trials: list[FrozenTrial]) -> str:
    """`trial 3 (gpu-node-1, pid 4242), trial 5 (...)`: where each one runs, as recorded."""
    named = []
    for trial in trials:
        host, pid = trial.user_attrs.get(attrs.HOST), trial.user_attrs.get(attrs.PID)
        where = ", ".join(x for x in (host, f"pid {pid}" if pid is not None else None) if x)
        named.append(f"trial {trial.number}" + (f" ({where})" if where else ""))
    return ", ".join(named)


# ----------------------------------------------------------------------------- deleting


def delete(
    name: str, storage: str | None = None, *, force: bool = False, wait_s: float | None = None
) -> int:
    """Delete the study and its artifacts (see the module); returns how many artifacts were
    removed. `wait_s`: how long running trials get to stop (default: the heartbeat grace
    period). StudyInUse when trials run and not `force`; NotDeleted when the study outlived
    every try."""
    from tuner.store._artifacts import artifact_ids, clear_tokenized, remove_ids
    from tuner.store._studies import open_study
    from tuner.store._urls import study_location

    # With heartbeats: whether a running trial is alive is read from them.
    opened = open_study(name, storage, heartbeat=True)
    store, study_id = opened.store, _study_id(opened)
    wait_s = get_settings().grace_period if wait_s is None else wait_s
    try:
        live = live_trials(opened)
        if live and not force:
            raise StudyInUse(
                f"study {name!r} is running: {describe(live)}; stop its run first (Ctrl-C), or "
                f"`tuner study delete {name} --force` stops them at their next report and "
                "deletes it"
            )
        mark(store, study_id)
        _wait_for_trials(opened, wait_s)
        ids = artifact_ids(opened.study, store)  # after the wait: a trial may have stored one
    except KeyError:
        # Another delete (a second terminal, the dashboard) took it since it was opened.
        raise StorageError(
            f"no study {name!r} in {mask_url(opened.url)}: it was deleted meanwhile"
        ) from None
    _delete_rows(opened, study_id, wait_s)
    removed = remove_ids(opened.artifact_store(), ids)
    others = [study_location(s.user_attrs, opened.url) for s in store.get_all_studies()]
    if opened.artifacts not in others:
        # The tokenised data is shared by the studies of a location: the last one takes it along.
        clear_tokenized(opened.artifacts)
    return removed


def _wait_for_trials(opened: OpenStudy, wait_s: float) -> None:
    """Wait for the live trials to stop at their next report; fail those left after `wait_s`
    (their workers meet a deleted study at their next write, and end)."""
    deadline = time.monotonic() + wait_s
    told = False
    while live := live_trials(opened):
        if time.monotonic() > deadline:
            break
        if not told:
            logger.info("stopping %s at their next report (at most %.0f s)", describe(live), wait_s)
            told = True
        time.sleep(POLL_S)
    store, study_id = opened.store, _study_id(opened)
    for trial in store.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
        recovery.fail_trial(store, id_of(trial), REASON)


def _delete_rows(opened: OpenStudy, study_id: int, wait_s: float) -> None:
    """Delete the study's rows until it is gone. A run's write that meets the delete rolls it
    back, silently (a trial made just as the mark was written, say): that trial stops at its
    first report, and the next try deletes it too."""
    store, name = opened.store, opened.study.study_name
    for attempt in range(ATTEMPTS):
        with contextlib.suppress(KeyError):  # another delete was quicker
            store.delete_study(study_id)
        if _gone(store, study_id):
            return
        logger.info("study %s is still there (a run wrote to it meanwhile); trying again", name)
        time.sleep(POLL_S * (attempt + 1))
        with contextlib.suppress(KeyError):  # gone meanwhile: the next look finds it so
            _wait_for_trials(opened, wait_s)
    raise NotDeleted(
        f"study {name!r} is still in {mask_url(opened.url)} after {ATTEMPTS} deletes: something "
        f"keeps writing to it; stop its runs, then `tuner study delete {name}` again"
    )


def _gone(store: Any, study_id: int) -> bool:
    try:
        store.get_study_name_from_id(study_id)
    except KeyError:
        return True
    return False


def _study_id(opened: OpenStudy) -> int:
    return study_id_of(opened.study)
