"""Faults injected for real, and the invariant after each: nothing lost. The study reaches its
target, no trial is left RUNNING, trial numbers are contiguous, every value is finite."""

from __future__ import annotations

import math
import subprocess
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from conftest import run_cli, small_space, write_space
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


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 32 KB filesystem: an adapter of the demo (76 KB and up) does not fit."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    assert made.returncode == 0, f"the disk-full test needs to mount a tmpfs: {made.stderr}"
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_while_the_adapter_is_stored_fails_the_trial_and_links_nothing(
    sqlite_url: str,
    demo_dir: Path,
    tmp_path: Path,
    small_disk: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Adapters go to the small disk; the tokenised data, kept beside them, does not.
    (tmp_path / "tokenized").mkdir()
    (small_disk / "tokenized").symlink_to(tmp_path / "tokenized")
    monkeypatch.setenv("TUNER_ARTIFACTS", str(small_disk))
    space = small_space(demo_dir, name="full", pruner="none", budget={"n_trials": 2})
    name = create_study(write_space(tmp_path / "full.yaml", space), storage=sqlite_url)
    progress = run_study(name, storage=sqlite_url)

    study = optuna.load_study(study_name=name, storage=sqlite_url)
    assert progress.failed == 2
    for trial in study.trials:
        assert trial.state == TrialState.FAIL
        assert trial.user_attrs["fail_reason"] == (
            f"AdapterNotStored: could not store the adapter in {small_disk}: "
            "No space left on device"
        )
        assert "adapter" not in trial.user_attrs
    # Nothing half-written: no partial file, and no complete file of a half-stored adapter.
    assert sorted(p.name for p in small_disk.iterdir()) == ["tokenized"]
    assert_nothing_lost(study, target=2)
    refused = run_cli(
        "study", "export", name, "--storage", sqlite_url, "--out", str(tmp_path / "x")
    )
    assert refused.returncode == 2 and "no completed trial" in refused.stderr
