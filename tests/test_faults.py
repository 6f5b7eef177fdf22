"""Faults injected for real, and the invariant after each: nothing lost. The study reaches its
target, no trial is left RUNNING, trial numbers are contiguous, every value is finite."""

from __future__ import annotations

import math
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
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


def _restart_postgres(*, when: Callable[[], bool], down_s: float, times: dict) -> threading.Thread:
    """Stop the server (fast: it drops every connection) once `when()` holds, start it `down_s`
    later, noting when in `times`. The caller joins the thread; the server is started again
    whatever happens."""
    version = os.listdir("/etc/postgresql")[0]
    ctl = ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main"]

    def cycle() -> None:
        deadline = time.monotonic() + 120
        while not when() and time.monotonic() < deadline:
            time.sleep(0.2)
        try:
            subprocess.run([*ctl, "stop", "-m", "fast"], check=True, capture_output=True)
            times["down"] = time.monotonic()
            time.sleep(down_s)
        finally:
            subprocess.run([*ctl, "start"], check=True, capture_output=True)
            times["up"] = time.monotonic()

    thread = threading.Thread(target=cycle, daemon=True)
    thread.start()
    return thread


def _training(url: str, name: str, n: int) -> Callable[[], bool]:
    """Whether `n` trials of the study are RUNNING and have reported a value."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    engine = sqlalchemy.create_engine(url, poolclass=NullPool)

    def check() -> bool:
        with engine.connect() as db:
            return (
                db.execute(
                    sqlalchemy.text(
                        "select count(distinct t.trial_id) from trials t join "
                        "trial_intermediate_values v on v.trial_id = t.trial_id "
                        "where t.state = 'RUNNING'"
                    )
                ).scalar()
                >= n
            )

    return check


@pytest.mark.parametrize(
    ("down_s", "grace_s"), [(1, 20), (8, 3)], ids=["shorter-than-grace", "longer-than-grace"]
)
def test_a_postgresql_restart_during_a_sweep_loses_nothing(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, down_s: float, grace_s: float
) -> None:
    """The server goes away while both workers train. Shorter than the heartbeat grace period:
    the workers wait for it, and nothing fails. Longer: the running trials are stale for every
    process (their heartbeats stop once they could not be recorded for the grace period), so
    the driver's heartbeat check fails them when the server is back, while they still have many
    steps to go; each is retried with the same params, and the run still finishes its target."""
    monkeypatch.setenv("TUNER_HEARTBEAT_INTERVAL", "1")
    monkeypatch.setenv("TUNER_GRACE_PERIOD", str(grace_s))
    monkeypatch.setenv("TUNER_ARTIFACTS", str(tmp_path / "artifacts"))
    steps = 10 if down_s < grace_s else 40  # the longer case: 20 s of steps left at least
    space = {**simulated(), "fixed": {"workload": "simulated", "steps": steps, "step_seconds": 0.5}}
    name = create_study(write_space(tmp_path / "restart.yaml", space), storage=pg_url)
    times: dict[str, float] = {}
    restart = _restart_postgres(when=_training(pg_url, name, 2), down_s=down_s, times=times)
    progress = run_study(name, storage=pg_url, n_trials=2, jobs=2)
    finished = time.monotonic()
    restart.join()
    assert times["down"] < times["up"] < finished  # it went and came back while trials ran

    study = optuna.load_study(study_name=name, storage=pg_url)
    trials = study.get_trials()
    assert [t.number for t in trials] == list(range(len(trials)))
    assert all(t.state.is_finished() for t in trials)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(done) == progress.complete == 2
    failed = [t for t in trials if t.state == TrialState.FAIL]
    if down_s < grace_s:
        assert failed == []  # the workers waited for the server; no trial was lost
        return
    assert len(failed) == 2, [(t.number, t.state, t.user_attrs) for t in trials]
    for t in failed:
        (retry,) = [r for r in trials if r.system_attrs.get("failed_trial") == t.number]
        assert retry.params == t.params and retry.state == TrialState.COMPLETE


def test_a_connection_killed_in_the_middle_of_a_tell_costs_nothing(
    pg_url: str, tmp_path: Path
) -> None:
    """The moment is made exact: a second session holds trial 1's row (FOR NO KEY UPDATE lets
    its reports and heartbeats through), so its worker's tell waits inside its transaction,
    and that backend is terminated there. The tell is made again on a new connection."""
    import sqlalchemy

    space = {**simulated(), "fixed": {"workload": "simulated", "steps": 6, "step_seconds": 0.3}}
    name = create_study(write_space(tmp_path / "tell.yaml", space), storage=pg_url)
    result: dict = {}
    run = threading.Thread(
        target=lambda: result.update(progress=run_study(name, storage=pg_url, n_trials=4, jobs=2))
    )
    run.start()

    engine = sqlalchemy.create_engine(pg_url)
    database = pg_url.rsplit("/", 1)[1]
    killed = 0
    with engine.connect() as holder, engine.connect() as admin:
        admin.execution_options(isolation_level="AUTOCOMMIT")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            row = admin.execute(
                sqlalchemy.text("select trial_id, state from trials where number = 1")
            ).first()
            if row is not None and row.state == "RUNNING":
                break
            time.sleep(0.05)
        holder.execute(
            sqlalchemy.text("select 1 from trials where trial_id = :t for no key update"),
            {"t": row.trial_id},
        )
        while time.monotonic() < deadline and not killed:
            killed = admin.execute(
                sqlalchemy.text(
                    "select count(pg_terminate_backend(pid)) from pg_stat_activity "
                    "where datname = :d and wait_event_type = 'Lock' and query ilike '%for update%'"
                ),
                {"d": database},
            ).scalar()
            time.sleep(0.05)
        holder.rollback()  # lets the retried tell through
    engine.dispose()
    run.join(timeout=120)

    assert killed == 1
    study = optuna.load_study(study_name=name, storage=pg_url)
    assert_nothing_lost(study, target=4)
    assert result["progress"].complete == 4
    assert study.trials[1].state == TrialState.COMPLETE
