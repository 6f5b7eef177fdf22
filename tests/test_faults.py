"""Faults injected for real, and the invariant after each: nothing lost. The study reaches its
target, no trial is left RUNNING, trial numbers are contiguous, every value is finite."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
from conftest import write_space
from optuna.trial import TrialState

from tuner.study import create_study, run_study


def assert_nothing_lost(study: optuna.Study, *, target: int) -> None:
    trials = study.get_trials()
    assert len(trials) == target
    assert [t.number for t in trials] == list(range(len(trials)))
    assert all(t.state.is_finished() for t in trials)
    assert all(math.isfinite(t.value) for t in trials if t.state == TrialState.COMPLETE)


def simulated(**fixed: object) -> dict:
    return {
        "params": {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}},
        "fixed": {"workload": "simulated", "steps": 4, "step_seconds": 0.1, **fixed},
        "pruner": "none",
    }


def test_a_hung_trial_is_killed_at_the_trial_timeout_and_the_run_goes_on(
    sqlite_url: str, tmp_path: Path
) -> None:
    space = {**simulated(hang_above_lr=0.05), "resources": {"trial_timeout": "3s"}}
    name = create_study(write_space(tmp_path / "hang.yaml", space), storage=sqlite_url)
    study = optuna.load_study(study_name=name, storage=sqlite_url)
    for lr in (0.08, 1e-3, 0.09, 2e-3):
        study.enqueue_trial({"learning_rate": lr})
    progress = run_study(name, storage=sqlite_url, n_trials=4, jobs=2)
    assert (progress.complete, progress.failed) == (2, 2)
    for hung in (study.trials[0], study.trials[2]):
        assert hung.state == TrialState.FAIL
        assert hung.user_attrs["fail_reason"] == "timed out after 3s (resources.trial_timeout)"
        assert hung.duration.total_seconds() < 20
    assert_nothing_lost(study, target=4)
