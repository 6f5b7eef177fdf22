"""A driver off the cluster: `tuner study submit` and `--address http://HEAD:8265` run the sweep
as a Ray job through the job API, from a process that is no Ray node.

The cluster is one head that the module starts (tests/ray_nodes.py), with its job API on a port
of its own and token auth on, with a token of its own: the client gets it only as RAY_AUTH_TOKEN,
as a laptop or CI runner would. The client's environment has no RAY_ADDRESS and no RAY_AUTH_MODE,
and its RAY_TMPDIR is a test folder, so a Ray node started by mistake on the client leaves its
session folder there.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from conftest import TUNER, as_from_a_terminal, run_cli, write_space
from optuna.trial import TrialState
from ray_nodes import free_port, start_head

# Two processes run the Ray modules, two modules each (`ray`: test_ray and test_submit;
# `ray-nodes`: test_checkpoints and test_autoscaling): one chain of all four outlasted the
# rest of the suite, and more clusters at once than two starve each other on 2 cores.
pytestmark = [pytest.mark.ray, pytest.mark.xdist_group("ray")]

REPO = Path(__file__).resolve().parents[1]
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@dataclass(frozen=True)
class JobAPI:
    url: str  # http://127.0.0.1:PORT, what `--address` takes
    token: str


@pytest.fixture(scope="module")
def job_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JobAPI]:
    """One head for the module (a head with its job API takes a while on 2 cores), with 2
    logical GPUs; stopped by its own process group."""
    token = secrets.token_hex(32)  # its own: ~/.ray/auth_token, other clusters', is left alone
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # The cluster runs jobs' `python` from this environment, as a cluster image would.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PATH=path)
    port = free_port()
    logs = tmp_path_factory.mktemp("ray-logs")
    head, _ = start_head(
        "--num-gpus=2",
        "--num-cpus=4",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={port}",
        env=env,
        temp_dir=Path(f"/tmp/ray-submit-{os.getpid()}"),  # Ray's socket paths must stay short
        log=logs / "head.log",
    )
    api = JobAPI(f"http://127.0.0.1:{port}", token)
    try:
        _wait_for_job_api(api)
        yield api
    finally:
        head.stop()


def _request(api: JobAPI, path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(
        api.url + path,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {api.token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _wait_for_job_api(api: JobAPI, timeout: float = 180) -> None:
    """Until the head takes a job: its job agent starts a while after `ray start` returns
    (before, the API answers 500, "No available agent to submit job")."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _request(api, "/api/jobs/", {"entrypoint": "true"})
            return
        except OSError:  # refused, or an HTTP error
            assert time.monotonic() < deadline, "the head's job API did not come up"
            time.sleep(1)


def _job(api: JobAPI, job_id: str) -> dict:
    return _request(api, f"/api/jobs/{job_id}")


def _off_cluster_env(api: JobAPI, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_TOKEN=api.token, RAY_TMPDIR=str(tmp_path / "client-ray"), **extra)
    return env


def _tuner(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*TUNER, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def _no_local_ray(tmp_path: Path) -> None:
    sessions = list((tmp_path / "client-ray").rglob("session_*"))
    assert not sessions, f"the client started a Ray node of its own: {sessions}"


def _space(path: Path, *, n_trials: int, step_seconds: float = 0.1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_space(
        path,
        {
            "name": "offc",
            "params": {"learning_rate": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True}},
            "fixed": {
                "workload": "simulated",
                "simulated": {"steps": 4, "step_seconds": step_seconds},
                "seed": 0,
            },
            "pruner": {"name": "none"},
            "budget": {"n_trials": n_trials},
            "resources": {"gpus_per_trial": 1, "cpus_per_trial": 1},
        },
    )


def _finished(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=name, storage=url)
    return study.get_trials(states=FINISHED)


def test_study_submit_follow_runs_the_study_as_a_job_and_shows_its_log(
    job_api: JobAPI, pg_url: str, tmp_path: Path
) -> None:
    """`study submit --follow` from off the cluster: the job runs the study to the number of
    trials asked for, its log shows here, the command exits as the job did, and neither the
    password in the storage URL nor the shell's S3 secret key reaches the job (entrypoint,
    runtime env, metadata, log) or the output."""
    secret = "s3cret-pw"
    url = pg_url.replace("postgres@", f"postgres:{secret}@")
    space = _space(tmp_path / "offc.yaml", n_trials=10)
    assert run_cli("study", "create", "--space", str(space), "--storage", url).returncode == 0
    # The submitting shell's S3 secret stays there too: the nodes have their own credentials.
    s3_secret = "Sentinel-S3-Key-in-submit"
    env = _off_cluster_env(job_api, tmp_path, AWS_SECRET_ACCESS_KEY=s3_secret)
    done = _tuner(
        "study", "submit", "offc", "--address", job_api.url, "--storage", url,
        "--n-trials", "4", "--working-dir", str(REPO), "--follow", env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    job_id = done.stdout.splitlines()[0]
    assert "4 trials finished" in done.stdout  # the job's own line, from its log
    assert f"Ray job {job_id} succeeded" in done.stderr
    info = _job(job_api, job_id)
    assert info["status"] == "SUCCEEDED" and info["driver_exit_code"] == 0
    assert secret not in json.dumps(info) + done.stdout + done.stderr
    assert job_api.token not in json.dumps(info) + done.stdout + done.stderr
    assert s3_secret not in json.dumps(info) + done.stdout + done.stderr
    assert len(_finished(pg_url, "offc")) == 4
    _no_local_ray(tmp_path)


def test_sweep_run_with_an_http_address_runs_the_whole_sweep_as_a_job(
    job_api: JobAPI, pg_url: str, tmp_path: Path
) -> None:
    """`sweep run --backend ray --address http://...` is a foreground run: the whole sweep is
    the job (lock, promotion and summary on the cluster), its arguments arrive as given (a space
    path with a blank in it, the series name, the date, --out), its log shows here, and the
    command exits 0 once the sweep has run exactly its budget."""
    project = tmp_path / "project"
    _space(project / "my spaces" / "nightly.yaml", n_trials=4)
    out = tmp_path / "sweep out"
    env = _off_cluster_env(job_api, tmp_path)
    done = _tuner(
        "sweep", "run", "--space", "my spaces/nightly.yaml", "--name", "night.ly",
        "--backend", "ray", "--address", job_api.url, "--storage", pg_url,
        "--date", "2026-01-02", "--out", str(out), env=env, cwd=project,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "# Sweep night.ly-2026-01-02" in done.stdout  # the job's summary, from its log
    assert "trial 0 complete" in done.stdout  # the job's per-trial lines
    assert "champion promoted: the series' first champion" in done.stdout
    assert len(_finished(pg_url, "night.ly-2026-01-02")) == 4
    summary = json.loads((out / "night.ly-2026-01-02.json").read_text())  # --out on the cluster
    assert summary["trials"] == {"complete": 4} and summary["promoted"]
    _no_local_ray(tmp_path)


def test_the_command_exits_with_the_jobs_own_status(
    job_api: JobAPI, pg_url: str, tmp_path: Path
) -> None:
    """A job whose entrypoint fails: with --follow its status is the command's, and its lines
    show. The job runs the uploaded tree's tuner (`python -m tuner`), here one that fails with
    status 5."""
    space = _space(tmp_path / "offc.yaml", n_trials=2)
    assert run_cli("study", "create", "--space", str(space), "--storage", pg_url).returncode == 0
    tree = tmp_path / "tree"
    (tree / "tuner").mkdir(parents=True)
    (tree / "tuner" / "__init__.py").write_text("")
    (tree / "tuner" / "__main__.py").write_text(
        "import sys\nprint('the uploaded tuner ran:', sys.argv[1:3])\nsys.exit(5)\n"
    )
    env = _off_cluster_env(job_api, tmp_path)
    # Without --follow the job is left to run: the command prints its id and how to follow it.
    submitted = _tuner(
        "study", "submit", "offc", "--address", job_api.url, "--storage", pg_url,
        "--working-dir", str(tree), env=env, cwd=tmp_path,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert f"ray job logs --follow {job_id} --address {job_api.url}" in submitted.stderr
    deadline = time.monotonic() + 120
    while (info := _job(job_api, job_id))["status"] not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, "the job did not end in time"
        time.sleep(1)
    assert (info["status"], info["driver_exit_code"]) == ("FAILED", 5)

    done = _tuner(
        "study", "submit", "offc", "--address", job_api.url, "--storage", pg_url,
        "--working-dir", str(tree), "--follow", env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 5, done.stdout[-3000:] + done.stderr[-3000:]
    assert "the uploaded tuner ran: ['study', 'run']" in done.stdout
    assert "failed (exit 5)" in done.stderr
    assert _finished(pg_url, "offc") == []
    _no_local_ray(tmp_path)


class _Reader(threading.Thread):
    """Collects a stream's lines while the process runs."""

    def __init__(self, stream: object) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.lines: list[str] = []
        self.start()

    def run(self) -> None:
        for line in self.stream:  # type: ignore[attr-defined]
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)


def test_ctrl_c_stops_the_job_of_a_foreground_sweep(
    job_api: JobAPI, pg_url: str, tmp_path: Path
) -> None:
    """Ctrl-C on `sweep run --address http://...` stops its job on the cluster, as it would
    stop a local sweep: exit 130, the job STOPPED, the budget not run out."""
    project = tmp_path / "project"
    _space(project / "nightly.yaml", n_trials=40, step_seconds=0.5)
    env = _off_cluster_env(job_api, tmp_path)
    process = subprocess.Popen(
        [*TUNER, "sweep", "run", "--space", "nightly.yaml", "--backend", "ray",
         "--address", job_api.url, "--storage", pg_url, "--date", "2026-01-03"],
        cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=as_from_a_terminal,
    )  # fmt: skip
    out, err = _Reader(process.stdout), _Reader(process.stderr)
    try:
        deadline = time.monotonic() + 300
        while "trial 0 complete" not in out.text():  # the sweep runs on the cluster
            assert process.poll() is None, out.text()[-3000:] + err.text()[-3000:]
            assert time.monotonic() < deadline, "no trial finished in time"
            time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 130, err.text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
    out.join(10)
    err.join(10)
    job_id = next(line.split()[2] for line in err.lines if line.startswith("Ray job raysubmit_"))
    assert f"stopped Ray job {job_id}" in err.text()
    assert _job(job_api, job_id)["status"] == "STOPPED"
    assert len(_finished(pg_url, "offc-2026-01-03")) < 40
    _no_local_ray(tmp_path)


@pytest.mark.parametrize("wrong", ["address", "token"])
def test_a_bad_address_or_token_is_one_line_and_exit_2(
    job_api: JobAPI, wrong: str, tmp_path: Path
) -> None:
    """Nothing is submitted: one line that names the address, exit 2, no traceback."""
    space = _space(tmp_path / "offc.yaml", n_trials=2)
    address = f"http://127.0.0.1:{free_port()}" if wrong == "address" else job_api.url
    env = _off_cluster_env(job_api, tmp_path)
    if wrong == "token":
        env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    done = _tuner(
        "sweep", "run", "--space", str(space), "--backend", "ray", "--address", address,
        "--storage", f"sqlite:///{tmp_path / 'studies.db'}", env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error: cannot reach the Ray job API at {address}: ")
    if wrong == "token":
        assert "Authentication failed" in done.stderr
    assert not (tmp_path / "studies.db").exists()
