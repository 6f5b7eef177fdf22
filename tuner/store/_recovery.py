"""Trials whose worker is gone: failed, and retried with the same params.

Every trial records where it runs (`host`, `worker_pid`, and the backend's `worker` id). Three
ways a gone worker's trial is found, so that no trial stays RUNNING:
- the driver sees its slot die and fails the trial at once, with the reason (tuner.backends);
- a run that starts finds the trials of a killed run by their dead process on this machine;
- heartbeats: a trial whose heartbeat is older than the grace period is failed by Optuna's own
  check (`fail_stale_trials`), which workers run before each trial and the driver runs as it
  waits. Heartbeats are recorded by the store (tuner.store._reconnect), which stops recording a
  trial's once it could not for the grace period: by then the trial is stale for everyone.

A failed trial is retried through Optuna's own `RetryHeartbeatStaleTrialCallback` (a WAITING
copy linked to it by `failed_trial`), up to `resources.max_retries`, without the facts of the
failed attempt. A trial that failed by its own error is never retried: the same params would
fail the same way.
"""

from __future__ import annotations

import copy
import logging
import os
import socket
import time
import warnings
from datetime import datetime

import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner.store import attrs
from tuner.store._optuna_private import storage as storage_of
from tuner.store._optuna_private import trial_id as id_of

logger = logging.getLogger(__name__)

# Why a trial failed, when it was stopped rather than failing by itself.
INTERRUPTED = "interrupted (Ctrl-C or a stop signal)"  # not retried: someone stopped the run
# Retried: the run was killed, not the trial (tuner.backends.lifeline).
DRIVER_DIED = "its run's driver died; failed by its worker, which exited"

# Facts of one attempt: a retry starts without them.
_PER_ATTEMPT_ATTRS = (
    attrs.WORKER,
    attrs.RUN,
    attrs.HOST,
    attrs.PID,
    attrs.DRIVER_PID,
    attrs.FAIL_REASON,
)
# How long the next run waits for the workers of a killed run to fail their own trials (they
# notice within a second, tuner.backends.lifeline) before it fails them itself.
ORPHANS_WAIT_S = 15.0
UNMARKED = "its worker died as the trial started: no worker pid nor heartbeat for the grace period"


def mark(
    trial: optuna.Trial,
    worker: str | None = None,
    run: str | None = None,
    driver_pid: int | None = None,
) -> None:
    """Record where the trial runs, so that whoever outlives its worker can fail it, and the run
    it counts for (and, for a worker of this machine, its driver's process)."""
    trial.set_user_attr(attrs.HOST, socket.gethostname())
    trial.set_user_attr(attrs.PID, os.getpid())
    if worker is not None:
        trial.set_user_attr(attrs.WORKER, worker)
    if run:
        trial.set_user_attr(attrs.RUN, run)
    if driver_pid is not None:
        trial.set_user_attr(attrs.DRIVER_PID, driver_pid)


def fail_trial(storage: optuna.storages.BaseStorage, trial_id: int, reason: str) -> bool:
    """Fail a RUNNING trial with the reason. Returns whether it was still RUNNING."""
    trial = storage.get_trial(trial_id)
    if trial.state != TrialState.RUNNING:
        return False
    try:
        storage.set_trial_user_attr(trial_id, attrs.FAIL_REASON, reason)
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False  # its worker (or another process) finished it a moment ago
    logger.warning("trial %d failed: %s", trial.number, reason)
    return True


def fail_and_retry(
    study: optuna.Study, trial: FrozenTrial, reason: str, *, max_retries: int, retry: bool = True
) -> bool:
    """Fail the trial a dead worker left RUNNING and, within `max_retries`, enqueue a copy with
    the same params. Returns whether a retry was enqueued."""
    if not fail_trial(storage_of(study), id_of(trial), reason):
        return False
    return retry and enqueue_retry(study, trial, max_retries=max_retries)


class RetryStale(optuna.storages.RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a failed trial, without the facts of the failed attempt (where it ran,
    why it failed). The store calls it for each trial its heartbeat check fails.

    A trial that kept a checkpoint (tuner.store._checkpoints) passes it on with its user attrs,
    and its intermediate values up to the checkpoint's step: the retry resumes there, so its
    learning curve carries on. Without one, the retry starts at step 0 with no values."""

    def __init__(self, max_retry: int | None = None) -> None:
        super().__init__(max_retry=max_retry, inherit_intermediate_values=True)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        clean = copy.copy(trial)
        clean.user_attrs = {
            k: v for k, v in trial.user_attrs.items() if k not in _PER_ATTEMPT_ATTRS
        }
        saved = trial.user_attrs.get(attrs.CHECKPOINT)
        step = saved["step"] if isinstance(saved, dict) else -1
        clean.intermediate_values = {
            s: v for s, v in trial.intermediate_values.items() if s <= step
        }
        super().__call__(study, clean)


def enqueue_retry(study: optuna.Study, trial: FrozenTrial, *, max_retries: int) -> bool:
    """Enqueue the retry of a failed trial. Returns False when its retries are used up."""
    if retries(trial) >= max_retries:
        return False
    with warnings.catch_warnings():  # Optuna marks its retry callback experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        RetryStale(max_retry=max_retries)(study, trial)
    return True


def retries(trial: FrozenTrial) -> int:
    return len(trial.system_attrs.get(attrs.RETRY_HISTORY, []))


def retried(study: optuna.Study, trial: FrozenTrial) -> bool:
    """Whether a retry of `trial` was enqueued (by whoever failed it)."""
    return any(
        t.system_attrs.get(attrs.RETRY_HISTORY, [None])[-1] == trial.number
        for t in study.get_trials(deepcopy=False)
    )


def superseded(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of failed trials that a retry replaced: they do not count against a budget."""
    return {
        t.system_attrs[attrs.FAILED_TRIAL]
        for t in trials
        if t.system_attrs.get(attrs.FAILED_TRIAL) is not None
    }


def fail_orphans(study: optuna.Study, *, max_retries: int) -> int:
    """Fail (and retry) the RUNNING trials whose worker process on this machine is gone, and
    those whose heartbeat is stale. Trials whose worker lives on but whose driver is gone are
    being failed by their worker (tuner.backends.lifeline): waited for, so that what this run
    counts has settled. Returns how many were failed."""
    host = socket.gethostname()
    failed = 0
    deadline = time.monotonic() + ORPHANS_WAIT_S
    while True:
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        here = [t for t in running if t.user_attrs.get(attrs.HOST) == host]
        for trial in here:
            if worker_gone(trial):
                fail_and_retry(
                    study,
                    trial,
                    "its worker is gone (the run was killed); failed by the next run",
                    max_retries=max_retries,
                )
                failed += 1
        orphaned = [t for t in here if _driver_gone(t) and not worker_gone(t)]
        if not orphaned:
            break
        if time.monotonic() > deadline:
            for trial in orphaned:
                reason = "its run was killed and its worker did not stop; failed by the next run"
                failed += fail_and_retry(study, trial, reason, max_retries=max_retries)
            break
        time.sleep(0.2)
    return failed + fail_stale(study)


def fail_stale(study: optuna.Study) -> int:
    """Optuna's own heartbeat check: RUNNING trials silent for the grace period end FAIL and
    the store's callback (`RetryStale`) retries them; and so do trials that never recorded a
    worker (`unmarked`). Returns how many were failed; 0 on a store without heartbeats."""
    running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    if not running:
        return 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    failed = [
        t.number
        for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        if t.number in running
    ]
    for number in failed:
        logger.warning("trial %d failed: no heartbeat for the grace period", number)
    return len(failed) + _fail_unmarked(study)


def unmarked(trial: FrozenTrial, grace_s: float) -> bool:
    """A RUNNING trial that recorded no worker within the grace period: its process died as it
    made the trial (a full disk, a kill at that instant), before its pid or its first heartbeat
    were written, so neither the pid nor the heartbeat check finds it, and no run stops it."""
    age = datetime.now() - (trial.datetime_start or datetime.now())
    return attrs.PID not in trial.user_attrs and age.total_seconds() > grace_s


def _fail_unmarked(study: optuna.Study) -> int:
    """As Optuna's `fail_stale_trials` does for a stale heartbeat: fail, then the store's
    callback (the retry)."""
    from tuner.common.settings import get_settings

    storage = storage_of(study)
    if storage.get_heartbeat_interval() is None:
        return 0  # a store opened without heartbeats (a reader's) fails nothing
    grace = get_settings().grace_period
    retry = storage.get_heartbeat_stale_trial_callback()
    failed = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if unmarked(trial, grace) and fail_trial(storage, id_of(trial), UNMARKED):
            failed += 1
            if retry is not None:
                retry(study, copy.deepcopy(storage.get_trial(id_of(trial))))
    return failed


def worker_gone(trial: FrozenTrial) -> bool:
    """Whether the trial's worker is known to be gone: a process of this machine that is dead.
    (A worker elsewhere is known by its heartbeat only.)"""
    pid = trial.user_attrs.get(attrs.PID)
    here = trial.user_attrs.get(attrs.HOST) == socket.gethostname()
    return here and pid is not None and not _alive(pid)


def _driver_gone(trial: FrozenTrial) -> bool:
    """Whether the trial's driver, a process of this machine, is gone (a worker of this
    machine records it)."""
    pid = trial.user_attrs.get(attrs.DRIVER_PID)
    return pid is not None and not _alive(pid)


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
