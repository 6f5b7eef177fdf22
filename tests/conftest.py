"""Shared fixtures: a real tiny model, real SQLite and a fresh real PostgreSQL database.

PostgreSQL is required: without it these fixtures fail, they never skip. Point the tests at a
server with TUNER_TEST_POSTGRES (a URL to an existing database the tests may create databases
from); the default is the local server with trust auth.

The suite runs side by side (`make test`: pytest-xdist, `--dist loadgroup`). So:
- each test process has its own HOME and caches (`pytest_configure`): nothing writes to the
  machine's ~/.ray, ~/.cache or HOME; pip's download cache is the one thing shared;
- what is costly is built once per run, behind a file lock, in a folder every process of the
  run shares (`run_once`): the demo model, DeepSpeed's compiled ops;
- servers a module cannot disturb are started once per process and shared (S3, MLflow); each
  Ray module starts its cluster once, and the four run in two processes (groups `ray` and
  `ray-nodes`), so that no more than two clusters share the cores;
- the longest work is handed out first (`_cost_rank`);
- a test that restarts PostgreSQL says so (`@pytest.mark.restarts_postgres`) and runs alone:
  every other test holds the server shared while it uses a database (`pg_url`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ADMIN_URL = os.environ.get(
    "TUNER_TEST_POSTGRES", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
)
# The installed console script, as a user runs it.
TUNER = [str(Path(sys.executable).with_name("tuner"))]
_REAL_HOME = Path.home()  # read before pytest_configure gives this process its own


# ----------------------------------------------------------------------------- the run's places


def _run_dir() -> Path:
    """The folder every process of this run shares, and no other run: made by the first
    process (xdist's controller, or the one process), whose workers inherit its name."""
    return Path(os.environ["TUNER_TEST_RUN"])


def pytest_configure(config: pytest.Config) -> None:
    """This process's own HOME and caches, before any test (or library) reads them."""
    if "TUNER_TEST_RUN" not in os.environ:
        os.environ["TUNER_TEST_RUN"] = tempfile.mkdtemp(prefix="tuner-tests-")
        os.environ["TUNER_TEST_RUN_OWNER"] = str(os.getpid())
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    home = _run_dir() / f"home-{worker}"
    home.mkdir(exist_ok=True)
    os.environ.update(
        HOME=str(home),
        XDG_CACHE_HOME=str(home / ".cache"),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_DATA_HOME=str(home / ".local/share"),
        # pip's download cache, the one thing shared with the machine: the packaging test's
        # venv takes its wheels from there rather than from the network.
        PIP_CACHE_DIR=os.environ.get("PIP_CACHE_DIR", str(_REAL_HOME / ".cache" / "pip")),
        # DeepSpeed JIT-compiles its CPU ops (~50 s): once per run, shared by the processes
        # (torch's build takes a lock of its own).
        TORCH_EXTENSIONS_DIR=str(_run_dir() / "torch_extensions"),
        # Several test processes share 2 cores, and train tiny models: a second torch thread
        # only spins waiting for a core another test holds (a trial took 2.5× the CPU).
        TUNER_TORCH_THREADS="1",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        # A local `ray.init()`'s sessions and sockets; short, as socket paths must be.
        RAY_TMPDIR=str(Path(tempfile.gettempdir()) / f"rt-{worker}-{os.getpid()}"),
    )


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(os.environ.get("RAY_TMPDIR", "/nonexistent"), ignore_errors=True)
    if os.environ.get("TUNER_TEST_RUN_OWNER") == str(os.getpid()):
        shutil.rmtree(_run_dir(), ignore_errors=True)


# The tiers (`make test-fast` runs the tests with none of these marks), set here from the
# fixtures a test uses; a module or test that needs one another way says so itself.
_TIER_OF_FIXTURE = {
    "pg_url": "postgres",
    "demo_dir": "training",
    "s3_endpoint": "server",
    "mlflow_server": "server",
}


# Tests that share a server costly to start run in one process (`--dist loadgroup`), so that the
# run starts it once: MLflow's takes ~40 s on 2 busy cores.
_GROUP_OF_FIXTURE = {"mlflow_server": "mlflow"}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        for fixture, tier in _TIER_OF_FIXTURE.items():
            if fixture in fixtures:
                item.add_marker(tier)
        for fixture, group in _GROUP_OF_FIXTURE.items():
            if fixture in fixtures:
                item.add_marker(pytest.mark.xdist_group(group))
        param = getattr(item, "callspec", None)
        if param is not None and param.params.get("storage_url") == "postgresql":
            item.add_marker("postgres")
    # Longest first, so that the run does not end waiting on one process: xdist hands out work
    # in this order, a group whole. Groups (a chain of tests in one process), then training,
    # then what is slow for another reason; the order is otherwise the collection's.
    items.sort(key=_cost_rank)


def _cost_rank(item: pytest.Item) -> int:
    if item.get_closest_marker("xdist_group"):
        return 0
    if item.get_closest_marker("training"):
        return 1
    slow = ("slow", "ray", "postgres", "server")
    return 2 if any(item.get_closest_marker(mark) for mark in slow) else 3


@contextlib.contextmanager
def _flock(path: Path, kind: int) -> Iterator[None]:
    with path.open("a") as f:
        fcntl.flock(f, kind)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_once(name: str, build: Callable[[Path], object]) -> Path:
    """`build(folder)` once per run, whichever process asks first; the others wait for it and
    get the same folder. A build that failed leaves nothing, and the next one tries again."""
    root = _run_dir()
    folder, done = root / name, root / f"{name}.done"
    with _flock(root / f"{name}.lock", fcntl.LOCK_EX):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    """The demo model and data, built once per run (shorter pre-training than the CLI's) and
    shared by every test process: tests read it, never write it."""
    from tuner.core.demo import prepare_demo

    return run_once("demo", lambda root: prepare_demo(root, pretrain_steps=200))


@dataclass(frozen=True)
class Quickstart:
    """The README's quickstart as a user runs it in a folder of its own (the embedded store,
    default verbosity), once per test run: what each command printed, and the folder."""

    folder: Path
    printed: dict[str, dict]  # command: {"args", "returncode", "stdout", "stderr"}


QUICKSTART = {  # as the README has it; the base barely pre-trained (the path, not the model)
    "demo": ["demo", "prepare", "--pretrain-steps", "10"],
    "create": ["study", "create", "--space", "quickstart.yaml"],
    "run": ["study", "run", "quickstart", "--n-trials", "3", "--jobs", "2"],
}
QUICKSTART_ENV = {"TUNER_STORAGE": "", "TUNER_VERBOSITY": "0"}


@pytest.fixture(scope="session")
def quickstart() -> Quickstart:
    """Built once per run and shared by every test process (test_cli, test_quiet,
    test_readme): tests read its study and outputs, never change them (an export writes
    elsewhere; the study's stored paths are this folder's)."""
    import json

    def build(folder: Path) -> None:
        folder.mkdir(parents=True)
        printed = {}
        for command, args in QUICKSTART.items():
            done = run_cli(*args, cwd=folder, env=QUICKSTART_ENV)
            printed[command] = {
                "args": args,
                "returncode": done.returncode,
                "stdout": done.stdout,
                "stderr": done.stderr,
            }
            assert done.returncode == 0, f"tuner {' '.join(args)}:\n{done.stderr[-3000:]}"
        (folder / "printed.json").write_text(json.dumps(printed))

    folder = run_once("quickstart", build)
    return Quickstart(folder, json.loads((folder / "printed.json").read_text()))


@pytest.fixture(scope="session")
def demo_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's files without its pre-training: the data, and a model folder holding only the
    tokenizer and config (what `study create` loads). For tests that create studies and read
    data but train nothing (a second)."""
    import random

    from transformers import LlamaConfig

    from tuner.core.demo import build_tokenizer, write_data

    root = tmp_path_factory.mktemp("files") / "demo"
    (root / "model").mkdir(parents=True)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(root / "model")
    LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1).save_pretrained(
        root / "model"
    )
    write_data(root / "data.jsonl", random.Random(0))
    return root


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    import sqlalchemy

    engine = sqlalchemy.create_engine(ADMIN_URL)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("select 1"))
    except sqlalchemy.exc.OperationalError as e:
        pytest.fail(f"PostgreSQL is required for the tests and is not reachable: {e}")
    finally:
        engine.dispose()
    return ADMIN_URL


@pytest.fixture
def pg_url(pg_admin_url: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, empty database for one test, dropped afterwards. The test holds the server
    shared meanwhile; one marked `restarts_postgres` holds it alone."""
    restarts = request.node.get_closest_marker("restarts_postgres") is not None
    with _flock(_run_dir() / "postgres.lock", fcntl.LOCK_EX if restarts else fcntl.LOCK_SH):
        yield from _database(pg_admin_url)


def _database(pg_admin_url: str) -> Iterator[str]:
    import sqlalchemy

    name = f"tuner_test_{uuid.uuid4().hex[:12]}"
    # Pre-ping: a test may restart the server between create and drop.
    admin = sqlalchemy.create_engine(pg_admin_url, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    yield pg_admin_url.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'studies.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'studies.db'}"
    return request.getfixturevalue("pg_url")


def small_space(demo: Path, **overrides: object) -> dict:
    """A quick space over the demo: 30 steps, evaluated every 10, a few seconds a trial."""
    space = {
        "name": "small",
        "params": {
            "learning_rate": {"type": "float", "low": 1e-5, "high": 3e-2, "log": True},
            "lora_rank": {"type": "categorical", "choices": [2, 4, 8]},
            "lora_alpha": {"type": "multiple", "of": "lora_rank", "factors": [1, 2]},
        },
        "fixed": {
            "model_name_or_path": str(demo / "model"),
            "dataset": {"path": str(demo / "data.jsonl"), "format": "alpaca"},
            "cutoff_len": 96,
            "val_size": 48,
            "max_steps": 30,
            "eval_steps": 10,
            "logging_steps": 10,
            "per_device_train_batch_size": 8,
            "gradient_accumulation_steps": 1,
            "per_device_eval_batch_size": 48,
            "seed": 0,
        },
        "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 3},
        "pruner": {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 0},
        "budget": {"n_trials": 4},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(space.get(key), dict):
            space[key] = {**space[key], **value}
        else:
            space[key] = value
    return space


def write_space(path: Path, space: dict | str) -> Path:
    text = space if isinstance(space, str) else yaml.safe_dump(space, sort_keys=False)
    path.write_text(textwrap.dedent(text) if isinstance(space, str) else text)
    return path


def as_from_a_terminal() -> None:
    """`preexec_fn` of a child the test sends Ctrl-C: it reaches the child as from a terminal. A
    child inherits ignored and blocked signals: a suite started in the background by a script
    (`cmd &` ignores SIGINT) would hand that on, and the child would never see the Ctrl-C."""
    import signal

    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def mounted_tmpfs(mount: Path, options: str) -> Iterator[Path]:
    """A small file system (tmpfs with `options`, e.g. size=32k) mounted at `mount` for the test:
    a full or read-only disk, for real."""
    mount.mkdir(exist_ok=True)
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)],
                          capture_output=True, text=True)  # fmt: skip
    assert made.returncode == 0, f"this test needs to mount a tmpfs: {made.stderr}"
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def run_cli(
    *args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*TUNER, *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ----------------------------------------------------------------------------- S3 (moto's server)


@dataclass(frozen=True)
class S3:
    """A bucket on the session's S3-API server, and the environment that reaches it."""

    endpoint: str
    bucket: str
    env: dict[str, str]

    def client(self) -> object:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name=self.env["AWS_DEFAULT_REGION"],
        )

    def listed(self, prefix: str = "") -> list[str]:
        listed = self.client().list_objects_v2(Bucket=self.bucket, Prefix=prefix)
        return sorted(o["Key"] for o in listed.get("Contents", []))


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on a free localhost port, in a thread of this test process: a real
    HTTP S3 API (tuner's subprocesses reach it as any other). Required: without moto the
    tests fail."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as e:
        pytest.fail(f"moto[server] is required for the S3 tests (pip install -e '.[test]'): {e}")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def s3_env(endpoint: str) -> dict[str, str]:
    """What reaches the S3-API server at `endpoint`: tuner takes credentials from the
    environment only (a node's processes inherit them)."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "test-key-id",
        "AWS_SECRET_ACCESS_KEY": "test-secret-key",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


@pytest.fixture
def s3(s3_endpoint: str) -> S3:
    """A fresh bucket for one test. Credentials reach tuner through the environment only."""
    bucket = S3(s3_endpoint, f"tuner-{uuid.uuid4().hex[:12]}", s3_env(s3_endpoint))
    bucket.client().create_bucket(Bucket=bucket.bucket)
    return bucket


# ----------------------------------------------------------------------------- MLflow's server


class MlflowServer:
    """`mlflow server` on a free localhost port over an SQLite store, started in its own session
    and stopped by its process id. It takes ~40 s to come up on 2 busy cores: `url` waits for
    it, so a test can build its other fixtures meanwhile."""

    def __init__(self, root: Path) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.log = root / "server.log"
        self.process = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("mlflow")),
                "server",
                f"--backend-store-uri=sqlite:///{root / 'mlflow.db'}",
                f"--default-artifact-root={root / 'artifacts'}",
                "--host=127.0.0.1",
                f"--port={port}",
                "--workers=1",
            ],
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._url = f"http://127.0.0.1:{port}"
        self._up = False

    @property
    def url(self) -> str:
        import time
        import urllib.request

        deadline = time.monotonic() + 180
        while not self._up:
            try:
                urllib.request.urlopen(f"{self._url}/health", timeout=2).close()
                self._up = True
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"mlflow server did not start:\n{self.log.read_text()[-2000:]}")
                time.sleep(0.3)
        return self._url

    def stop(self) -> None:
        import signal

        self.process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=15)
        # Its uvicorn worker is a child in the same session: whatever is left goes with it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """The real MLflow tracking server. Required: without mlflow the tests fail, never skip."""
    try:
        import mlflow  # noqa: F401
    except ImportError as e:
        pytest.fail(f"mlflow is required for the tracking tests (pip install -e '.[test]'): {e}")
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    try:
        yield server
    finally:
        server.stop()
