"""What runs in a slot, whatever the backend: one process (a local worker, a Ray actor) that
opens the study, warms the workload up once, and then runs the trials the driver hands it, one
at a time, through Optuna's own `study.optimize`.

Set-up, in order: logs quieted (the driver reports each trial) → the study opened with
heartbeats → the objective's workload imported and its threads set, while the whole study is
read into the cache in a thread (a worker needs it for the pruner) → a sampler seeded apart
from every other slot's, wrapped to take the params the driver feeds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from tuner.backends.base import Ran
from tuner.backends.feed import FedSampler, read_while
from tuner.common.errors import StoreFull, caused_by


@dataclass(frozen=True)
class WorkerSpec:
    """One slot's worker, as its backend starts it."""

    study_name: str
    storage_url: str
    worker: str  # the slot's id, recorded on each trial it runs
    index: int  # the slot's number in the run: its sampler draws apart from the others'
    threads: int  # torch threads for training (the CPU share of the slot)
    log_level: int = logging.WARNING
    rank: int = 0  # in a multi-GPU slot, this process's rank; rank 0 runs the Optuna trial
    world: int = 1  # processes that train one trial
    run: str = ""  # the run's id, recorded on each trial (tuner/store/_runs.py)
    seed_offset: int = 0  # the run's: its draws differ from other runs' at once


class Worker:
    def __init__(self, spec: WorkerSpec) -> None:
        from tuner.search import algorithms
        from tuner.store import open_study
        from tuner.trial.objective import Objective, quiet_worker_logs

        quiet_worker_logs(spec.log_level)
        self.spec = spec
        self.opened = open_study(
            spec.study_name, spec.storage_url, heartbeat=spec.rank == 0, in_run=True
        )
        study, space = self.opened.study, self.opened.space
        self.objective = Objective(space, artifacts=self.opened.artifacts, ranks=spec.world)
        self.objective.worker = spec.worker  # the driver finds the slot's trial by it
        self.objective.run = spec.run  # the run's summary counts the trial by it
        self.objective.on_trial_start = self._started
        self.trial_id: int | None = None
        with read_while(study):
            self.objective.warm_up(threads=spec.threads)
        # Distinct per slot and per run, so that no two slots draw the same trials when they
        # sample for themselves, nor two runs at once (the run's offset); the study was just
        # read, so counting it costs no query.
        seed_offset = spec.seed_offset + 7919 * spec.index + len(study.get_trials(deepcopy=False))
        self.sampler = study.sampler = FedSampler(
            algorithms.build_sampler(space.sampler, seed_offset=seed_offset)
        )

    def _started(self, trial: Any) -> None:
        from tuner.store import optuna_private

        self.trial_id = optuna_private.trial_id(trial)

    def run_one(self, params: dict[str, Any] | None = None) -> Ran:
        """Run one trial (with the driver's `params`, if fed). An error that is not the trial's
        own (Optuna records those) is raised: the slot is broken, and its backend says so."""
        self.trial_id = None
        if self._deleting():
            return Ran(None)  # no trial for a study being deleted: the driver stops too
        self.sampler.offer(params)
        try:
            self.opened.study.optimize(
                self.objective, n_trials=1, catch=(Exception,), gc_after_trial=True
            )
        except Exception as e:
            full = caused_by(e, StoreFull)
            if full is not None:
                # Optuna's own bookkeeping fails after the write that could not be made (an
                # assertion): the full disk is what the driver must say.
                raise full from None
            if self._deleting():
                return Ran(self.trial_id)  # deleted under the trial: it went with its study
            # Another process failed this trial (as stale, while the store was away) and may
            # have enqueued its retry: the trial is over and the worker is fine.
            ended = self._ended_elsewhere(self.trial_id)
            if ended is None:
                raise
            return ended
        if self.spec.world > 1 and not self.objective.shared:
            # The trial ended before its config was shared (a bad value, a store error): the
            # other ranks are waiting for one, so tell them there is none.
            from trials import distributed

            distributed.share(None)
        return Ran(self.trial_id)

    def retry_failed(self) -> None:
        """Enqueue the retry of this worker's last trial, which its driver, gone, cannot."""
        from optuna.trial import TrialState

        from tuner.store import recovery

        if self.trial_id is None:
            return
        study = self.opened.study
        trial = self.opened.store.get_trial(self.trial_id)
        if trial.state == TrialState.FAIL and not recovery.retried(study, trial):
            max_retries = self.opened.space.resources.max_retries
            recovery.enqueue_retry(study, trial, max_retries=max_retries)

    def _deleting(self) -> bool:
        from tuner.store import deletion

        return deletion.deleting(self.opened.study)

    def follow(self) -> int | None:
        """A rank other than 0 of a multi-GPU slot: train the trial rank 0 shares."""
        return self.objective.follow()

    def _ended_elsewhere(self, trial_id: int | None) -> Ran | None:
        from tuner.store import recovery

        if trial_id is None:
            return None
        try:
            trial = self.opened.store.get_trial(trial_id)
            if not trial.state.is_finished():
                return None
            return Ran(trial_id, requeued=recovery.retried(self.opened.study, trial))
        except Exception:  # noqa: BLE001 - the store is away again: the first error stands
            return None
