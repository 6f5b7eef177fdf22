"""A trial's checkpoints in the study's artifact store, where a retry on any node finds them.

`trials/checkpoint.py` decides when the Trainer writes one; this keeps it. Each rank of a trial
puts what it wrote (a tar of its checkpoint folder: a rank's RNG state, a ZeRO shard) under an id
made of the attempt's token, the step and the rank; rank 0 then records the checkpoint on the
trial (`checkpoint`: token, step, ranks) and removes the one before, so a trial holds one.

A retry of a trial whose worker died inherits that record with the rest of its user attrs
(`tuner.store._recovery.RetryStale`), and its intermediate values up to the checkpoint's step:
it fetches every rank's part into its own folder and resumes from there. A trial that ends, by
finishing, pruning or its own error, removes its checkpoint: nothing is left to resume.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from optuna.artifacts.exceptions import ArtifactNotFound

from tuner.store import attrs
from tuner.store._folders import get_folder, put_folder
from tuner.store._optuna_private import storage as storage_of
from tuner.store._optuna_private import trial_id

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Saved:
    """A checkpoint as a trial records it."""

    token: str  # the attempt that wrote it
    step: int
    ranks: int

    def part(self, rank: int) -> str:
        """The artifact id of one rank's part."""
        return f"checkpoint-{self.token}-step{self.step}-rank{rank}.tar"

    def as_attr(self) -> dict[str, Any]:
        return {"token": self.token, "step": self.step, "ranks": self.ranks}

    @classmethod
    def from_attr(cls, value: Any) -> Saved | None:
        if not isinstance(value, dict):
            return None
        return cls(str(value["token"]), int(value["step"]), int(value["ranks"]))


def resumable(trial: Any) -> Saved | None:
    """The checkpoint a trial resumes from: a retry's inherited one. A trial enqueued by hand or
    from another study (a warm start copies user attrs) never resumes another's training."""
    saved = Saved.from_attr(trial.user_attrs.get(attrs.CHECKPOINT))
    if saved is None:
        return None  # the common case, answered without asking the store
    system = storage_of(trial.study).get_trial_system_attrs(trial_id(trial))
    return saved if system.get(attrs.FAILED_TRIAL) is not None else None


def parts(trial: Any) -> list[str]:
    """The artifact ids of the checkpoint a trial (frozen) left, if any."""
    saved = Saved.from_attr(trial.user_attrs.get(attrs.CHECKPOINT))
    return [saved.part(rank) for rank in range(saved.ranks)] if saved else []


def remove(store: Any, saved: Saved) -> None:
    """Remove every rank's part of a checkpoint; a part already gone is not an error."""
    for rank in range(saved.ranks):
        with contextlib.suppress(ArtifactNotFound, OSError):
            store.remove(saved.part(rank))


def drop_unresumable(study: Any, store: Any, *, since: datetime) -> int:
    """Remove the checkpoints of trials that failed since `since` and that nothing will resume:
    a worker that died past `resources.max_retries`, a trial ended by `trial_timeout`. (A retry
    waiting or running holds the same checkpoint, which stays.) Returns how many went."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    held = {
        Saved.from_attr(t.user_attrs.get(attrs.CHECKPOINT))
        for t in trials
        if t.state in (TrialState.WAITING, TrialState.RUNNING)
    }
    dropped = 0
    for trial in trials:
        saved = Saved.from_attr(trial.user_attrs.get(attrs.CHECKPOINT))
        ended = trial.datetime_complete
        if trial.state != TrialState.FAIL or saved is None or saved in held:
            continue
        if ended is None or ended < since:
            continue  # an earlier run's: it had its turn to go
        remove(store, saved)
        dropped += 1
    return dropped


@dataclass
class StoredCheckpoints:
    """One rank's keeper of one attempt's checkpoints (the `trials.checkpoint.Keeper`)."""

    store: Any  # the study's Optuna artifact store
    every_steps: int | None
    every_seconds: float | None
    rank: int = 0
    ranks: int = 1
    trial: Any = None  # rank 0's Optuna trial, which records the checkpoint
    resume: Saved | None = None  # what this attempt resumes from
    token: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    current: Saved | None = None  # the one to resume from now

    def __post_init__(self) -> None:
        self.current = self.resume

    def restore(self, into: Path) -> Path | None:
        if self.resume is None:
            return None
        folder = into / f"checkpoint-{self.resume.step}"
        folder.mkdir(parents=True, exist_ok=True)
        try:
            for rank in range(self.resume.ranks):
                get_folder(self.store, self.resume.part(rank), folder)
        except ArtifactNotFound as e:
            # Removed by hand, or by a retention policy: the params are still worth a run.
            logger.warning(
                "checkpoint at step %d is gone (%s); starting at step 0", self.resume.step, e
            )
            self.resume = None
            return None
        if self.trial is not None:
            self.trial.set_user_attr(attrs.RESUMED_FROM_STEP, self.resume.step)
        return folder

    def save(self, step: int, folder: Path) -> None:
        put_folder(self.store, Saved(self.token, step, self.ranks).part(self.rank), folder)

    def commit(self, step: int) -> None:
        if self.trial is None:
            return  # rank 0 records it
        saved, before = Saved(self.token, step, self.ranks), self.current
        self.trial.set_user_attr(attrs.CHECKPOINT, saved.as_attr())
        self.current = saved
        if before is not None:
            remove(self.store, before)

    def discard(self) -> None:
        """The trial has ended: its checkpoints (and the one it resumed from) go."""
        if self.trial is None:
            return
        for saved in {self.current, self.resume} - {None}:
            remove(self.store, saved)
        if self.current is not None:
            self.trial.set_user_attr(attrs.CHECKPOINT, None)
        self.current = None
