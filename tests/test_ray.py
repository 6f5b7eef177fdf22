"""Trials on a real local Ray cluster with logical GPUs and token authentication on."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from conftest import TUNER, run_cli, write_space
from optuna.trial import TrialState

from tuner.study import create_study, run_study

RAY = str(Path(sys.executable).with_name("ray"))
GPUS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`ray start --head` with 4 logical GPUs and token auth; RAY_ADDRESS points at it."""
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    port = _free_port()
    temp = Path(f"/tmp/ray-tuner-{os.getpid()}")  # Ray's socket paths must stay short
    started = subprocess.run(
        [
            RAY,
            "start",
            "--head",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            f"--num-gpus={GPUS}",
            "--num-cpus=8",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={temp}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert started.returncode == 0, started.stderr[-2000:]
    address = f"127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    os.environ.update(RAY_ADDRESS=address, RAY_AUTH_MODE="token")
    yield address
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    import ray

    ray.shutdown()
    subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)


def _max_concurrent(study: optuna.Study) -> int:
    events = []
    for t in study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)):
        events += [(t.datetime_start, 1), (t.datetime_complete, -1)]
    running = peak = 0
    for _, delta in sorted(events):
        running += delta
        peak = max(peak, running)
    return peak


def test_a_ray_sweep_keeps_every_gpu_busy_and_never_more(
    ray_address: str, pg_url: str, tmp_path: Path
) -> None:
    """The shipped simulated space, run as a user would: one trial per logical GPU at a time,
    actors reused from trial to trial, intermediate values in the store for pruning."""
    created = run_cli(
        "study", "create", "--space", "simulated.yaml", "--storage", pg_url, cwd=tmp_path
    )
    assert created.returncode == 0, created.stderr
    ran = run_cli(
        "study",
        "run",
        "simulated",
        "--backend",
        "ray",
        "--address",
        ray_address,
        "--n-trials",
        "12",
        "--storage",
        pg_url,
        cwd=tmp_path,
    )
    assert ran.returncode == 0, ran.stderr
    assert "12 trials finished" in ran.stdout

    study = optuna.load_study(study_name="simulated", storage=pg_url)
    trials = study.get_trials()
    assert len(trials) == 12 and all(t.state != TrialState.RUNNING for t in trials)
    assert _max_concurrent(study) == GPUS
    workers = {t.user_attrs["worker"] for t in trials}
    assert len(workers) <= GPUS  # warm actors run trial after trial
    assert all(t.intermediate_values for t in trials)


def test_gpus_per_trial_sets_how_many_run_at_once(
    ray_address: str, sqlite_url: str, tmp_path: Path
) -> None:
    space = {
        "params": {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
        "fixed": {"workload": "simulated", "steps": 4, "step_seconds": 0.3},
        "pruner": "none",
        "resources": {"gpus_per_trial": 2, "cpus_per_trial": 1},
    }
    name = create_study(write_space(tmp_path / "two.yaml", space), storage=sqlite_url)
    progress = run_study(name, storage=sqlite_url, n_trials=4, backend="ray", address=ray_address)
    assert progress.complete == 4
    assert _max_concurrent(optuna.load_study(study_name=name, storage=sqlite_url)) == GPUS // 2


@pytest.mark.parametrize(
    "client_env",
    [{"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 32}, {"RAY_AUTH_MODE": "disabled"}],
    ids=["wrong-token", "no-token"],
)
def test_the_cluster_refuses_clients_without_its_token(
    ray_address: str, tmp_path: Path, client_env: dict
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(tmp_path), **client_env)
    result = subprocess.run(
        [sys.executable, "-c", f"import ray; ray.init(address='{ray_address}')"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "ConnectionError" in result.stderr or "AuthenticationError" in result.stderr


def test_a_killed_ray_worker_fails_its_trial_which_is_retried(
    ray_address: str, sqlite_url: str, tmp_path: Path
) -> None:
    """kill -9 of the actor running a trial: that trial ends FAIL with the reason, a copy with
    the same params is retried, and the run still finishes its 4 trials."""
    space = {
        "params": {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
        "fixed": {"workload": "simulated", "steps": 20, "step_seconds": 0.25},
        "pruner": "none",
        "resources": {"gpus_per_trial": 1, "max_retries": 1},
    }
    name = create_study(write_space(tmp_path / "kill.yaml", space), storage=sqlite_url)
    study = optuna.load_study(study_name=name, storage=sqlite_url)
    run = subprocess.Popen(
        [
            *TUNER,
            "study",
            "run",
            name,
            "--backend",
            "ray",
            "--address",
            ray_address,
            "--n-trials",
            "4",
            "--storage",
            sqlite_url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    victim = None
    while victim is None and time.monotonic() < deadline:
        running = [
            t
            for t in study.get_trials(states=(TrialState.RUNNING,))
            if len(t.intermediate_values) >= 2
        ]
        victim = running[0] if running else None
        time.sleep(0.2)
    assert victim is not None, "no trial started training in time"
    os.kill(victim.user_attrs["worker_pid"], signal.SIGKILL)
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr

    trials = study.get_trials()
    failed = trials[victim.number]
    assert failed.state == TrialState.FAIL
    assert failed.user_attrs["fail_reason"].startswith("Ray worker died")
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].params == failed.params
    assert retries[0].state == TrialState.COMPLETE
    assert "fail_reason" not in retries[0].user_attrs
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 4
    assert all(t.state != TrialState.RUNNING for t in trials)
