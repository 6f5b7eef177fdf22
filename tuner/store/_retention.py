"""Disk: a study keeps the adapters of its best `budget.keep_adapters` trials (5 by default) and
drops the rest as trials finish, so that a 500-trial sweep does not fill the disk.

Each worker decides as its trial finishes: a trial outside the best k uploads nothing, and one
inside pushes out the adapters that fell below. Two trials finishing together may keep k + 1 for
a moment; the next finish trims it.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import optuna
from optuna.trial import TrialState

from tuner.store import attrs
from tuner.store._ranking import rank_key

logger = logging.getLogger(__name__)


def keep_adapter(
    study: optuna.Study,
    store: Any,
    *,
    number: int,
    value: float,
    keep: int | None,
) -> bool:
    """Whether trial `number` (value `value`, not yet told) is among the best `keep`; removes
    the stored adapters of the trials it pushes out. `keep` None keeps every adapter."""
    if keep is None:
        return True
    holders = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.user_attrs.get(attrs.ADAPTER) and t.number != number and t.value is not None
    ]
    # Ties go to the earlier trial, as the study's best does.
    ranked = sorted(
        [(rank_key(t.value, study.direction), t.number) for t in holders]
        + [(rank_key(value, study.direction), number)]
    )
    kept = {n for _, n in ranked[:keep]}
    for t in holders:
        if t.number not in kept:
            _remove(store, t)
    return number in kept


def _remove(store: Any, trial: optuna.trial.FrozenTrial) -> None:
    removed = 0
    for artifact_id in trial.user_attrs[attrs.ADAPTER].values():
        # Another worker may have removed it first.
        with contextlib.suppress(Exception):
            store.remove(artifact_id)
            removed += 1
    if removed:
        logger.info("dropped trial %d's adapter: no longer among the best", trial.number)
