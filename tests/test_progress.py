"""What a run is doing while it runs: each running trial's step, last value and ETA, read from the
store by the run's monitor (tuner.core.study) and shown by the CLI's bar (tuner.face.progress)."""

from __future__ import annotations

import copy
import io
import logging
import sys
from pathlib import Path

import optuna
import pytest
from conftest import write_space

from tuner.core.monitor import Progress, RunningTrial
from tuner.core.study import create_study, run_study
from tuner.face.progress import ProgressBar, duration, running_line


@pytest.mark.slow
def test_the_monitor_reports_a_running_trials_step_value_and_eta(
    sqlite_url: str, tmp_path: Path
) -> None:
    """A real run of the simulated workload (8 steps of 0.4 s, one evaluation a step), watched
    through `on_progress` as the CLI's bar is."""
    space = {
        "name": "live",
        "params": {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
        "fixed": {"workload": "simulated", "steps": 8, "step_seconds": 0.4},
        "pruner": "none",
    }
    name = create_study(write_space(tmp_path / "live.yaml", space), storage=sqlite_url)
    seen: list[Progress] = []
    progress = run_study(
        name, storage=sqlite_url, n_trials=1, on_progress=lambda p: seen.append(copy.copy(p)),
        poll_s=0.2,
    )  # fmt: skip
    assert progress.complete == 1

    running = [r for p in seen for r in p.running if r.step is not None]
    assert running, "no poll saw the trial running with a reported step"
    assert {r.number for r in running} == {0}
    assert all(r.max_steps == 8 and 1 <= r.step <= 8 for r in running)
    steps = [r.step for r in running]
    assert len(set(steps)) >= 2 and steps == sorted(steps)  # seen moving, never backwards
    trial = optuna.load_study(study_name=name, storage=sqlite_url).trials[0]
    assert all(r.value == trial.intermediate_values[r.step] for r in running)
    # The pace is 0.4 s a step: the ETA is of that order (loose: the machine may be busy).
    etas = [r.eta_s for r in running if r.eta_s is not None and r.step < 8]
    assert etas and all(0 <= eta <= 8 * 0.4 * 5 for eta in etas)
    assert seen[-1].running == [] and seen[-1].finished == 1  # nothing left running at the end


def _progress(*running: RunningTrial) -> Progress:
    return Progress(target=4, complete=1, best_value=2.5, best_trial=0, running=list(running))


def test_a_running_trial_reads_as_one_short_line() -> None:
    assert (
        running_line(RunningTrial(3, 40, 120, 2.3051, 80.4))
        == "trial 3: step 40/120, val loss 2.305, ETA 1m20s"
    )
    assert running_line(RunningTrial(5, 15, None, 3.1, None)) == "trial 5: step 15, val loss 3.1"
    assert running_line(RunningTrial(6, None, 60, None, None)) == (
        "trial 6: started, no evaluation yet"
    )
    assert [duration(s) for s in (0, 44.6, 80, 3599, 7500)] == [
        "0s",
        "45s",
        "1m20s",
        "59m59s",
        "2h05m",
    ]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_in_a_terminal_the_bar_shows_each_running_trial_under_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with ProgressBar() as bar:
        bar.update(
            _progress(RunningTrial(1, 30, 60, 2.75, 12.0), RunningTrial(2, None, 60, None, None))
        )
        bar.update(_progress(RunningTrial(1, 45, 60, 2.6, 6.0)))
    shown = terminal.getvalue()
    assert "1/4" in shown and "best 2.5" in shown
    assert "trial 1: step 30/60, val loss 2.75, ETA 12s" in shown
    assert "trial 2: started, no evaluation yet" in shown
    assert "trial 1: step 45/60, val loss 2.6, ETA 6s" in shown


def test_without_a_terminal_each_evaluation_is_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a pipe: tqdm draws nothing
    caplog.set_level(logging.INFO, logger="tuner.face.progress")
    with ProgressBar() as bar:
        for step in (None, 15, 15, 30, 30):  # polls: the same evaluation is seen again
            bar.update(_progress(RunningTrial(1, step, 60, None if step is None else 2.0, 9.0)))
    assert [r.getMessage() for r in caplog.records] == [
        "trial 1: step 15/60, val loss 2, ETA 9s",
        "trial 1: step 30/60, val loss 2, ETA 9s",
    ]
    assert sys.stderr.getvalue() == ""
