"""The command line as a newcomer meets it, through the real entry point (the `tuner` script and
`python -m tuner`): usage mistakes are one line and exit 2, reads make no store, a missing study
suggests the closest name, a run whose every trial failed fails, and the read-only commands start
without the training stack."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from conftest import run_cli

import tuner
from tuner.core.monitor import Progress
from tuner.face.cli import _run_failure

ENV = {"TUNER_STORAGE": ""}  # the embedded default: tuner.db in the working directory


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("study", "lsit"), "No such command 'lsit'. Did you mean 'list'"),
        (("stduy", "list"), "No such command 'stduy'. Did you mean 'study'?"),
        (("study", "create", "quickstart.yaml"), "Missing option '--space'"),
        (("study", "run", "quickstart", "--jobs", "two"), "Invalid value for '--jobs'"),
        (("study", "run", "quickstart", "--backend", "slurm"), "'local', 'ray'"),
        (("study", "show"), "Missing argument 'NAME'"),
        (("study", "show", "a", "b"), "unexpected extra argument"),
    ],
)
def test_a_usage_mistake_is_one_line_and_exit_2(tmp_path: Path, args: tuple, said: str) -> None:
    result = run_cli(*args, cwd=tmp_path, env=ENV)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and said in result.stderr, result.stderr
    assert result.stderr.startswith("error: ") and "--help`" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not (tmp_path / "tuner.db").exists()


def test_python_dash_m_is_the_same_command(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tuner", "stduy", "list"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr == (
        "error: No such command 'stduy'. Did you mean 'study'? (see `tuner --help`)\n"
    )


def test_version_and_shell_completion(tmp_path: Path) -> None:
    version = run_cli("--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout == f"tuner {tuner.__version__}\n"
    # The script `--show-completion` prints for the shell it detects (bash: ~/.bashrc can also
    # `eval "$(_TUNER_COMPLETE=source_bash tuner)"`); detection depends on the parent process.
    script = run_cli(cwd=tmp_path, env={"_TUNER_COMPLETE": "source_bash"})
    assert script.returncode == 0 and "_TUNER_COMPLETE=complete_bash" in script.stdout
    # What bash asks once the script is installed: the commands after `tuner study s`...
    words = {"COMP_WORDS": "tuner study s", "COMP_CWORD": "2", "_TUNER_COMPLETE": "complete_bash"}
    completed = run_cli(cwd=tmp_path, env=words)
    assert completed.stdout.split() == ["submit", "show"]
    # ... and the backends, a choice.
    words = {**words, "COMP_WORDS": "tuner study run x --backend ", "COMP_CWORD": "5"}
    assert run_cli(cwd=tmp_path, env=words).stdout.split() == ["local", "ray"]


@pytest.mark.slow
def test_reads_make_no_store(tmp_path: Path) -> None:
    listed = run_cli("study", "list", cwd=tmp_path, env=ENV)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.startswith("no studies: there is no study store at sqlite:///")
    assert run_cli("study", "list", "--json", cwd=tmp_path, env=ENV).stdout == "[]\n"
    for args in (("study", "show", "x"), ("study", "best", "x"), ("study", "report", "x")):
        result = run_cli(*args, cwd=tmp_path, env=ENV)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert "error: no study 'x': there is no study store at" in result.stderr
    served = run_cli("dashboard", "--port", "0", cwd=tmp_path, env=ENV, timeout=60)
    assert served.returncode == 2 and "there is no study store at" in served.stderr
    assert list(tmp_path.iterdir()) == []  # no tuner.db, no report.html

    # A database without Optuna's tables is no store either, and stays without them.
    other = tmp_path / "other.db"
    other.touch()
    result = run_cli("study", "list", "--storage", f"sqlite:///{other}", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("no studies: "), result.stderr
    assert other.stat().st_size == 0


@pytest.mark.slow
def test_reading_an_empty_database_makes_no_tables(storage_url: str) -> None:
    import sqlalchemy

    for args in (("study", "list"), ("study", "show", "x"), ("sweep", "list")):
        result = run_cli(*args, "--storage", storage_url)
        assert "there is no study store at" in result.stdout + result.stderr, result.stderr
    if storage_url.startswith("sqlite"):
        assert not Path(storage_url.removeprefix("sqlite:///")).exists()
        return
    engine = sqlalchemy.create_engine(storage_url)
    try:
        assert sqlalchemy.inspect(engine).get_table_names() == []
    finally:
        engine.dispose()


@pytest.mark.slow
def test_a_missing_study_suggests_the_closest_name(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'tuner.db'}"
    args = ("study", "create", "--space", "simulated.yaml", "--name", "quickstart")
    created = run_cli(*args, cwd=tmp_path, env=ENV)
    # Log lines carry the time, for the logs of unattended runs.
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO tuner.core.study: created study quickstart in .*\n",
        created.stderr,
    ), created.stderr
    result = run_cli("study", "show", "quickstrat", cwd=tmp_path, env=ENV)
    assert result.returncode == 2
    assert result.stderr == (
        f"error: no study 'quickstrat' in {url}; did you mean 'quickstart'? "
        "(see `tuner study list`)\n"
    )


def test_verbosity_flags_set_the_levels_and_the_workers_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tuner.face.cli import main

    # setenv first: it records the variable's absence, so that what main() sets is undone after
    # (later tests' subprocesses would otherwise inherit -vv).
    monkeypatch.setenv("TUNER_VERBOSITY", "0")
    monkeypatch.delenv("TUNER_VERBOSITY")
    root = logging.getLogger()
    saved = {name: logging.getLogger(name).level for name in logging.root.manager.loggerDict}
    saved_root = root.level
    try:
        for flags, env, level in [
            (["-q"], "-1", logging.WARNING),
            (["-v"], "1", logging.DEBUG),
            (["-vv"], "2", logging.DEBUG),
        ]:
            monkeypatch.setattr(sys, "argv", ["tuner", *flags, "spaces"])
            with pytest.raises(SystemExit) as exited:
                main()
            assert exited.value.code == 0
            assert os.environ["TUNER_VERBOSITY"] == env  # what worker processes inherit
            assert logging.getLogger("tuner.core.study").getEffectiveLevel() == level
            assert logging.getLogger("urllib3").getEffectiveLevel() == (
                logging.DEBUG if env == "2" else logging.WARNING
            )
    finally:
        root.setLevel(saved_root)
        for name in logging.root.manager.loggerDict:
            logging.getLogger(name).setLevel(saved.get(name, logging.NOTSET))


# ----------------------------------------------------------------------------- study run's end


@pytest.mark.slow
def test_a_run_that_completes_no_trial_fails(tmp_path: Path) -> None:
    (tmp_path / "diverging.yaml").write_text(
        "params: {learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}}\n"
        "fixed:\n"
        "  workload: simulated\n"
        "  simulated: {steps: 2, step_seconds: 0.0, diverge_above_lr: 1.0e-9}\n"
    )
    assert run_cli("study", "create", "--space", "diverging.yaml", cwd=tmp_path, env=ENV).stdout
    ran = run_cli("study", "run", "diverging", "--n-trials", "1", cwd=tmp_path, env=ENV)
    assert ran.returncode == 1, ran.stderr
    assert ran.stdout.splitlines() == ["1 trial finished: 0 complete, 0 pruned, 1 failed"]
    assert ran.stderr.splitlines()[-1] == (
        "error: this run finished 1 trial and every one failed (see `tuner study show`)"
    )
    as_json = run_cli(
        "study", "run", "diverging", "--n-trials", "1", "--json", cwd=tmp_path, env=ENV
    )
    assert as_json.returncode == 1
    summary = json.loads(as_json.stdout)
    assert summary["finished"] == summary["failed"] == 1 and summary["complete"] == 0
    assert summary["best_trial"] is None and summary["error"].startswith("this run finished")


def test_a_stopped_run_fails_with_its_reason() -> None:
    progress = Progress(target=10, failed=3)
    progress.stop_reason = "3 trials in a row failed with OSError: no such model"  # type: ignore[attr-defined]
    assert _run_failure(progress) == "3 trials in a row failed with OSError: no such model"
    assert _run_failure(Progress(target=10, complete=1, failed=5)) is None
    assert _run_failure(Progress(target=0)) is None  # nothing to do is no failure


# ----------------------------------------------------------------------------- startup

HEAVY = {"torch", "transformers", "peft", "trl", "deepspeed", "ray"}
# Runs one command as the `tuner` script does, then prints which heavy packages it imported.
WRAPPER = """
import atexit, json, sys
atexit.register(lambda: print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})),
                              file=sys.stderr))
sys.argv = ["tuner", *sys.argv[1:]]
from tuner.face.cli import main
main()
"""


@pytest.fixture(scope="module")
def study_with_a_trial(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tuner.core.study import create_study

    folder = tmp_path_factory.mktemp("startup")
    url = f"sqlite:///{folder / 'tuner.db'}"
    create_study("simulated.yaml", storage=url)
    study = optuna.load_study(study_name="simulated", storage=url)
    study.tell(study.ask({"learning_rate": optuna.distributions.FloatDistribution(1e-5, 1)}), 1.0)
    return folder


@pytest.mark.parametrize(
    "args",
    [
        ("--help",),
        ("spaces",),
        ("study", "list"),
        ("study", "show", "simulated"),
        ("study", "best", "simulated"),
    ],
)
def test_read_commands_do_not_import_the_training_stack(
    study_with_a_trial: Path, args: tuple
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", WRAPPER, *args],
        cwd=study_with_a_trial,
        env={**os.environ, **ENV},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    imported = set(json.loads(result.stderr.splitlines()[-1]))
    assert "tuner" in imported and not imported & HEAVY, sorted(imported & HEAVY)


def test_the_backend_choice_is_the_registry() -> None:
    import typing

    from tuner.backends import BACKENDS
    from tuner.face.cli import BackendName

    assert set(typing.get_args(BackendName)) == set(BACKENDS)
