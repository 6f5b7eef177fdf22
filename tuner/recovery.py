"""Trials whose worker is gone: failed with the reason, and retried with the same params.

Every trial records where it runs (`host`, `worker_pid`, and the backend's `worker` id). A
backend that sees its worker die fails the trial at once; a run that starts finds the trials
of a killed run (driver and workers gone) by their dead process, or by a stale heartbeat when
they ran on another machine, so no trial stays RUNNING. A trial that failed by its own error
is never retried: the same params would fail the same way.
"""

from __future__ import annotations

import copy
import logging
import os
import socket

import optuna
from optuna.trial import FrozenTrial, TrialState

logger = logging.getLogger(__name__)

WORKER_ATTR = "worker"
HOST_ATTR = "host"
PID_ATTR = "worker_pid"
# Facts of one attempt: a retry starts without them.
_PER_ATTEMPT_ATTRS = (WORKER_ATTR, HOST_ATTR, PID_ATTR, "fail_reason")


def mark(trial: optuna.Trial, worker: str | None = None) -> None:
    """Record where the trial runs, so that whoever outlives its worker can fail it."""
    trial.set_user_attr(HOST_ATTR, socket.gethostname())
    trial.set_user_attr(PID_ATTR, os.getpid())
    if worker is not None:
        trial.set_user_attr(WORKER_ATTR, worker)


def fail_trial(storage: optuna.storages.BaseStorage, trial_id: int, reason: str) -> bool:
    """Fail a RUNNING trial with the reason. Returns whether it was still RUNNING."""
    trial = storage.get_trial(trial_id)
    if trial.state != TrialState.RUNNING:
        return False
    storage.set_trial_user_attr(trial_id, "fail_reason", reason)
    storage.set_trial_state_values(trial_id, TrialState.FAIL)
    logger.warning("trial %d failed: %s", trial.number, reason)
    return True


def fail_and_retry(
    study: optuna.Study, trial: FrozenTrial, reason: str, *, max_retries: int, retry: bool = True
) -> bool:
    """Fail the trial a dead worker left RUNNING and, within `max_retries`, enqueue a copy with
    the same params. Returns whether a retry was enqueued."""
    if not fail_trial(study._storage, trial._trial_id, reason):
        return False
    return retry and enqueue_retry(study, trial, max_retries=max_retries)


def enqueue_retry(study: optuna.Study, trial: FrozenTrial, *, max_retries: int) -> bool:
    """Optuna's own retry (a WAITING copy linked to the original by `failed_trial`), without
    the facts of the failed attempt. Returns False when the retries are used up."""
    if retries(trial) >= max_retries:
        return False
    clean = copy.copy(trial)
    clean.user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in _PER_ATTEMPT_ATTRS}
    optuna.storages.RetryFailedTrialCallback(max_retry=max_retries)(study, clean)
    return True


class RetryStale:
    """`heartbeat_stale_trial_callback` for the workers' store: when Optuna's own heartbeat
    check (run before each trial) fails a stale trial, it is retried like any orphan."""

    def __init__(self, max_retries: int) -> None:
        self.max_retries = max_retries

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        enqueue_retry(study, trial, max_retries=self.max_retries)


def retries(trial: FrozenTrial) -> int:
    return len(trial.system_attrs.get("retry_history", []))


def fail_orphans(study: optuna.Study, *, max_retries: int) -> int:
    """Fail (and retry) the RUNNING trials whose worker process on this machine is gone, and
    those whose heartbeat is stale. Returns how many were failed."""
    host = socket.gethostname()
    failed = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = trial.user_attrs.get(PID_ATTR)
        if trial.user_attrs.get(HOST_ATTR) == host and pid is not None and not _alive(pid):
            fail_and_retry(
                study,
                trial,
                "its worker is gone (the run was killed); failed by the next run",
                max_retries=max_retries,
            )
            failed += 1
    failed += _fail_stale(study, max_retries=max_retries)
    return failed


def _fail_stale(study: optuna.Study, *, max_retries: int) -> int:
    """Optuna's heartbeat check, with our reason and retry (it would copy per-attempt facts)."""
    storage = study._storage
    if not isinstance(storage, optuna.storages.RDBStorage) or not storage.heartbeat_interval:
        return 0
    stale = storage._get_stale_trial_ids(study._study_id)
    for trial_id in stale:
        fail_and_retry(
            study,
            storage.get_trial(trial_id),
            "no heartbeat for the grace period (its worker or node is gone)",
            max_retries=max_retries,
        )
    return len(stale)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    import psutil

    try:  # a zombie (killed, not yet reaped) is gone for our purposes
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def superseded(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of failed trials that a retry replaced: they do not count against a budget."""
    return {
        t.system_attrs["failed_trial"]
        for t in trials
        if t.system_attrs.get("failed_trial") is not None
    }
