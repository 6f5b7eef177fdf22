"""Recurring sweeps: a series over three dates, the lock against overlapping runs, the budget,
resuming a killed sweep, and the cron wrapper run twice at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import optuna
import psutil
import pytest
from conftest import TUNER, run_cli, small_space, write_space
from optuna.trial import TrialState

from tuner.core.study import best_trial
from tuner.core.sweep import WARM_START_ATTR, list_sweeps, run_sweep
from tuner.store._locks import Busy, series_lock

ROOT = Path(__file__).resolve().parent.parent
WRAPPER = ROOT / "deploy" / "cron" / "tuner-sweep"


def simulated(n_trials: int, step_seconds: float = 0.05, **budget: object) -> dict:
    return {
        "name": "nightly",
        "params": {
            "learning_rate": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True},
            "lora_rank": {"type": "categorical", "choices": [4, 8, 16, 32]},
        },
        "fixed": {"workload": "simulated", "steps": 5, "step_seconds": step_seconds},
        "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 3},
        "budget": {"n_trials": n_trials, **budget},
    }


def trials_of(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=url).get_trials()


def test_a_series_warm_starts_and_promotes_only_a_better_model(
    demo_dir: Path, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    out = tmp_path / "sweeps"
    space = small_space(demo_dir, name="nightly", budget={"n_trials": 2})
    space["sweep"] = {"warm_start": 2, "margin": 0.0}
    path = write_space(tmp_path / "nightly.yaml", space)

    first = run_sweep(path, storage=url, out=out, date=_day(1))
    assert first["promoted"] and first["reason"] == "the series' first champion"
    champion = out / "champion"
    assert champion.is_symlink() and os.readlink(champion) == "nightly-2026-11-01"
    assert (champion / "model.safetensors").exists() and (champion / "tuner_export.json").exists()
    assert json.loads((out / "nightly-2026-11-01.json").read_text())["best"] == first["best"]

    # The second sweep starts from the first one's best params, best first.
    second = run_sweep(path, storage=url, out=out, date=_day(2))
    previous = optuna.load_study(study_name="nightly-2026-11-01", storage=url)
    ranked = sorted(
        (t for t in previous.get_trials() if t.state == TrialState.COMPLETE),
        key=lambda t: t.value,
    )
    trials = trials_of(url, "nightly-2026-11-02")
    assert [t.user_attrs[WARM_START_ATTR] for t in trials[:2]] == [
        f"nightly-2026-11-01#{t.number}" for t in ranked[:2]
    ]
    assert [t.user_attrs["hparams"] for t in trials[:2]] == [
        t.user_attrs["hparams"] for t in ranked[:2]
    ]
    assert second["warm_start"] == {"from": "nightly-2026-11-01", "trials": 2, "space_changed": []}
    assert second["change"] == pytest.approx(second["best"]["value"] - first["best"]["value"])
    beaten = second["best"]["value"] < first["best"]["value"]
    assert second["promoted"] == beaten
    holder = "nightly-2026-11-02" if beaten else "nightly-2026-11-01"
    assert second["champion"]["study"] == holder and os.readlink(champion) == holder

    # A margin nothing can beat: the champion stays, and the changed space is said.
    space["sweep"]["margin"] = 100.0
    write_space(path, space)
    third = run_sweep(path, storage=url, out=out, date=_day(3))
    assert not third["promoted"] and "margin 100" in third["reason"]
    assert third["warm_start"]["space_changed"] == ["sweep"]
    assert third["champion"]["study"] == holder and os.readlink(champion) == holder

    rows = list_sweeps("nightly", url)
    assert [r["study"] for r in rows if r["champion"]] == [holder]
    assert [r["date"] for r in rows] == ["2026-11-01", "2026-11-02", "2026-11-03"]
    listed = run_cli("sweep", "list", "--name", "nightly", "--storage", url)
    assert listed.returncode == 0 and f"champion  {holder}" in listed.stdout


def test_overlapping_sweeps_on_postgresql_drive_one_study(pg_url: str, tmp_path: Path) -> None:
    path = write_space(tmp_path / "nightly.yaml", simulated(n_trials=6, step_seconds=0.2))
    args = ["sweep", "run", "--space", str(path), "--storage", pg_url, "--date", "2026-11-05"]
    first, second = (
        subprocess.Popen(
            [*TUNER, *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    )
    outputs = [p.communicate(timeout=300) for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outputs
    skipped = [err for _, err in outputs if "skipped: another sweep of series 'nightly'" in err]
    assert len(skipped) == 1, outputs

    assert optuna.get_all_study_names(pg_url) == ["nightly-2026-11-05"]
    trials = trials_of(pg_url, "nightly-2026-11-05")
    assert len(trials) == 6 and all(t.state.is_finished() for t in trials)

    # --wait queues behind the lock instead; the budget is spent, so it adds no trial.
    with series_lock(pg_url, "nightly"):
        waiting = subprocess.Popen(
            [*TUNER, *args, "--wait"],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(3)
        assert waiting.poll() is None  # still waiting for the lock
        with pytest.raises(Busy), series_lock(pg_url, "nightly"):
            pass
    _, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, err
    assert len(trials_of(pg_url, "nightly-2026-11-05")) == 6


@pytest.mark.slow
def test_the_budget_stops_a_sweep(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    gpu = write_space(
        tmp_path / "gpu.yaml", simulated(n_trials=100, step_seconds=0.1, gpu_hours=0.0006)
    )
    spent = run_sweep(gpu, storage=url, out=tmp_path / "out", date=_day(10))
    assert spent["stopped_by"] == "gpu_hours"
    assert spent["gpu_hours"] >= 0.0006
    # 0.0006 GPU-hours is 2.16 s of trials of ~0.5 s (longer on a loaded machine): the sweep
    # starts trials, one at a time, while what they held is under the budget, and no more. So all
    # but the last came in under it, and the last took it over.
    trials = sorted(trials_of(url, "nightly-2026-11-10"), key=lambda t: t.datetime_start)
    held = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials]
    assert 2 <= len(trials) < 100, held
    assert sum(held[:-1]) < 0.0006 * 3600 <= sum(held), held

    timed = write_space(
        tmp_path / "timed.yaml", simulated(n_trials=100, step_seconds=0.1, timeout=3)
    )
    result = run_sweep(timed, storage=url, out=tmp_path / "out", prefix="timed", date=_day(10))
    assert result["stopped_by"] == "timeout"
    assert len(trials_of(url, "timed-2026-11-10")) < 100


@pytest.mark.slow
def test_a_killed_sweep_resumes_the_next_time(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    path = write_space(tmp_path / "nightly.yaml", simulated(n_trials=8, step_seconds=0.3))
    args = ["sweep", "run", "--space", str(path), "--storage", url, "--date", "2026-11-20"]
    run = subprocess.Popen([*TUNER, *args], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        names = optuna.get_all_study_names(url)
        if names and sum(t.state.is_finished() for t in trials_of(url, names[0])) >= 2:
            break
        time.sleep(0.3)
    family = [run.pid, *(c.pid for c in psutil.Process(run.pid).children(recursive=True))]
    for pid in family:  # the 3 a.m. kill: driver and workers at once
        os.kill(pid, signal.SIGKILL)
    run.wait()

    resumed = run_cli(*args, cwd=tmp_path, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    trials = trials_of(url, "nightly-2026-11-20")
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) == 8
    assert all(t.state != TrialState.RUNNING for t in trials)
    assert [t.number for t in trials] == list(range(len(trials)))
    assert optuna.get_all_study_names(url) == ["nightly-2026-11-20"]


@pytest.mark.slow
def test_the_cron_wrapper_run_twice_at_once_runs_one_sweep(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    path = write_space(tmp_path / "nightly.yaml", simulated(n_trials=5, step_seconds=0.2))
    home = tmp_path / "home"
    env_file = tmp_path / "sweep.env"
    env_file.write_text(
        f"TUNER_SPACE={path}\nTUNER_STORAGE={url}\nTUNER_HOME={home}\n"
        f"TUNER_BIN={TUNER[0]}\nTUNER_ARGS='--date 2026-11-21'\nTUNER_LOG_KEEP=2\n"
    )
    runs = [
        subprocess.Popen(
            ["bash", str(WRAPPER), str(env_file)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [r.communicate(timeout=300) for r in runs]
    assert [r.returncode for r in runs] == [0, 0], outs
    log = (home / "logs" / "sweep.log").read_text()
    assert log.count("skipped: a sweep is already running") == 1, log
    assert "# Sweep nightly-2026-11-21" in log
    status_time, status_code = (home / "last-sweep.status").read_text().split()
    assert status_code == "0" and abs(int(status_time) - time.time()) < 300
    assert len(trials_of(url, "nightly-2026-11-21")) == 5
    assert best_trial(optuna.load_study(study_name="nightly-2026-11-21", storage=url))

    # Later runs rotate the log, keeping TUNER_LOG_KEEP old ones.
    for _ in range(3):
        again = subprocess.run(["bash", str(WRAPPER), str(env_file)], capture_output=True)
        assert again.returncode == 0
    logs = sorted(p.name for p in (home / "logs").iterdir())
    assert logs == ["sweep.log", "sweep.log.1", "sweep.log.2"]

    bad = tmp_path / "bad.env"
    bad.write_text(
        f"TUNER_SPACE={tmp_path / 'missing.yaml'}\nTUNER_HOME={home}\nTUNER_BIN={TUNER[0]}\n"
    )
    failed = subprocess.run(["bash", str(WRAPPER), str(bad)], capture_output=True, text=True)
    assert failed.returncode == 2
    assert (home / "last-sweep.status").read_text().split()[1] == "2"


def _day(n: int):  # noqa: ANN202
    import datetime as dt

    return dt.date(2026, 11, n)


# --- issue 22: i22-export ---


def test_a_sweep_prunes_only_its_own_older_exports(tmp_path: Path) -> None:
    """`--out` may be a folder with other things in it (a home folder, a shared exports
    folder): pruning beyond `sweep.keep_exports` removed every folder named like NAME-DATE,
    a user's `backup-2020-01-01` and another series' champions included."""
    from tuner.core.sweep import _prune_exports

    out = tmp_path / "out"
    for folder in ("nightly-2026-11-01", "nightly-2026-11-02", "nightly-2026-11-03",
                   "other-2026-11-01", "backup-2020-01-01", "nightly-2020-01-01"):  # fmt: skip
        (out / folder).mkdir(parents=True)
        (out / folder / "notes.txt").write_text("keep me\n")
    for export in ("nightly-2026-11-01", "nightly-2026-11-02", "nightly-2026-11-03",
                   "other-2026-11-01"):  # fmt: skip
        (out / export / "tuner_export.json").write_text("{}\n")
    _prune_exports(out, keep=2, current="nightly-2026-11-03")
    assert sorted(p.name for p in out.iterdir()) == [
        "backup-2020-01-01",  # not an export
        "nightly-2020-01-01",  # named like one, but holds no export
        "nightly-2026-11-02",
        "nightly-2026-11-03",
        "other-2026-11-01",  # another series'
    ]


@pytest.mark.slow
def test_a_sweep_refuses_an_export_place_before_it_runs(tmp_path: Path) -> None:
    """The champion's export goes to OUT/SERIES-DATE under tuner.core.destination's rules: inside
    the study's artifacts is refused before any trial runs, not after the night's work; an
    empty --out is refused too, not read as the working directory."""
    space = write_space(tmp_path / "s.yaml", simulated(n_trials=2))
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    args = ["sweep", "run", "--space", str(space), "--storage", url, "--date", "2026-11-01"]
    empty = run_cli(*args, "--out", "", cwd=tmp_path)
    assert empty.returncode == 2 and empty.stderr == (
        "error: --out is empty (an unset variable?): name the folder to write, e.g. --out "
        "best-model\n"
    ), empty.stderr
    inside = run_cli(*args, "--out", str(tmp_path / "tuner_artifacts"), cwd=tmp_path)
    assert inside.returncode == 2 and "Traceback" not in inside.stderr, inside.stderr
    assert inside.stderr.splitlines()[-1].startswith(
        f"error: --out {tmp_path / 'tuner_artifacts' / 'nightly-2026-11-01'} is inside the "
        "study's artifacts"
    ), inside.stderr
    assert trials_of(url, "nightly-2026-11-01") == []
    assert not (tmp_path / "tuner_artifacts" / "nightly-2026-11-01").exists()
