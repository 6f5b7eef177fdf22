"""The median rule that holds at parallelism (tuner/search/pruning.py):
what it compares a trial with, on
a real Optuna study whose trials run at once (ask, report, tell, as workers do)."""

from __future__ import annotations

import optuna
import pytest

from tuner.common.errors import SpaceError
from tuner.search import algorithms
from tuner.search.pruning import ReportedMedianPruner


def _running(study: optuna.Study, values: dict[int, float]) -> optuna.Trial:
    trial = study.ask()
    for step, value in values.items():
        trial.report(value, step)
    return trial


def test_trials_still_running_are_compared_with_each_other() -> None:
    """Four trials at once, none finished: Optuna's MedianPruner waits for finished trials and
    lets the worst run on; this one prunes it at the step the others reached."""
    for pruner, pruned in ((optuna.pruners.MedianPruner(n_startup_trials=3), False),
                           (ReportedMedianPruner(n_startup_trials=3), True)):  # fmt: skip
        study = optuna.create_study(pruner=pruner)
        for loss in (1.0, 1.1, 1.2):
            _running(study, {1: loss, 2: loss - 0.1})
        worst = _running(study, {1: 2.0})
        assert worst.should_prune() is pruned


def test_it_waits_for_n_startup_reports_at_the_step_and_counts_pruned_trials() -> None:
    study = optuna.create_study(pruner=ReportedMedianPruner(n_startup_trials=3))
    first = _running(study, {1: 1.0, 2: 0.9})
    study.tell(first, state=optuna.trial.TrialState.PRUNED)  # it reached step 2: it counts
    _running(study, {1: 1.1})
    late = _running(study, {1: 5.0, 2: 5.0})
    assert not late.should_prune()  # step 2: one other report so far
    _running(study, {1: 1.2, 2: 1.0})
    _running(study, {1: 1.3, 2: 1.1})
    assert late.should_prune()  # three others at step 2, all better
    good = _running(study, {1: 0.5, 2: 0.4})
    assert not good.should_prune()


def test_warm_up_interval_and_direction() -> None:
    study = optuna.create_study(
        direction="maximize",
        pruner=ReportedMedianPruner(n_startup_trials=1, n_warmup_steps=2, interval_steps=2),
    )
    _running(study, {s: 10.0 for s in range(1, 7)})
    low = _running(study, {1: 1.0})
    assert not low.should_prune()  # in the warm-up
    low.report(1.0, 2)
    assert low.should_prune()  # step 2: first of its interval, and lower when higher is better
    low2 = _running(study, {1: 1.0, 2: 20.0, 3: 1.0})
    assert not low2.should_prune()  # step 3 is inside the interval begun at 2


def test_a_space_names_it_with_the_median_pruners_options() -> None:
    pruner = algorithms.build_pruner({"name": "reported_median", "n_startup_trials": 4})
    assert isinstance(pruner, ReportedMedianPruner)
    with pytest.raises(SpaceError, match="n_warmup_step is not an option.*n_warmup_steps"):
        algorithms.build_pruner({"name": "reported_median", "n_warmup_step": 1})
    with pytest.raises(SpaceError, match="n_startup_trials must be at least 1"):
        algorithms.build_pruner({"name": "reported_median", "n_startup_trials": 0})
