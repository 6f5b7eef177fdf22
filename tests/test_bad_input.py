"""A corpus of bad spaces and bad data files through `tuner study create`, as a user runs it:
each is one line naming the file and what is wrong, exit status 2, no traceback, and nothing
written to the study store."""

from __future__ import annotations

import ast
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from conftest import small_space, write_space
from test_space import BAD as BAD_SPACES
from test_space import GOOD as GOOD_SPACE

from tuner.cli import main

LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (INFO|WARNING) ")  # tuner.cli.LOG_FORMAT

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
        "from tuner.errors import TunerError\n"
        "from tuner.study import create_study\n"
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
