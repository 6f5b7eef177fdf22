"""The median rule, made to hold when trials run in parallel.

Optuna's MedianPruner compares a trial at step s with the trials that have FINISHED, and waits
for `n_startup_trials` of them. With J trials training at once, the first J all run to the end
before anything has finished, and every later decision sees fewer finished curves than a run one
trial at a time would: on the simulated space at `--jobs 4`, it saved 23 % of the training steps
against 52 % serially (issue 24).

`ReportedMedianPruner` keeps the rule and changes what it compares with: every other trial that
reported step s, whether it finished, was pruned there or later, or is still training. It starts
once `n_startup_trials` others have reported that step, so parallel trials judge each other as
they go, and a trial that starts late is judged by as many curves as a serial run would give it.
"""

from __future__ import annotations

import math

import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

# A trial that failed stopped for its own reasons (NaN, out of memory): its values say nothing
# about the others'. Every other state has reported what it reached.
_COMPARED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


class ReportedMedianPruner(optuna.pruners.BasePruner):
    """Prune a trial whose best value so far is worse than the `percentile` (50: the median) of
    the values the study's other trials reported at the same step (finished, pruned or running),
    once `n_startup_trials` of them have reported it; never before `n_warmup_steps`, and then at
    the first reported step of every `interval_steps`. Options as Optuna's MedianPruner's."""

    def __init__(
        self,
        n_startup_trials: int = 5,
        n_warmup_steps: int = 0,
        interval_steps: int = 1,
        *,
        percentile: float = 50.0,
    ) -> None:
        if n_startup_trials < 1:
            raise ValueError(f"n_startup_trials must be at least 1, got {n_startup_trials}")
        if n_warmup_steps < 0:
            raise ValueError(f"n_warmup_steps must be 0 or more, got {n_warmup_steps}")
        if interval_steps < 1:
            raise ValueError(f"interval_steps must be at least 1, got {interval_steps}")
        if not 0 <= percentile <= 100:
            raise ValueError(f"percentile must be from 0 to 100, got {percentile}")
        self._n_startup_trials = n_startup_trials
        self._n_warmup_steps = n_warmup_steps
        self._interval_steps = interval_steps
        self._percentile = percentile

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step < self._n_warmup_steps:
            return False
        if not self._checks_at(step, trial.intermediate_values):
            return False
        minimize = study.direction == StudyDirection.MINIMIZE
        own = [v for v in trial.intermediate_values.values() if not math.isnan(v)]
        if not own:
            return True  # only NaN so far: it diverged
        best = min(own) if minimize else max(own)
        others = [
            t.intermediate_values[step]
            for t in study.get_trials(deepcopy=False, states=_COMPARED)
            if t.number != trial.number
            and step in t.intermediate_values
            and math.isfinite(t.intermediate_values[step])
        ]
        if len(others) < self._n_startup_trials:
            return False
        cut = _percentile(others, self._percentile if minimize else 100 - self._percentile)
        return best > cut if minimize else best < cut

    def _checks_at(self, step: int, values: dict[int, float]) -> bool:
        """Whether `step` is the first reported step of its interval (counted from the warm-up),
        as Optuna's pruners decide it: reports need not fall on every step."""
        if self._interval_steps == 1:
            return True
        interval = (step - self._n_warmup_steps) // self._interval_steps
        earlier = [s for s in values if self._n_warmup_steps <= s < step]
        return (
            not earlier or (max(earlier) - self._n_warmup_steps) // self._interval_steps < interval
        )


def _percentile(values: list[float], q: float) -> float:
    """The q-th percentile, interpolated between the nearest ranks (numpy's default: the median
    of an even count is the mean of the middle two, as Optuna's pruners compute it)."""
    ranked = sorted(values)
    at = (len(ranked) - 1) * q / 100
    low = math.floor(at)
    high = min(low + 1, len(ranked) - 1)
    return ranked[low] + (ranked[high] - ranked[low]) * (at - low)
