"""The driver samples ahead for its workers (tuner/backends/feed.py): what it hands out is what
runs, its view of the study is the store's, and Optuna's own queue (baseline, warm starts,
retries) goes first."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from conftest import write_space
from optuna.trial import TrialState

from tuner.backends.base import RunPlan
from tuner.backends.feed import FED_ATTR, FedSampler, StudyView
from tuner.core.study import create_study, run_study
from tuner.store import open_study


def _space(**resources: object) -> dict:
    return {
        "params": {
            "learning_rate": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True},
            "lora_rank": {"type": "categorical", "choices": [4, 8, 16, 32, 64]},
            "lora_alpha": {"type": "multiple", "of": "lora_rank", "factors": [1, 2]},
        },
        "fixed": {"workload": "simulated", "steps": 4, "step_seconds": 0.05},
        "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 3},
        "pruner": {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 1},
        "resources": resources,
    }


def _objective(space: object, study: optuna.Study):
    """Reports a curve and may be pruned, as a trial does; the value follows the params."""

    def objective(trial: optuna.Trial) -> float:
        values = space.suggest(trial)
        loss = 4.0
        for step in range(1, 5):
            loss = 1 + abs(values["learning_rate"] - 1e-3) * 100 + step / values["lora_alpha"]
            trial.report(loss, step)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return loss

    return objective


def _fed_study(url: str, tmp_path: Path) -> tuple:
    """A study opened as a worker opens it: the stored space, the sampler wrapped."""
    name = create_study(write_space(tmp_path / "s.yaml", _space()), storage=url)
    opened = open_study(name, url)
    study = opened.study
    study.sampler = FedSampler(study.sampler)
    return name, study, opened.space, study.sampler


def test_an_enqueued_trial_keeps_its_params_and_the_fed_ones_run_next(
    sqlite_url: str, tmp_path: Path
) -> None:
    name, study, space, sampler = _fed_study(sqlite_url, tmp_path)
    study.enqueue_trial({"learning_rate": 1e-3, "lora_rank": 8, "lora_alpha/lora_rank": 2})
    fed = {"learning_rate": 0.02, "lora_rank": 32, "lora_alpha/lora_rank": 1}

    sampler.offer(fed)
    study.optimize(_objective(space, study), n_trials=1)
    assert study.trials[0].params == {
        "learning_rate": 1e-3,
        "lora_rank": 8,
        "lora_alpha/lora_rank": 2,
    }
    assert not sampler.wants()  # the fed values wait for a trial that samples

    study.optimize(_objective(space, study), n_trials=1)
    assert study.trials[1].params == fed
    assert study.trials[1].system_attrs[FED_ATTR] is True
    assert sampler.wants()

    study.optimize(_objective(space, study), n_trials=1)  # nothing fed: TPE samples
    assert FED_ATTR not in study.trials[2].system_attrs
    assert study.trials[2].params != fed


def test_the_drivers_view_is_the_store_and_nothing_it_handed_out_stays_pending(
    sqlite_url: str, tmp_path: Path
) -> None:
    name, study, space, sampler = _fed_study(sqlite_url, tmp_path)
    view = StudyView(RunPlan(name, sqlite_url, None, None, 1))
    for i in range(8):
        view.sync()
        if i % 3 != 2:  # every third trial samples in the worker, as when the feed is behind
            sampler.offer(view.suggest())
        study.optimize(_objective(space, study), n_trials=1)
    view.sync()

    def seen(trials: list) -> list[str]:
        return sorted(str((t.params, t.state, t.values, t.intermediate_values)) for t in trials)

    stored = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert {TrialState.COMPLETE, TrialState.PRUNED} <= {t.state for t in stored}
    assert sum(FED_ATTR in t.system_attrs for t in stored) == 6
    mirrored = view.view.get_trials()
    assert all(t.state.is_finished() for t in mirrored)  # every suggestion ran and came back
    assert seen(mirrored) == seen(stored)


@pytest.mark.parametrize(("lookahead", "fed"), [(None, True), (0, False)])
@pytest.mark.slow
def test_a_local_sweep_is_fed_by_its_driver_unless_lookahead_is_0(
    sqlite_url: str, tmp_path: Path, lookahead: int | None, fed: bool
) -> None:
    space = _space(**({} if lookahead is None else {"lookahead": lookahead}))
    name = create_study(write_space(tmp_path / "s.yaml", space), storage=sqlite_url)
    progress = run_study(name, storage=sqlite_url, n_trials=8, jobs=2)
    assert progress.finished == 8
    trials = optuna.load_study(study_name=name, storage=sqlite_url).trials
    assert len(trials) == 8 and all(t.state.is_finished() for t in trials)
    n_fed = sum(FED_ATTR in t.system_attrs for t in trials)
    assert (n_fed >= 6) if fed else (n_fed == 0)


# --- issue 22: i22-concurrent ---


def test_the_drivers_view_holds_the_trials_another_run_is_training(
    sqlite_url: str, tmp_path: Path
) -> None:
    """Another run's trial in training is in the view as RUNNING, so the sampler steers away
    from it (TPE's constant liar); this run's own suggestion is there once; both come back."""
    name, study, space, sampler = _fed_study(sqlite_url, tmp_path)
    view = StudyView(RunPlan(name, sqlite_url, None, None, 1, run="mine"))

    def training(run: str) -> optuna.Trial:
        """A trial as a worker leaves it while it trains: its run, its params, its hparams."""
        trial = study.ask()
        trial.set_user_attr("run", run)
        trial.set_user_attr("hparams", space.suggest(trial))
        return trial

    theirs = training("theirs")
    view.sync()
    running = view.view.get_trials(states=(TrialState.RUNNING,))
    assert [t.params for t in running] == [theirs.params]

    sampler.offer(view.suggest())
    mine = training("mine")
    assert mine.params != theirs.params
    view.sync()
    assert len(view.view.get_trials(states=(TrialState.RUNNING,))) == 2  # not 3

    study.tell(theirs, 1.5)
    study.tell(mine, 2.0)
    view.sync()

    def seen(trials: list) -> list[str]:
        return sorted(str((t.params, t.state, t.values)) for t in trials)

    assert seen(view.view.get_trials()) == seen(study.get_trials())
