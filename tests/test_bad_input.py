"""A corpus of bad spaces and bad data files through `tuner study create`, as a user runs it:
each is one line naming the file and what is wrong, exit status 2, no traceback, and nothing
written to the study store."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from conftest import TUNER, run_cli, small_space, write_space
from test_space import BAD as BAD_SPACES
from test_space import GOOD as GOOD_SPACE

from tuner.face.cli import main

LOG_LINE = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (INFO|WARNING) "
)  # tuner.face.cli.LOG_FORMAT

ALPACA = '{"instruction": "add 2 and 3", "output": "5"}\n'

_VALID = (
    "params: {learning_rate: {type: float, low: 1e-5, high: 1e-3, log: true}}\n"
    "fixed: {model_name_or_path: ./model, dataset: {path: data.jsonl}}\n"
)
_LAUGHS = 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n' + "".join(
    f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]\n"
    for prev, name in zip("abcdefg", "bcdefgh", strict=True)
)

# Space files as they go wrong outside this repository: (name, bytes, words the error must hold)
BAD_SPACE_FILES = [
    ("billion laughs", (_LAUGHS + _VALID).encode(), "expands to more than 100,000 values"),
    (
        "billion laughs in a known key",
        (_VALID + f"description: [{_LAUGHS.replace(chr(10), ', ')}]\n").encode(),
        "expands to more than 100,000 values",
    ),
    ("a 1 MB value", (_VALID + "description: [" + "x" * 1_000_000 + "]\n").encode(), "..."),
    ("tab indentation", b"params:\n\tlearning_rate: {type: float}\n", "'\\t'"),
    ("two documents", (_VALID + "---\nname: two\n").encode(), "another document"),
    ("UTF-16", _VALID.encode("utf-16"), "is not UTF-8"),
    ("a list, not a mapping", b"- params\n- fixed\n", "must be a mapping"),
    ("a Python object tag", b"params: !!python/name:os.system\n", "YAML tag"),
    ("a directory", None, "is a directory"),
]

# (name, bytes of the data file, its format, words the error must contain)
BAD_DATA = [
    ("empty file", b"", "alpaca", "is empty"),
    ("only blank lines", b"\n\n  \n", "alpaca", "is empty"),
    (
        "latin-1 text",
        '{"instruction": "caf\xe9", "output": "b"}\n'.encode("latin-1"),
        "alpaca",
        "not UTF-8",
    ),
    ("binary", b"\x00\x01\x02PK\x03\x04" * 100, "alpaca", "bad.jsonl"),
    ("a 10 MB line that is not JSON", b"x" * 10_000_000 + b"\n", "alpaca", "line 1"),
    ("truncated JSON line", ALPACA.encode() + b'{"instruction": "a", "out', "alpaca", "line 2"),
    ("missing output", b'{"instruction": "a"}\n', "alpaca", "has no 'output' field"),
    ("missing instruction", b'{"output": "a"}\n', "alpaca", "has no 'instruction' field"),
    (
        "a list where text belongs",
        b'{"instruction": ["a"], "output": "b"}\n',
        "alpaca",
        "instruction must be text",
    ),
    ("records that are not objects", b"[1, 2, 3]", "alpaca", "record 1 is not an object"),
    ("sharegpt without conversations", b'{"text": "a"}\n', "sharegpt", "has no conversation"),
    (
        "sharegpt unknown role",
        b'{"conversations": [{"from": "narrator", "value": "x"}]}\n',
        "sharegpt",
        "narrator",
    ),
    ("messages that are not a list", b'{"messages": "hello"}\n', "messages", "messages"),
]


def _main(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """`tuner ARGV` in this process: its exit status and what it wrote to stderr."""
    old = sys.argv
    sys.argv = ["tuner", *argv]
    try:
        with pytest.raises(SystemExit) as exited:
            main()
    finally:
        sys.argv = old
    return exited.value.code, capsys.readouterr().err


def _create(space_file: Path, db: Path, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    return _main(
        ["study", "create", "--space", str(space_file), "--storage", f"sqlite:///{db}"], capsys
    )


def _assert_refused(code: int, err: str, file: Path, expected: str, db: Path) -> None:
    lines = [line for line in err.splitlines() if not LOG_LINE.match(line)]
    assert code == 2, err[:500]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[:500]
    assert "Traceback" not in err
    assert file.name in lines[0] and expected in lines[0], lines[0][:500]
    assert len(lines[0]) < 2000  # a 10 MB record is not echoed back
    assert not db.exists() or optuna.get_all_study_names(f"sqlite:///{db}") == []


@pytest.mark.parametrize(("text", "expected"), BAD_SPACES, ids=[e for _, e in BAD_SPACES])
def test_a_bad_space_is_refused_with_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    text: str,
    expected: str,
) -> None:
    monkeypatch.chdir(tmp_path)  # the corpus names data.jsonl and model relative to it
    (tmp_path / "data.jsonl").write_text(ALPACA)
    (tmp_path / "model").mkdir()
    space = write_space(tmp_path / "bad.yaml", text)
    db = tmp_path / "studies.db"
    code, err = _create(space, db, capsys)
    _assert_refused(code, err, space, expected, db)


@pytest.mark.parametrize(
    ("content", "expected"),
    [case[1:] for case in BAD_SPACE_FILES],
    ids=[case[0] for case in BAD_SPACE_FILES],
)
def test_a_space_file_gone_wrong_is_refused_with_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    content: bytes | None,
    expected: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.jsonl").write_text(ALPACA)
    (tmp_path / "model").mkdir()
    space = tmp_path / "bad.yaml"
    if content is None:
        space.mkdir()
    else:
        space.write_bytes(content)
    db = tmp_path / "studies.db"
    code, err = _create(space, db, capsys)
    _assert_refused(code, err, space, expected, db)


@pytest.mark.parametrize(
    ("content", "fmt", "expected"),
    [case[1:] for case in BAD_DATA],
    ids=[case[0] for case in BAD_DATA],
)
def test_a_bad_data_file_is_refused_before_the_study_is_made(
    tmp_path: Path,
    demo_files: Path,
    capsys: pytest.CaptureFixture,
    content: bytes,
    fmt: str,
    expected: str,
) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_bytes(content)
    space = small_space(demo_files)
    space["fixed"]["dataset"] = {"path": str(data), "format": fmt}
    path = write_space(tmp_path / "s.yaml", space)
    db = tmp_path / "studies.db"
    code, err = _create(path, db, capsys)
    _assert_refused(code, err, data, expected, db)


def test_create_without_the_demo_says_to_prepare_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The packaged quickstart.yaml names demo/ files: in a folder without them, create says
    what makes them, and writes nothing."""
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "studies.db"
    code, err = _create(Path("quickstart.yaml"), db, capsys)
    _assert_refused(code, err, Path("quickstart.yaml"), "run `tuner demo prepare` first", db)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("keep", "expected"),
    [
        ((), "the config of"),
        (("config.json",), "the tokenizer of"),
    ],
    ids=["an empty folder", "a config without a tokenizer"],
)
def test_a_base_model_whose_config_or_tokenizer_does_not_load_is_refused(
    tmp_path: Path,
    demo_files: Path,
    capsys: pytest.CaptureFixture,
    keep: tuple[str, ...],
    expected: str,
) -> None:
    model = tmp_path / "model"
    model.mkdir()
    for name in keep:
        shutil.copy(demo_files / "model" / name, model / name)
    space = small_space(demo_files)
    space["fixed"]["model_name_or_path"] = str(model)
    path = write_space(tmp_path / "s.yaml", space)
    db = tmp_path / "studies.db"
    code, err = _create(path, db, capsys)
    _assert_refused(code, err, path, f"fixed.model_name_or_path: {expected} '{model}'", db)
    assert not db.exists()


def _create_elsewhere(
    spaces: list[Path], db: Path, env: dict[str, str]
) -> list[tuple[str | None, float]]:
    """create_study of each space in a fresh process under `env` (the hub's settings are read
    at import): its error (None if it made the study), and the seconds the call took."""
    script = (
        "import sys, time\n"
        "from tuner.common.errors import TunerError\n"
        "from tuner.core.study import create_study\n"
        "for space in sys.argv[2:]:\n"
        "    started = time.monotonic()\n"
        "    try:\n"
        "        create_study(space, storage=sys.argv[1]); error = None\n"
        "    except TunerError as e:\n"
        "        error = str(e)\n"
        "    print(repr((error, time.monotonic() - started)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, f"sqlite:///{db}", *map(str, spaces)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return [ast.literal_eval(line) for line in done.stdout.strip().splitlines()[-len(spaces) :]]


@pytest.mark.slow
def test_a_hub_model_is_found_in_the_cache_offline_and_refused_in_seconds_when_not(
    tmp_path: Path, demo_files: Path
) -> None:
    """No network here: a hub id resolves from the hub cache with HF_HUB_OFFLINE=1; one that is
    not cached is refused with what to do, offline and with the hub unreachable (a closed
    port): at once, not after minutes of retries, and with nothing written."""
    hub = tmp_path / "hf" / "hub"
    snapshot = hub / "models--tiny--cached" / "snapshots" / ("0" * 40)
    shutil.copytree(demo_files / "model", snapshot)
    (hub / "models--tiny--cached" / "refs").mkdir()
    (hub / "models--tiny--cached" / "refs" / "main").write_text("0" * 40)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"

    def space(model: str) -> Path:
        spec = small_space(demo_files, name=model.replace("/", "-"))
        spec["fixed"]["model_name_or_path"] = model
        return write_space(tmp_path / f"{spec['name']}.yaml", spec)

    offline = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    (cached, _), (uncached, _) = _create_elsewhere(
        [space("tiny/cached"), space("tiny/uncached")], tmp_path / "offline.db", offline
    )
    assert cached is None
    assert uncached is not None and "fixed.model_name_or_path: 'tiny/uncached'" in uncached
    assert "HF_HUB_OFFLINE is set; download it first" in uncached

    db = tmp_path / "studies.db"
    unreachable = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": closed}
    ((error, seconds),) = _create_elsewhere([space("tiny/uncached")], db, unreachable)
    assert error is not None and f"the hub ({closed}) is unreachable" in error
    assert "download it first" in error and "HF_HUB_OFFLINE=1" in error
    assert seconds < 10, seconds
    assert not db.exists()


@pytest.mark.parametrize("series", ["../escape", "a/b", "/etc/cron.d/x", ".hidden"])
def test_a_series_name_cannot_make_a_sweep_write_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, series: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.jsonl").write_text(ALPACA)
    (tmp_path / "model").mkdir()
    space = write_space(tmp_path / "s.yaml", GOOD_SPACE)
    db = tmp_path / "work" / "studies.db"
    db.parent.mkdir()
    code, err = _main(
        [
            "sweep",
            "run",
            "--space",
            str(space),
            "--name",
            series,
            "--storage",
            f"sqlite:///{db}",
            "--out",
            str(tmp_path / "work" / "sweeps"),
        ],
        capsys,
    )
    assert code == 2 and "a series name is letters, digits" in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["data.jsonl", "model", "s.yaml", "work"]


# --- issue 22: i22-input ---
# Numbers, names and special files, as a careless, hurried or hostile user types them: one line
# naming the flag, key or file, exit status 2, no traceback, nothing written. Runs that could
# block (a FIFO) or eat the memory (/dev/zero) are separate processes with a timeout.


INF, NAN = float("inf"), float("nan")


def _sim_space(**sections: object) -> dict:
    """A space of the simulated workload: nothing to load, trials of a fraction of a second."""
    space = {
        "name": "sim",
        "params": {"lora_dropout": {"type": "float", "low": 0.0, "high": 0.1}},
        "fixed": {"workload": "simulated", "simulated": {"steps": 2, "step_seconds": 0.0}},
        "sampler": {"name": "tpe", "seed": 0},
    }
    for key, value in sections.items():
        space[key] = value
    return space


def _one_error_line(code: int, err: str, *words: str) -> str:
    lines = [line for line in err.splitlines() if not LOG_LINE.match(line)]
    assert code == 2, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _trials_in(db: Path) -> int:
    url = f"sqlite:///{db}"
    return sum(
        len(optuna.load_study(study_name=n, storage=url).trials)
        for n in optuna.get_all_study_names(url)
    )


@pytest.fixture
def sim_study(tmp_path: Path) -> Path:
    """A simulated study `sim` in a fresh SQLite store; the store's path."""
    from tuner.core.study import create_study

    db = tmp_path / "studies.db"
    create_study(write_space(tmp_path / "sim.yaml", _sim_space()), storage=f"sqlite:///{db}")
    return db


@pytest.fixture
def keep_sigterm() -> object:
    """`study run` in this process sets its SIGTERM handler (Ctrl-C's): put pytest's back."""
    import signal

    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)


BAD_RUN_FLAGS = [
    (["--n-trials", "-1"], ["--n-trials", "from 1 to 1,000,000", "-1"]),
    (["--n-trials", "0"], ["--n-trials", "from 1 to 1,000,000"]),
    (["--n-trials", "4294967296"], ["--n-trials", "4294967296"]),
    (["--n-trials", "3e9"], ["--n-trials"]),
    (["--jobs", "0"], ["--jobs", "from 1 to 1,024"]),
    (["--jobs", "1000000000000"], ["--jobs", "from 1 to 1,024"]),  # was a MemoryError
    (["--timeout", "0"], ["--timeout must be > 0", "none for no limit"]),
    (["--timeout", "0s"], ["--timeout must be > 0"]),
    (["--timeout", "2h30"], ["--timeout", "2h30m, not 2h30"]),
    (["--timeout", "-5"], ["--timeout must be seconds"]),
    (["--timeout", "9" * 400 + "d"], ["--timeout must be a finite duration"]),
]


@pytest.mark.parametrize(
    ("args", "words"),
    BAD_RUN_FLAGS,
    ids=[" ".join(args)[:24] for args, _ in BAD_RUN_FLAGS],
)
def test_a_count_or_duration_out_of_range_is_refused_before_any_trial(
    sim_study: Path,
    capsys: pytest.CaptureFixture,
    keep_sigterm: object,
    args: list[str],
    words: list[str],
) -> None:
    code, err = _main(["study", "run", "sim", "--storage", f"sqlite:///{sim_study}", *args], capsys)
    _one_error_line(code, err, *words)
    assert _trials_in(sim_study) == 0


def _fixed(**options: object) -> dict:
    return {**_sim_space()["fixed"], **options}


# (id, sections of the simulated space, the words of the error line)
BAD_NUMBERS = [
    ("n_trials -1", {"budget": {"n_trials": -1}}, "budget.n_trials must be > 0 (got -1)"),
    (
        "n_trials 2**32",
        {"budget": {"n_trials": 4294967296}},
        "budget.n_trials must be <= 1,000,000 (got 4294967296)",
    ),
    ("n_trials 3e9", {"budget": {"n_trials": 3e9}}, "budget.n_trials must be <= 1,000,000"),
    ("timeout 2h30", {"budget": {"timeout": "2h30"}}, "budget.timeout must be seconds or a"),
    ("timeout 0m", {"budget": {"timeout": "0m"}}, "budget.timeout must be > 0 (got '0m')"),
    ("timeout inf", {"budget": {"timeout": INF}}, "budget.timeout must be a finite number"),
    (
        "high inf",
        {"params": {"learning_rate": {"type": "float", "low": 1e-5, "high": INF}}},
        "params.learning_rate.high must be a finite number (got inf)",
    ),
    (
        "low -inf",
        {"params": {"learning_rate": {"type": "float", "low": -INF, "high": 1e-3}}},
        "params.learning_rate.low must be a finite number (got -inf)",
    ),
    (
        "low nan",
        {"params": {"learning_rate": {"type": "float", "low": NAN, "high": 1e-3}}},
        "params.learning_rate.low must be a finite number (got nan)",
    ),
    (
        "width overflows",
        {"params": {"lora_dropout": {"type": "float", "low": -1e308, "high": 1e308}}},
        "params.lora_dropout must span a finite width: high - low overflows",
    ),
    (
        "step inf",
        {"params": {"learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "step": INF}}},
        "params.learning_rate.step must be a finite number",
    ),
    (
        "1 and true",
        {"params": {"lr_scheduler_type": {"type": "categorical", "choices": ["cosine", 1, True]}}},
        "params.lr_scheduler_type.choices must not hold both 1 and true: they are equal",
    ),
    (
        "nan choice",
        {"params": {"lora_dropout": {"type": "categorical", "choices": [0.1, NAN]}}},
        "params.lora_dropout.choices must hold finite numbers (got nan)",
    ),
    (
        "inf factor",
        {"params": {"lora_alpha": {"type": "multiple", "of": "lora_rank", "factors": [1, INF]}}},
        "params.lora_alpha.factors[1] must be a finite number (got inf)",
    ),
    # Invented: fixed.seed goes to transformers.set_seed (numpy's range), so -1 or 2**32 made
    # every trial fail after its model loaded; a lookahead of 10**8 had the driver sample
    # without pause.
    ("fixed.seed -1", {"fixed": _fixed(seed=-1)}, "fixed.seed must be >= 0 (got -1)"),
    ("fixed.seed 2**32", {"fixed": _fixed(seed=2**32)}, "fixed.seed must be <= 4,294,967,295"),
    (
        "sampler.seed -1",
        {"sampler": {"name": "tpe", "seed": -1}},
        "sampler.seed must be a whole number from 0",
    ),
    (
        "lookahead 1e8",
        {"resources": {"lookahead": 10**8}},
        "resources.lookahead must be <= 1,024",
    ),
]


@pytest.mark.parametrize(
    ("sections", "expected"), [c[1:] for c in BAD_NUMBERS], ids=[c[0] for c in BAD_NUMBERS]
)
def test_a_number_out_of_range_in_a_space_is_refused_at_create(
    tmp_path: Path, capsys: pytest.CaptureFixture, sections: dict, expected: str
) -> None:
    space = write_space(tmp_path / "bad.yaml", _sim_space(**sections))
    db = tmp_path / "studies.db"
    code, err = _create(space, db, capsys)
    _assert_refused(code, err, space, expected, db)


@pytest.mark.slow
def test_timeout_none_means_no_limit_over_the_budgets(tmp_path: Path) -> None:
    """`--timeout none` runs every trial asked for, though the space's budget.timeout (1 s)
    stops hand-outs after a second, as the same run without it shows."""
    from tuner.core.study import create_study

    space = _sim_space(budget={"timeout": 1}, resources={"lookahead": 0})
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    create_study(write_space(tmp_path / "sim.yaml", space), storage=url)
    runs = {}
    for timeout in (["--timeout", "none"], []):
        done = run_cli(
            "study", "run", "sim", "--storage", url, "--n-trials", "12", "--json", *timeout
        )
        assert done.returncode == 0, done.stderr[-2000:]
        runs[bool(timeout)] = json.loads(done.stdout)["finished"]
    # Without it the budget's second stops hand-outs early: how many started by then depends on
    # the machine's pace (none when loaded, 2 when idle here), never all 12.
    assert runs[True] == 12 and runs[False] < 12, runs


def test_optuna_would_store_1_and_true_as_one_choice() -> None:
    """Why [cosine, 1, true] is refused rather than kept: Optuna finds a choice's index with ==,
    so a trial given True is stored, and read back, as 1."""
    study = optuna.create_study()
    study.enqueue_trial({"x": True})
    trial = study.ask()
    assert trial.suggest_categorical("x", ["cosine", 1, True]) is True
    study.tell(trial, 0.0)
    assert study.trials[0].params["x"] is not True


BAD_NAMES = [
    ("empty", "", "must not be empty"),
    ("a newline forging an error line", "a\nerror: forged", "must be printable"),
    ("a tab", "tab\there", "must be printable"),
    ("a path", "a/b", "must not hold '/'"),
    ("..", "..", "must not hold '/', '\\' or '..'"),
    ("a Windows path", "..\\up", "must not hold"),
    ("a leading space", " padded", "must not start or end with a space"),
    ("201 bytes", "x" * 201, "must be at most 200 bytes long, not 201"),
    ("101 two-byte characters", "é" * 101, "must be at most 200 bytes long, not 202"),
]


@pytest.mark.parametrize(
    ("name", "expected"), [c[1:] for c in BAD_NAMES], ids=[c[0] for c in BAD_NAMES]
)
def test_a_study_name_that_cannot_be_stored_printed_or_a_folder_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture, name: str, expected: str
) -> None:
    space = write_space(tmp_path / "sim.yaml", _sim_space())
    db = tmp_path / "studies.db"
    code, err = _main(
        ["study", "create", "--space", str(space), "--name", name, "--storage", f"sqlite:///{db}"],
        capsys,
    )
    _one_error_line(code, err, "--name", expected)
    assert not db.exists() or optuna.get_all_study_names(f"sqlite:///{db}") == []


def test_a_bad_name_in_the_space_file_names_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    space = write_space(tmp_path / "bad.yaml", _sim_space(name="nightly/../../etc"))
    db = tmp_path / "studies.db"
    code, err = _create(space, db, capsys)
    _assert_refused(code, err, space, "bad.yaml: name must not hold '/'", db)


@pytest.mark.parametrize(
    ("series", "expected"),
    [("", "--name must not be empty"), ("x" * 190, "at most 189 bytes long, not 190")],
    ids=["empty", "too long for its exports' file names"],
)
def test_a_series_name_that_is_empty_or_too_long_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture, series: str, expected: str
) -> None:
    space = write_space(tmp_path / "sim.yaml", _sim_space())
    db = tmp_path / "studies.db"
    out = tmp_path / "sweeps"
    where = ["--storage", f"sqlite:///{db}", "--out", str(out)]
    code, err = _main(["sweep", "run", "--space", str(space), "--name", series, *where], capsys)
    _one_error_line(code, err, expected)
    assert not db.exists() and not out.exists()


def _special(tmp_path: Path, what: str) -> Path:
    """A path that is not a regular file: made here, or the system's own."""
    if what == "an empty folder":
        (tmp_path / "empty").mkdir()
        return tmp_path / "empty"
    if what == "a FIFO":
        os.mkfifo(tmp_path / "data.jsonl")  # named as data: it must still not be opened
        return tmp_path / "data.jsonl"
    if what == "a socket":
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(tmp_path / "s.sock"))
        return tmp_path / "s.sock"
    return Path(what)  # /dev/null, /dev/zero


SPECIAL_DATA = [
    ("an empty folder", "is a folder but not a saved `datasets` folder"),
    ("/dev/null", "is a character device"),
    ("a FIFO", "is a FIFO (named pipe)"),
    ("/dev/zero", "is a character device"),
    ("a socket", "is a socket"),
]


@pytest.mark.parametrize(("what", "expected"), SPECIAL_DATA, ids=[w for w, _ in SPECIAL_DATA])
def test_data_that_is_not_a_file_or_a_saved_dataset_is_refused_without_opening_it(
    tmp_path: Path, demo_files: Path, what: str, expected: str
) -> None:
    data = _special(tmp_path, what)
    space = small_space(demo_files)
    space["fixed"]["dataset"] = {"path": str(data)}
    path = write_space(tmp_path / "s.yaml", space)
    db = tmp_path / "studies.db"
    done = run_cli(
        "study", "create", "--space", str(path), "--storage", f"sqlite:///{db}", timeout=120
    )
    line = _one_error_line(done.returncode, done.stderr, "s.yaml: fixed.dataset: ", expected)
    assert str(data) in line and "a folder that `datasets`' save_to_disk wrote" in line
    assert not db.exists()


def _at_most_2_gb() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_DATA, (2 << 30, 2 << 30))


@pytest.mark.parametrize(
    ("what", "expected"),
    [("a FIFO", "is a FIFO"), ("/dev/zero", "is a character device"), ("a socket", "is a socket")],
    ids=["a FIFO", "/dev/zero", "a socket"],
)
def test_a_space_that_is_not_a_regular_file_neither_blocks_nor_eats_memory(
    tmp_path: Path, what: str, expected: str
) -> None:
    space = _special(tmp_path, what)
    db = tmp_path / "studies.db"
    done = subprocess.run(
        [*TUNER, "study", "create", "--space", str(space), "--storage", f"sqlite:///{db}"],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=_at_most_2_gb,  # reading /dev/zero, it would otherwise take the machine's
    )
    _one_error_line(done.returncode, done.stderr, f"{space}: {expected}", "regular YAML file")
    assert not db.exists()


def test_a_space_file_of_more_than_10_mb_is_refused_unread(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    space = tmp_path / "huge.yaml"
    with space.open("wb") as f:
        f.truncate(50_000_000)  # sparse: no disk spent
    db = tmp_path / "studies.db"
    code, err = _create(space, db, capsys)
    _assert_refused(code, err, space, "is larger than 10,000,000 bytes", db)


# Invented: cases a hurried user meets that the issue did not list.


@pytest.mark.slow
def test_a_sampler_seed_near_numpys_limit_does_not_break_the_feed_or_a_worker(
    tmp_path: Path,
) -> None:
    """Each worker (and the driver's feed) offsets the seed so their draws differ; a seed near
    2**32 - 1 went past numpy's range: the feed died with a traceback, so did a second
    worker's sampler. Offsets wrap around inside the range now."""
    from tuner.core.study import create_study

    space = write_space(
        tmp_path / "sim.yaml", _sim_space(sampler={"name": "tpe", "seed": 2**32 - 1})
    )
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    create_study(space, storage=url)
    done = run_cli("study", "run", "sim", "--storage", url, "--n-trials", "2", "--jobs", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "feed stopped" not in done.stderr, done.stderr
    assert "2 trials finished: 2 complete" in done.stdout


def test_a_saved_dataset_dict_without_the_split_names_the_splits(
    tmp_path: Path, demo_files: Path, capsys: pytest.CaptureFixture
) -> None:
    """Was a KeyError traceback."""
    import datasets

    rows = [{"instruction": "add 2 and 3", "output": "5"}] * 4
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)}).save_to_disk(
        tmp_path / "saved"
    )
    capsys.readouterr()  # the save's own progress bar
    space = small_space(demo_files)
    space["fixed"]["dataset"] = {"path": str(tmp_path / "saved")}
    path = write_space(tmp_path / "s.yaml", space)
    db = tmp_path / "studies.db"
    code, err = _create(path, db, capsys)
    _assert_refused(
        code, err, path, "saved: has no split 'train' (splits: validation); choose one", db
    )


def test_a_parquet_file_that_is_not_parquet_is_one_line(
    tmp_path: Path, demo_files: Path, capsys: pytest.CaptureFixture
) -> None:
    """Was a pyarrow traceback (and the reader's own ERROR log line beside it)."""
    data = tmp_path / "train.parquet"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    space = small_space(demo_files)
    space["fixed"]["dataset"] = {"path": str(data)}
    path = write_space(tmp_path / "s.yaml", space)
    db = tmp_path / "studies.db"
    code, err = _create(path, db, capsys)
    assert "ERROR" not in err
    _assert_refused(code, err, data, "train.parquet: cannot be read as parquet (ArrowInvalid", db)


# --- issue 22: i22-export ---

# (command, --storage, words the one line must hold): stores that cannot hold a study
BAD_STORES = [
    (["study", "create", "--space", "simulated"], "sqlite:///:memory:", "in-memory SQLite store"),
    (["study", "create", "--space", "simulated"], "sqlite://", "in-memory SQLite store"),
    (["study", "run", "x"], "sqlite://", "in-memory SQLite store"),
    (["study", "list"], "sqlite:///:memory:", "in-memory SQLite store"),
    (["study", "create", "--space", "simulated"], "sqlite:///m.db?mode=memory&uri=true", "memory"),
    (
        ["study", "create", "--space", "simulated"],
        "sqlite:////proc/x.db",
        "cannot create the study store sqlite:////proc/x.db: No such file or directory",
    ),
    (["study", "create", "--space", "simulated"], "", "--storage is empty"),
    (["study", "list"], "", "--storage is empty"),
    (["study", "show", "x"], " ", "--storage is empty"),
    (["study", "create", "--space", "simulated"], "sqlite:///fifo.db", "is not a regular file"),
    (["study", "list"], "sqlite:///fifo.db", "is not a regular file"),
    (["study", "create", "--space", "simulated"], "sqlite:///folder.db", "is a folder"),
]


@pytest.mark.parametrize(
    ("command", "url", "expected"), BAD_STORES, ids=[f"{c[1]} {u!r}" for c, u, _ in BAD_STORES]
)
def test_a_store_that_cannot_hold_studies_is_one_line_and_leaves_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    command: list[str],
    url: str,
    expected: str,
) -> None:
    """No traceback, no junk file named `sqlite:`, no FIFO read forever, and an empty --storage
    (`--storage "$UNSET"`) is no silent fallback to the default store here."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TUNER_STORAGE", raising=False)
    os.mkfifo(tmp_path / "fifo.db")
    (tmp_path / "folder.db").mkdir()
    optuna.create_study(study_name="x", storage=f"sqlite:///{tmp_path / 'tuner.db'}")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, err = _main([*command, "--storage", url], capsys)
    lines = [line for line in err.splitlines() if not LOG_LINE.match(line)]
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert not Path("/proc/x.db").exists()


# --- issue 22: i22-delete ---


@pytest.mark.parametrize(
    "name", ["*", "tuner.example.com:443", "", "http://tuner.example.com", "0.0.0.0", "a b"]
)
def test_a_bad_allow_host_is_refused_before_the_dashboard_listens(
    tmp_path: Path, capsys: pytest.CaptureFixture, name: str
) -> None:
    """A wildcard or a port would let any Host through, the rebinding the option guards
    against; anything but one host name or address is refused in one line."""
    db = tmp_path / "studies.db"
    argv = ["dashboard", "--storage", f"sqlite:///{db}", "--port", "0", "--allow-host", name]
    code, err = _main(argv, capsys)
    lines = [line for line in err.splitlines() if not LOG_LINE.match(line)]
    assert code == 2, err
    assert lines == [lines[0]] and lines[0].startswith(f"error: --allow-host {name!r}: "), err
    assert not db.exists()


# --- issue 22: settings and paths that changed under a study (invented) ---

BAD_SETTINGS = [
    ({"TUNER_GRACE_PERIOD": "abc"}, ["TUNER_GRACE_PERIOD", "valid integer", "'abc'"]),
    ({"TUNER_GRACE_PERIOD": "0"}, ["TUNER_GRACE_PERIOD", "greater than 0", "'0'"]),
    ({"TUNER_GRACE_PERIOD": ""}, ["TUNER_GRACE_PERIOD", "''"]),
    ({"TUNER_HEARTBEAT_INTERVAL": "1e99"}, ["TUNER_HEARTBEAT_INTERVAL", "'1e99'"]),
    # Every trial would go stale between two beats, and be failed as dead while it trains.
    (
        {"TUNER_HEARTBEAT_INTERVAL": "30", "TUNER_GRACE_PERIOD": "30"},
        ["TUNER_GRACE_PERIOD (30) must be greater than TUNER_HEARTBEAT_INTERVAL (30)"],
    ),
]


@pytest.mark.parametrize(
    ("env", "words"),
    BAD_SETTINGS,
    ids=[" ".join(f"{k}={v}" for k, v in e.items()) for e, _ in BAD_SETTINGS],
)
def test_a_bad_tuner_setting_is_one_line_naming_the_variable(
    sim_study: Path, env: dict, words: list[str]
) -> None:
    """Was a pydantic traceback (exit 1) from every command."""
    url = f"sqlite:///{sim_study}"
    for command in (["study", "list"], ["study", "run", "sim", "--n-trials", "1"]):
        done = run_cli(*command, "--storage", url, env=env)
        _one_error_line(done.returncode, done.stderr, *words)
    assert _trials_in(sim_study) == 0


@pytest.mark.slow
def test_data_replaced_by_a_fifo_after_create_is_refused_before_any_trial(
    tmp_path: Path, demo_files: Path
) -> None:
    """The data file became a FIFO after `study create`: every trial failed (or blocked) on it;
    now the run refuses in one line, naming the key and what the path is."""
    data = tmp_path / "data.jsonl"
    data.write_bytes((demo_files / "data.jsonl").read_bytes())
    space = small_space(demo_files)
    space["fixed"]["dataset"] = {"path": str(data)}
    db = tmp_path / "studies.db"
    url = f"sqlite:///{db}"
    made = run_cli("study", "create", "--space", str(write_space(tmp_path / "s.yaml", space)),
                   "--name", "fifo", "--storage", url)  # fmt: skip
    assert made.returncode == 0, made.stderr
    data.unlink()
    os.mkfifo(data)
    done = run_cli("study", "run", "fifo", "--storage", url, "--n-trials", "1", timeout=120)
    _one_error_line(done.returncode, done.stderr, "fixed.dataset.path", "is a FIFO (named pipe)")
    assert _trials_in(db) == 0
