"""Faults injected for real, and the invariant after each: nothing lost. The study reaches its
target, no trial is left RUNNING, trial numbers are contiguous, every value is finite."""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import pytest
from conftest import mounted_tmpfs, run_cli, small_space, write_space
from optuna.trial import TrialState

from tuner.core.study import create_study, run_study


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


@pytest.mark.slow
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
    with mounted_tmpfs(tmp_path / "small-disk", "size=32k") as mount:
        yield mount


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


@pytest.mark.restarts_postgres
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


# --- issue 22: i22-concurrent ---


def _key(trial: optuna.trial.FrozenTrial) -> tuple:
    return tuple(sorted(trial.params.items()))


def _start_run(name: str, url: str, *args: str) -> subprocess.Popen:
    """`tuner study run NAME --json ...` as its own process, as a second terminal or a cron job
    on another machine starts it (Ctrl-C reaches it as from a terminal)."""
    from conftest import TUNER, as_from_a_terminal

    command = [*TUNER, "study", "run", name, "--storage", url, "--json", *args]
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=as_from_a_terminal,
    )


def _summaries(runs: list[subprocess.Popen], timeout: float = 300) -> list[dict]:
    """Each run's JSON summary, in the order they ended (the last to end last)."""
    import json

    ended: list[tuple[float, dict]] = []
    for run in runs:
        out, err = run.communicate(timeout=timeout)
        assert run.returncode == 0, err[-3000:]
        ended.append((time.monotonic(), json.loads(out.splitlines()[-1])))
    return [summary for _, summary in sorted(ended, key=lambda e: e[0])]


def _concurrent_space(**sampler: object) -> dict:
    # Two params, one continuous: two runs that draw alike give equal pairs, which the test
    # would see; runs that draw apart never do (a float repeats with probability 0).
    return {
        "params": {
            "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
            "lora_rank": {"type": "categorical", "choices": [4, 8, 16]},
        },
        "fixed": {"workload": "simulated", "steps": 4, "step_seconds": 0.3},
        "pruner": "none",
        "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 3, **sampler},
    }


def _assert_cooperated(study: optuna.Study, summaries: list[dict], counts: list[int]) -> None:
    trials = study.get_trials()
    assert len(trials) == sum(counts), [(t.number, t.state) for t in trials]
    assert all(t.state.is_finished() for t in trials)
    keys = [_key(t) for t in trials]
    assert len(set(keys)) == len(keys), f"a suggestion ran twice: {sorted(keys)}"
    assert sorted(s["finished"] for s in summaries) == sorted(counts)
    # Each run counts its own trials (those that carry its run id), not the other run's.
    by_run = {s["run"]: s for s in summaries}
    assert len(by_run) == len(summaries)
    for run, summary in by_run.items():
        own = [t for t in trials if t.user_attrs.get("run") == run]
        assert summary["finished"] == len(own), summary
        assert summary["complete"] == sum(t.state == TrialState.COMPLETE for t in own)
        assert 0 <= summary["others_finished"] <= len(trials) - len(own)


def test_two_runs_of_one_study_started_at_once_never_train_the_same_params(
    pg_url: str, tmp_path: Path
) -> None:
    """Two `tuner study run NAME --n-trials 4` at once (two terminals, two cron machines): before,
    both drew the same seeded stream and trained 4 identical pairs, and each said `8 trials
    finished`. Now every params set is distinct, the total is exact, and each run reports its own
    4 trials and how many of the other's finished meanwhile. (SQLite: the tests below.)"""
    url = pg_url
    name = create_study(write_space(tmp_path / "both.yaml", _concurrent_space()), storage=url)
    runs = [_start_run(name, url, "--n-trials", "4", "--jobs", "2") for _ in range(2)]
    summaries = _summaries(runs)

    study = optuna.load_study(study_name=name, storage=url)
    _assert_cooperated(study, summaries, [4, 4])
    # The run that ended last saw the other's trials end while it ran.
    assert summaries[-1]["others_finished"] >= 1


def test_a_run_alone_seeds_as_before_and_a_run_beside_it_draws_apart(
    storage_url: str,
) -> None:
    """The first run of a study at a time seeds as a run alone always did (a seeded run on its
    own draws what it drew before); a run beside it gets a random offset (tuner.store._runs)."""
    from tuner.store._runs import start_run

    with (
        start_run(storage_url, "s") as first,
        start_run(storage_url, "s") as second,
        start_run(storage_url, "other") as other,
    ):
        assert (first.seed_offset, other.seed_offset) == (0, 0)
        assert second.seed_offset != 0 and len({first.id, second.id, other.id}) == 3
    with start_run(storage_url, "s") as again:
        assert again.seed_offset == 0


def test_runs_of_different_sizes_at_once_each_run_and_count_their_own(
    pg_url: str, tmp_path: Path
) -> None:
    """`--n-trials 3 --jobs 1` and `--n-trials 5 --jobs 3` at once: --n-trials is each run's
    own count, whatever the other does. Before, both printed 8 and drew alike."""
    name = create_study(write_space(tmp_path / "sizes.yaml", _concurrent_space()), storage=pg_url)
    runs = [
        _start_run(name, pg_url, "--n-trials", "3", "--jobs", "1"),
        _start_run(name, pg_url, "--n-trials", "5", "--jobs", "3"),
    ]
    summaries = _summaries(runs)
    _assert_cooperated(optuna.load_study(study_name=name, storage=pg_url), summaries, [3, 5])


def _wait_for(study_name: str, url: str, ready: Callable[[list], bool], timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        trials = optuna.load_study(study_name=study_name, storage=url).get_trials()
        if ready(trials):
            return trials
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for the study: {trials}")


def test_a_second_run_started_while_the_first_is_still_running_counts_its_own(
    pg_url: str, tmp_path: Path
) -> None:
    """A rerun typed while the first run's last trials still train: before, its summary counted
    the first run's trials as its own (and the first run's summary the rerun's)."""
    space = {**_concurrent_space(), "fixed": {"workload": "simulated", "steps": 8}}
    name = create_study(write_space(tmp_path / "rerun.yaml", space), storage=pg_url)
    first = _start_run(name, pg_url, "--n-trials", "10", "--jobs", "2")
    _wait_for(name, pg_url, lambda ts: sum(t.state.is_finished() for t in ts) >= 2)
    second = _start_run(name, pg_url, "--n-trials", "2", "--jobs", "1")
    summaries = _summaries([first, second])

    _assert_cooperated(optuna.load_study(study_name=name, storage=pg_url), summaries, [10, 2])
    (rerun,) = [s for s in summaries if s["finished"] == 2]
    assert rerun["others_finished"] >= 1  # the first run's trials ended while it ran


@pytest.mark.slow
def test_enqueued_trials_are_taken_once_by_two_runs_at_once(
    sqlite_url: str, tmp_path: Path
) -> None:
    """Trials waiting in Optuna's queue (a baseline, a warm start, `enqueue_trial`) and two runs
    at once on SQLite: each queued trial runs once, and the sampled ones differ from them all."""
    name = create_study(write_space(tmp_path / "q.yaml", _concurrent_space()), storage=sqlite_url)
    study = optuna.load_study(study_name=name, storage=sqlite_url)
    queued = [(1e-3, 4), (2e-3, 8), (5e-3, 16), (1e-2, 4)]
    for lr, rank in queued:
        study.enqueue_trial({"learning_rate": lr, "lora_rank": rank})
    runs = [_start_run(name, sqlite_url, "--n-trials", "3", "--jobs", "2") for _ in range(2)]
    summaries = _summaries(runs)

    study = optuna.load_study(study_name=name, storage=sqlite_url)
    _assert_cooperated(study, summaries, [3, 3])
    ran = sorted((t.params["learning_rate"], t.params["lora_rank"]) for t in study.trials)
    assert [p for p in ran if p in queued] == sorted(queued)


@pytest.mark.slow
def test_ctrl_c_of_one_run_stops_its_own_trials_only(sqlite_url: str, tmp_path: Path) -> None:
    """Two terminals run one study and the user presses Ctrl-C in one: its trials end FAIL
    "interrupted"; the other run's trials go on and finish, and its summary counts its own (before,
    it counted the interrupted run's failures as its own)."""
    import signal

    space = {**_concurrent_space(), "fixed": {"workload": "simulated", "steps": 10}}
    name = create_study(write_space(tmp_path / "c.yaml", space), storage=sqlite_url)
    stopped = _start_run(name, sqlite_url, "--n-trials", "10", "--jobs", "2")
    kept = _start_run(name, sqlite_url, "--n-trials", "4", "--jobs", "2")
    # Both runs have a trial training: 3 trials report steps, and a run trains 2 at a time.
    _wait_for(
        name,
        sqlite_url,
        lambda ts: sum(bool(t.last_step) and not t.state.is_finished() for t in ts) >= 3,
    )
    stopped.send_signal(signal.SIGINT)
    _, err = stopped.communicate(timeout=180)
    assert stopped.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]  # workers printed Optuna's, one per trial
    (summary,) = _summaries([kept])

    study = optuna.load_study(study_name=name, storage=sqlite_url)
    trials = study.get_trials()
    assert all(t.state.is_finished() for t in trials)
    assert summary["finished"] == 4 and summary["complete"] == 4
    own = [t for t in trials if t.user_attrs.get("run") == summary["run"]]
    assert [t.state for t in own] == [TrialState.COMPLETE] * 4
    others = [t for t in trials if t not in own]
    assert summary["others_finished"] >= 1
    assert {t.user_attrs.get("fail_reason") for t in others if t.state == TrialState.FAIL} <= {
        "interrupted (Ctrl-C or a stop signal)"
    }
    keys = [_key(t) for t in trials]
    assert len(set(keys)) == len(keys)


# --- issue 22: i22-delete ---


def _rows(url: str, table: str) -> int:
    """Rows left in one of Optuna's tables, whatever study they belonged to."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    engine = sqlalchemy.create_engine(url, poolclass=NullPool)
    with engine.connect() as db:
        return db.execute(sqlalchemy.text(f"select count(*) from {table}")).scalar()


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


@contextlib.contextmanager
def _study_run(name: str, url: str, cwd: Path) -> Iterator[subprocess.Popen]:
    """`tuner study run NAME --jobs 2` in the background, as a user starts it in a terminal;
    killed at the end if the test left it running."""
    from conftest import TUNER

    run = subprocess.Popen(
        [*TUNER, "study", "run", name, "--storage", url, "--jobs", "2"],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield run
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()


def _wait_until(check: Callable[[], bool], *, timeout: float = 120, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_delete_during_a_run_is_refused_and_with_force_stops_the_run_and_leaves_nothing(
    storage_url: str, tmp_path: Path
) -> None:
    """`study delete` while two workers train: refused, naming the running trials, and the
    study is untouched. With --force the trials stop at their next report, the run ends with one
    line and no traceback, and the study (rows, trials, heartbeats) and its report are gone
    before "deleted" is printed. Before: "deleted" with the study still there (PostgreSQL), or
    gone with the run dying in tracebacks (SQLite)."""
    import re

    from tuner.face.report import write_report

    artifacts = tmp_path / "artifacts"
    # Trials of 10 s on two workers: some trial runs whenever a delete arrives.
    space = {**simulated(steps=100, step_seconds=0.1), "budget": {"n_trials": 100}}
    name = create_study(
        write_space(tmp_path / "busy.yaml", space), storage=storage_url, artifacts=str(artifacts)
    )
    with _study_run(name, storage_url, tmp_path) as run:
        study = optuna.load_study(study_name=name, storage=storage_url)

        def states() -> list[TrialState]:
            return [t.state for t in study.get_trials(deepcopy=False)]

        _wait_until(lambda: states().count(TrialState.COMPLETE) >= 1, what="a finished trial")
        write_report(name, out=tmp_path / "report.html", storage=storage_url)  # attached
        assert len(_files(artifacts)) == 1

        refused = run_cli("study", "delete", name, "--storage", storage_url, "--yes")
        assert refused.returncode == 2, refused.stderr
        (line,) = refused.stderr.splitlines()
        assert line.startswith(f"error: study {name!r} is running: trial ")
        assert "pid " in line and "--force" in line
        named = {int(n) for n in re.findall(r"trial (\d+) \(", line)}
        assert named and named <= {t.number for t in study.get_trials()}
        assert "deleting" not in study.user_attrs and len(_files(artifacts)) == 1
        assert run.poll() is None  # the run goes on

        _wait_until(lambda: TrialState.RUNNING in states(), what="a running trial")
        forced = run_cli("study", "delete", name, "--storage", storage_url, "--yes", "--force")
        assert forced.returncode == 0, forced.stderr
        assert forced.stdout == f"deleted study {name} (1 artifact files)\n"
        assert "Traceback" not in forced.stderr
        out, err = run.communicate(timeout=120)
    assert run.returncode == 1, err
    assert "Traceback" not in err and "Exception" not in err, err
    assert err.splitlines()[-1].startswith(f"error: study {name!r} was deleted while this run ran")
    # The trials that were running stopped, and said why, where the run saw them end before
    # their rows went (its monitor looks once a second: it may not have).
    fails = [line for line in err.splitlines() if " fail" in line]
    assert all("fail: study deleted" in line for line in fails), fails
    assert out == ""
    assert optuna.get_all_study_names(storage_url) == []
    for table in ("studies", "trials", "trial_heartbeats", "trial_intermediate_values"):
        assert _rows(storage_url, table) == 0, table
    assert _files(artifacts) == []


def test_a_delete_that_meets_a_concurrent_write_tries_again_and_says_deleted_only_when_gone(
    pg_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The moment is made exact: a second session inserts a trial into the study and holds
    its transaction open, so the delete waits on it, and meets the new row when it commits.
    Optuna's delete rolls back and returns as if it had deleted; tuner's looks again, and tries
    again. Before: "deleted" and the study still there, with its trial."""
    import sqlalchemy

    from tuner.core.study import delete_study

    space = {**simulated(), "budget": {"n_trials": 2}}
    name = create_study(
        write_space(tmp_path / "race.yaml", space), storage=pg_url, artifacts=str(tmp_path / "a")
    )
    engine = sqlalchemy.create_engine(pg_url)
    result: dict = {}
    with engine.connect() as writer:
        sid = writer.execute(sqlalchemy.text("select study_id from studies")).scalar()
        writer.execute(
            sqlalchemy.text(
                "insert into trials (number, study_id, state, datetime_start) "
                "values (0, :s, 'WAITING', now())"
            ),
            {"s": sid},
        )
        deleting = threading.Thread(
            target=lambda: result.update(removed=delete_study(name, storage=pg_url))
        )
        with caplog.at_level("INFO", logger="tuner.store._deletion"):
            deleting.start()
            time.sleep(3)  # the delete is waiting for the writer's lock
            assert deleting.is_alive()
            writer.commit()
            deleting.join(timeout=60)
    engine.dispose()
    assert result.get("removed") == 0
    assert optuna.get_all_study_names(pg_url) == []
    assert _rows(pg_url, "trials") == 0
    assert "still there" in caplog.text  # the first delete was rolled back, and seen to be


def test_a_study_deleted_as_its_run_starts_ends_the_run_in_one_line(
    sqlite_url: str, tmp_path: Path
) -> None:
    """A hurried user: `study run` in one terminal, `study delete` in another before the first
    trial began (nothing runs, so nothing refuses it). The workers then start on a study that is
    gone. Before: tracebacks from every worker and the driver, exit 1. Now the run ends with one
    line, and nothing of the study is left."""
    from tuner.core.study import delete_study

    space = {**simulated(), "budget": {"n_trials": 4}}
    artifacts = tmp_path / "artifacts"
    name = create_study(
        write_space(tmp_path / "early.yaml", space), storage=sqlite_url, artifacts=str(artifacts)
    )
    with _study_run(name, sqlite_url, tmp_path) as run:
        first = run.stderr.readline()  # "budget: ...": the driver is starting its workers
        assert "budget: 0 of 4 trials done" in first, first
        assert optuna.load_study(study_name=name, storage=sqlite_url).get_trials() == []
        delete_study(name, storage=sqlite_url)
        out, err = run.communicate(timeout=120)
    assert run.returncode == 1, err
    assert "Traceback" not in err and "died" not in err, err
    assert err.splitlines()[-1].startswith(f"error: study {name!r} was deleted while this run ran")
    assert optuna.get_all_study_names(sqlite_url) == []
    assert _rows(sqlite_url, "trials") == 0


@pytest.mark.slow
def test_two_deletes_of_one_study_at_once_each_end_in_one_line(
    storage_url: str, tmp_path: Path
) -> None:
    """A double click, or two terminals: four deletes of one study at once. Before: those that
    lost the race ended in KeyError tracebacks. Now each says "deleted" or one line that it
    was deleted meanwhile, and the study is gone."""
    from tuner.common.errors import TunerError
    from tuner.core.study import delete_study

    space = {**simulated(), "budget": {"n_trials": 2}}
    name = create_study(
        write_space(tmp_path / "twice.yaml", space), storage=storage_url, artifacts=str(tmp_path)
    )
    run_study(name, storage=storage_url)
    barrier = threading.Barrier(4)
    outcomes: list[object] = []

    def delete() -> None:
        barrier.wait()
        try:
            outcomes.append(delete_study(name, storage=storage_url))
        except TunerError as e:
            outcomes.append(e)
        except Exception as e:  # noqa: BLE001 - what the test looks for
            outcomes.append(("crashed", repr(e)))

    threads = [threading.Thread(target=delete) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(outcomes) == 4
    assert not [o for o in outcomes if isinstance(o, tuple)], outcomes
    assert any(isinstance(o, int) for o in outcomes)
    for refused in (o for o in outcomes if isinstance(o, TunerError)):
        assert str(refused).startswith(f"no study {name!r}") and "\n" not in str(refused)
    assert optuna.get_all_study_names(storage_url) == []


def test_a_delete_cut_short_leaves_a_study_runs_refuse_until_a_delete_finishes_it(
    sqlite_url: str, tmp_path: Path
) -> None:
    """A `study delete --force` stopped (Ctrl-C, a lost terminal) after it marked the study and
    before its rows went. Optuna cannot take a study attr back, so the mark stays: a run refuses
    the study in one line saying how to finish, and a delete finishes it."""
    from tuner.common.errors import StorageError
    from tuner.core.study import delete_study
    from tuner.store import deletion, open_study
    from tuner.store._optuna_private import study_id

    name = create_study(write_space(tmp_path / "cut.yaml", simulated()), storage=sqlite_url)
    opened = open_study(name, sqlite_url)
    deletion.mark(opened.store, study_id(opened.study))
    with pytest.raises(StorageError) as refused:
        run_study(name, storage=sqlite_url, n_trials=1)
    assert f"study {name!r} is being deleted (on " in str(refused.value)
    assert f"`tuner study delete {name} --force` finishes it" in str(refused.value)
    assert opened.study.get_trials() == []  # nothing ran
    delete_study(name, storage=sqlite_url)
    assert optuna.get_all_study_names(sqlite_url) == []


# --- issue 22: a run's lifecycle ---


def _alive(pid: int) -> bool:
    from tuner.store._recovery import _alive

    return _alive(pid)


@pytest.mark.slow
def test_a_process_group_kill_takes_the_workers_along_and_a_rerun_ends_at_the_budget(
    sqlite_url: str, tmp_path: Path
) -> None:
    """`kill -9 -PGID` of a run (job control, a scheduler): the workers, in their own process
    group, used to train on and finish their trials, and a rerun ended at 10 trials for a budget
    of 8. Now each worker sees its driver gone, fails its trial as such (retried) and exits; the
    rerun started at once waits for them and ends with exactly the budget."""
    import signal

    from conftest import TUNER

    from tuner.store._recovery import DRIVER_DIED

    space = {**simulated(), "fixed": {"workload": "simulated", "steps": 40, "step_seconds": 0.2}}
    space["budget"] = {"n_trials": 5}
    name = create_study(write_space(tmp_path / "pg.yaml", space), storage=sqlite_url)
    run = subprocess.Popen(
        [*TUNER, "study", "run", name, "--storage", sqlite_url, "--jobs", "2"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a process group of its own, as a job's
    )
    try:
        trials = _wait_for(
            name, sqlite_url, lambda ts: sum(bool(t.intermediate_values) for t in ts) >= 2
        )
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    workers = {t.user_attrs["worker_pid"] for t in trials if "worker_pid" in t.user_attrs}
    assert len(workers) == 2

    rerun = run_cli("study", "run", name, "--storage", sqlite_url, "--jobs", "2", "--json")
    assert rerun.returncode == 0, rerun.stderr
    assert not any(_alive(pid) for pid in workers), "a worker outlived its driver"

    study = optuna.load_study(study_name=name, storage=sqlite_url)
    trials = study.get_trials()
    orphaned = [t for t in trials if t.user_attrs.get("fail_reason") == DRIVER_DIED]
    assert len(orphaned) == 2 and all(t.state == TrialState.FAIL for t in orphaned)
    retried = {t.system_attrs.get("failed_trial") for t in trials}
    assert {t.number for t in orphaned} <= retried
    counted = [t for t in trials if t.state.is_finished() and t.number not in retried]
    assert len(counted) == 5 and all(t.state == TrialState.COMPLETE for t in counted)
    assert not [t for t in trials if t.state == TrialState.RUNNING]


@pytest.mark.slow
def test_a_full_disk_under_the_sqlite_store_is_one_line_and_leaves_nothing_running(
    tmp_path: Path,
) -> None:
    """The store's disk fills during a run: before, 14 tracebacks, and after space was freed a
    trial stayed RUNNING for good. Now `study run` (exit 1) and `study create` (exit 2) each say
    it in one line; once there is room, the next run fails and retries what was cut short."""
    with mounted_tmpfs(tmp_path / "disk", "size=8m") as disk:
        url = f"sqlite:///{disk / 'tuner.db'}"
        space = {**simulated(), "fixed": {"workload": "simulated", "steps": 30}}
        name = create_study(write_space(tmp_path / "s.yaml", space), storage=url)
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "filler").write_bytes(bytes(free - 150_000))

        full = f"error: the study store {url} is out of disk space; free some there, then run again"
        ran = run_cli("study", "run", name, "--storage", url, "--n-trials", "500", "--jobs", "2")
        assert (ran.returncode, ran.stderr.splitlines()[-1]) == (1, full), ran.stderr[-3000:]
        assert "Traceback" not in ran.stderr, ran.stderr[-3000:]
        other = write_space(tmp_path / "other.yaml", space)
        made = run_cli("study", "create", "--space", str(other), "--name", "t2", "--storage", url)
        assert (made.returncode, made.stderr) == (2, full + "\n")

        (disk / "filler").unlink()
        again = run_cli("study", "run", name, "--storage", url, "--n-trials", "2", "--json")
        assert again.returncode == 0, again.stderr[-3000:]
        trials = optuna.load_study(study_name=name, storage=url).get_trials()
        assert trials and not [t.number for t in trials if t.state == TrialState.RUNNING]


def test_a_trial_that_recorded_no_worker_is_failed_and_retried_after_the_grace_period(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process that died between making a trial RUNNING and writing its pid or first heartbeat
    (a full disk, a kill at that instant) left a trial no check could find: RUNNING for good.
    Past the heartbeat grace period, the next run fails it as such and retries it."""
    from tuner.store._recovery import UNMARKED

    monkeypatch.setenv("TUNER_HEARTBEAT_INTERVAL", "1")
    monkeypatch.setenv("TUNER_GRACE_PERIOD", "2")
    name = create_study(write_space(tmp_path / "u.yaml", simulated()), storage=sqlite_url)
    study = optuna.load_study(study_name=name, storage=sqlite_url)
    lr = optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)
    stuck = study.ask({"learning_rate": lr})  # RUNNING, with no pid and no heartbeat
    time.sleep(2.5)

    progress = run_study(name, storage=sqlite_url, n_trials=2)
    assert progress.complete == 2
    trials = optuna.load_study(study_name=name, storage=sqlite_url).get_trials()
    assert trials[stuck.number].state == TrialState.FAIL
    assert trials[stuck.number].user_attrs["fail_reason"] == UNMARKED
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == stuck.number]
    assert retry.state == TrialState.COMPLETE
    assert retry.params == trials[stuck.number].params


@pytest.mark.slow
def test_a_frozen_worker_is_killed_once_its_trial_went_stale_and_the_run_ends(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`kill -STOP` of a worker (a debugger, a wedged driver call): its heartbeat stopped, its
    trial was failed as stale and retried, and the run waited for the slot forever. Now the
    slot is killed and the run finishes its count with the retry.

    The worst moment is made exact: the worker is stopped inside a write, holding SQLite's
    lock, which every other process waits on, the driver's reads included (CI, 2026-12-07: the
    run hung on a loaded machine, where writes last long enough to be stopped in)."""
    import signal
    import sqlite3

    monkeypatch.setenv("TUNER_HEARTBEAT_INTERVAL", "1")
    monkeypatch.setenv("TUNER_GRACE_PERIOD", "4")
    space = {**simulated(), "fixed": {"workload": "simulated", "steps": 40, "step_seconds": 0.2}}
    name = create_study(write_space(tmp_path / "f.yaml", space), storage=sqlite_url)
    run = _start_run(name, sqlite_url, "--n-trials", "3")
    trials = _wait_for(name, sqlite_url, lambda ts: any(t.intermediate_values for t in ts))
    (frozen,) = [t.user_attrs["worker_pid"] for t in trials if t.state == TrialState.RUNNING]
    db = sqlite_url.removeprefix("sqlite:///")
    deadline = time.monotonic() + 60
    while True:  # stop it until it is stopped holding the lock (a report every 0.2 s)
        assert time.monotonic() < deadline, "the worker was never caught inside a write"
        os.kill(frozen, signal.SIGSTOP)
        probe = sqlite3.connect(db, timeout=0.05, isolation_level=None)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.execute("ROLLBACK")
        except sqlite3.OperationalError:
            break  # "database is locked": by the stopped worker
        finally:
            probe.close()
        os.kill(frozen, signal.SIGCONT)
        time.sleep(0.01)
    try:
        (summary,) = _summaries([run], timeout=180)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(frozen, signal.SIGKILL)  # ours: the test stopped it
    assert not _alive(frozen)
    trials = optuna.load_study(study_name=name, storage=sqlite_url).get_trials()
    (stale,) = [t for t in trials if t.state == TrialState.FAIL]
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == stale.number]
    assert retry.state == TrialState.COMPLETE and retry.params == stale.params
    assert summary["complete"] == 3 and len(trials) == 4


@pytest.mark.slow
def test_a_store_deleted_during_a_run_stops_it_in_one_line(sqlite_url: str, tmp_path: Path) -> None:
    """`rm tuner.db*` while a run trains: SQLite wrote on into the unlinked file, and the run
    ended "4 trials finished", exit 0, with every trial gone. Now it stops, exit 1, saying so."""
    from conftest import TUNER

    space = {**simulated(), "fixed": {"workload": "simulated", "steps": 40, "step_seconds": 0.2}}
    name = create_study(write_space(tmp_path / "d.yaml", space), storage=sqlite_url)
    db = Path(sqlite_url.removeprefix("sqlite:///"))
    run = subprocess.Popen(
        [*TUNER, "study", "run", name, "--storage", sqlite_url, "--n-trials", "6", "--jobs", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(name, sqlite_url, lambda ts: any(t.intermediate_values for t in ts))
    for path in db.parent.glob(db.name + "*"):
        path.unlink()
    _, err = run.communicate(timeout=180)
    assert run.returncode == 1, err[-3000:]
    assert err.splitlines()[-1] == (
        f"error: the study store {db} was deleted or replaced during the run, and the trials it "
        "held with it; the run stopped"
    )
    assert "Traceback" not in err, err[-3000:]


def test_a_worker_that_starts_after_its_store_was_deleted_stops_in_one_line(tmp_path: Path) -> None:
    """On a busy machine a worker may open the store only after `rm tuner.db*`: SQLite makes a
    new, empty file, and the worker's set-up met "no such table". Its process printed a
    multiprocessing traceback above the driver's one line (CI, 2026-12-01). Now it says one
    line of its own and exits 1; the driver says the rest."""
    empty = tmp_path / "tuner.db"
    empty.touch()  # what the deleted store's path holds when the late worker opens it
    code = (
        "from tuner.backends.local import _serve; "
        "from tuner.backends.worker import WorkerSpec; "
        "import os; "
        f"_serve(None, WorkerSpec('d', 'sqlite:///{empty}', 'local-0', 0, 1), None, "
        "os.getppid(), dict(os.environ))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "local-0 stopped: OperationalError: no such table: " in last, done.stderr[-3000:]
