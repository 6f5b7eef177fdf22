"""Which value is better, in a study's direction: the one rule every "best" in tuner follows
(the best trial, the adapters kept, a sweep's champion, the margin over the baseline)."""

from __future__ import annotations

import math

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

Direction = StudyDirection | str  # a study's, or a space's "minimize" / "maximize"


def minimizes(direction: Direction) -> bool:
    if isinstance(direction, StudyDirection):
        return direction == StudyDirection.MINIMIZE
    return direction.lower() == "minimize"


def better(value: float, than: float, direction: Direction) -> bool:
    """Whether `value` is strictly better than `than`."""
    return value < than if minimizes(direction) else value > than


def gain(base: float, best: float, direction: Direction) -> float:
    """How much `best` improves on `base`: positive when it is better."""
    return base - best if minimizes(direction) else best - base


def rank_key(value: float, direction: Direction) -> float:
    """A sort key: the better the value, the smaller the key."""
    return value if minimizes(direction) else -value


def counts_as_best(trial: FrozenTrial) -> bool:
    """A COMPLETE trial with a finite value: the only kind that can be a study's best."""
    return (
        trial.state == TrialState.COMPLETE
        and trial.value is not None
        and math.isfinite(trial.value)
    )


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    """The best COMPLETE trial with a finite value, or None."""
    best = None
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if counts_as_best(t) and (best is None or better(t.value, best.value, study.direction)):
            best = t
    return best


def state_counts(study: optuna.Study) -> dict[str, int]:
    """How many of the study's trials are in each state ({"complete": 3, "pruned": 1})."""
    counts = {state.name.lower(): 0 for state in TrialState}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name.lower()] += 1
    return {k: v for k, v in counts.items() if v}
