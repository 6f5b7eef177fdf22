"""Trials on a real local Ray cluster with logical GPUs and token authentication on."""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from conftest import TUNER, as_from_a_terminal, run_cli, small_space, write_space
from optuna.trial import TrialState
from ray_nodes import RAY, RayNode, start_head

from tuner.core.study import create_study, run_study

# Two processes run the Ray modules, two modules each (`ray`: test_ray and test_submit;
# `ray-nodes`: test_checkpoints and test_autoscaling): one chain of all four outlasted the
# rest of the suite, and more clusters at once than two starve each other on 2 cores.
pytestmark = [pytest.mark.ray, pytest.mark.xdist_group("ray")]

GPUS = 4


@dataclass(frozen=True)
class Cluster:
    address: str  # HOST:PORT of the head (what `tuner study run --address` takes)
    env: dict[str, str]
    logs: Path
    nodes: list[RayNode]  # what the module started, the head first; stopped at its end


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A head with 4 logical GPUs and token auth; RAY_ADDRESS points at it. The
    nodes the module starts are stopped by their process group alone (tests/ray_nodes.py)."""
    # The nodes run tuner from this environment, as a cluster image would.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": path}
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    logs = tmp_path_factory.mktemp("ray-logs")
    head, address = start_head(
        f"--num-gpus={GPUS}",
        "--num-cpus=8",
        "--include-dashboard=false",  # the job API's tests have their own head (test_submit.py)
        env=env,
        temp_dir=Path(f"/tmp/ray-tuner-{os.getpid()}"),  # Ray's socket paths must stay short
        log=logs / "head.log",
    )
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    os.environ.update(RAY_ADDRESS=address, RAY_AUTH_MODE="token")
    cluster = Cluster(address, env, logs, [head])
    try:
        yield cluster
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        import ray

        ray.shutdown()
        for node in reversed(cluster.nodes):
            node.stop()


@pytest.fixture
def ray_address(ray_cluster: Cluster) -> str:
    return ray_cluster.address


def _max_concurrent(study: optuna.Study) -> int:
    events = []
    for t in study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)):
        events += [(t.datetime_start, 1), (t.datetime_complete, -1)]
    running = peak = 0
    for _, delta in sorted(events):
        running += delta
        peak = max(peak, running)
    return peak


WATCHER = "tuner-test-watcher"


class _Connections(threading.Thread):
    """Counts the server's connections to one database while a sweep runs; once the first
    trial has finished, it drops them all, as a restarted server would."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        import sqlalchemy
        from sqlalchemy.pool import NullPool

        self.database = url.rsplit("/", 1)[1]
        # Autocommit: within one transaction, pg_stat_activity would show a frozen snapshot.
        self.engine = sqlalchemy.create_engine(
            url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT"
        )
        # Its own connections are named, and left out of the count.
        self.study_db = sqlalchemy.create_engine(
            url,
            isolation_level="AUTOCOMMIT",
            poolclass=NullPool,
            connect_args={"application_name": WATCHER},
        )
        self.peak = 0
        self.samples: list[int] = []
        self.dropped = 0
        self.dropped_at = 0.0
        self.done = threading.Event()

    def run(self) -> None:
        import sqlalchemy

        with self.engine.connect() as conn:
            while not self.done.wait(0.1):
                count = conn.execute(
                    sqlalchemy.text(
                        "select count(*) from pg_stat_activity "
                        "where datname = :d and application_name <> :w"
                    ),
                    {"d": self.database, "w": WATCHER},
                ).scalar()
                # Right after the drop, backends that are ending still show beside the new ones.
                if not self.dropped or time.monotonic() - self.dropped_at > 3:
                    self.peak = max(self.peak, count)
                    self.samples.append(count)
                if not self.dropped and self._a_trial_finished():
                    self.dropped = conn.execute(
                        sqlalchemy.text(
                            "select count(pg_terminate_backend(pid)) from pg_stat_activity "
                            "where datname = :d"
                        ),
                        {"d": self.database},
                    ).scalar()
                    self.dropped_at = time.monotonic()
        self.engine.dispose()

    def _a_trial_finished(self) -> bool:
        import sqlalchemy

        try:
            with self.study_db.connect() as db:
                finished = db.execute(
                    sqlalchemy.text(
                        "select count(*) from trials where state in ('COMPLETE', 'PRUNED')"
                    )
                ).scalar()
        except sqlalchemy.exc.ProgrammingError:  # the tables are not made yet
            return False
        return finished > 0


def test_a_ray_sweep_keeps_every_gpu_busy_and_never_more(
    ray_address: str, pg_url: str, tmp_path: Path
) -> None:
    """The shipped simulated space, run as a user would: one trial per logical GPU at a time,
    actors reused from trial to trial, intermediate values in the store for pruning. The store
    holds about one connection per running trial, and its connections dropped midway (a server
    restart) cost the sweep nothing."""
    created = run_cli(
        "study", "create", "--space", "simulated.yaml", "--storage", pg_url, cwd=tmp_path
    )
    assert created.returncode == 0, created.stderr
    connections = _Connections(pg_url)
    connections.start()
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
    connections.done.set()
    connections.join()
    assert ran.returncode == 0, ran.stderr
    assert "12 trials finished" in ran.stdout
    assert connections.dropped >= 2, "the sweep ended before they were dropped"
    # What the store's pools hold (tuner.store._rdb: one connection kept per opened store, one more
    # for a moment when a heartbeat meets a report): one store per actor; in the driver's process,
    # the run's (its progress monitor), the driver's, the feed's, and the run's lock. However
    # many trials: at most two per store, typically one, and the lock's.
    driver_stores = 3
    assert connections.peak <= 2 * (GPUS + driver_stores) + 1, connections.samples
    assert statistics.median(connections.samples) <= GPUS + driver_stores + 1, connections.samples

    study = optuna.load_study(study_name="simulated", storage=pg_url)
    trials = study.get_trials()
    assert len(trials) == 12 and all(t.state != TrialState.RUNNING for t in trials)
    failed = {t.number: t.user_attrs.get("fail_reason") for t in trials if t.state.name == "FAIL"}
    assert not failed, failed
    assert _max_concurrent(study) == GPUS
    workers = {t.user_attrs["worker"] for t in trials}
    assert len(workers) <= GPUS  # warm actors run trial after trial
    assert all(t.intermediate_values for t in trials)


def test_a_multi_gpu_trial_runs_as_one_job_and_all_its_ranks_stop_on_prune(
    ray_address: str, sqlite_url: str, tmp_path: Path
) -> None:
    """gpus_per_trial: 2 on 4 logical GPUs: two trials at once, each trained by two ranks in
    one process group. Rank 0 decides the prune, and both ranks stop at that same step."""
    space = {
        "params": {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
        # Trials long enough that both gangs overlap however slowly a loaded machine forms them.
        "fixed": {"workload": "simulated", "steps": 8, "step_seconds": 1.0},
        # One finished trial is enough to judge: the second slot may start a little later.
        "pruner": {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 2},
        "resources": {"gpus_per_trial": 2, "cpus_per_trial": 2},
    }
    name = create_study(write_space(tmp_path / "two.yaml", space), storage=sqlite_url)
    study = optuna.load_study(study_name=name, storage=sqlite_url)
    for lr in (1e-3, 1e-3, 1e-4):  # two good trials, then one the median pruner must stop
        study.enqueue_trial({"learning_rate": lr})
    progress = run_study(name, storage=sqlite_url, n_trials=4, backend="ray", address=ray_address)
    trials = study.get_trials()
    assert progress.finished == 4, [(t.number, t.state.name, t.user_attrs) for t in trials]
    assert _max_concurrent(study) == GPUS // 2
    weak = trials[2]
    assert weak.state == TrialState.PRUNED
    assert weak.user_attrs["rank_steps"] == [weak.last_step, weak.last_step]
    for t in trials:
        if t.state == TrialState.COMPLETE:
            assert t.user_attrs["rank_steps"] == [8, 8]


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


def test_a_hung_trial_is_ended_by_the_trial_timeout_on_ray(
    ray_address: str, sqlite_url: str, tmp_path: Path
) -> None:
    space = {
        "params": {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}},
        "fixed": {"workload": "simulated", "steps": 4, "step_seconds": 0.1, "hang_above_lr": 0.05},
        "pruner": "none",
        "resources": {"gpus_per_trial": 1, "trial_timeout": 4},
    }
    name = create_study(write_space(tmp_path / "hang.yaml", space), storage=sqlite_url)
    study = optuna.load_study(study_name=name, storage=sqlite_url)
    for lr in (0.08, 1e-3, 2e-3):
        study.enqueue_trial({"learning_rate": lr})
    run_study(name, storage=sqlite_url, n_trials=3, backend="ray", address=ray_address)
    trials = study.get_trials()
    assert len(trials) == 3  # not retried: it would hang again
    hung = trials[0]
    assert hung.state == TrialState.FAIL
    assert hung.user_attrs["fail_reason"] == "timed out after 4s (resources.trial_timeout)"
    assert [t.state for t in trials[1:]] == [TrialState.COMPLETE] * 2


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


def test_a_killed_driver_leaves_nothing_running_and_a_rerun_finishes_the_budget(
    ray_address: str, pg_url: str, tmp_path: Path
) -> None:
    """kill -9 of `tuner study run` mid-sweep takes its Ray actors with it; running it again
    fails the orphaned trials (reason recorded), retries them with the same params, and
    finishes exactly the budget, with no trial left RUNNING and no gap in the numbers."""
    space = {
        "params": {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
        "fixed": {"workload": "simulated", "steps": 30, "step_seconds": 0.25},
        "pruner": "none",
        "budget": {"n_trials": 6},
        "resources": {"gpus_per_trial": 1, "max_retries": 1},
    }
    name = create_study(write_space(tmp_path / "driver.yaml", space), storage=pg_url)
    study = optuna.load_study(study_name=name, storage=pg_url)
    command = [*TUNER, "study", "run", name, "--backend", "ray", "--address", ray_address]
    driver = subprocess.Popen(
        [*command, "--storage", pg_url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    orphans: list = []
    while len(orphans) < GPUS and time.monotonic() < deadline:
        orphans = [
            t for t in study.get_trials(states=(TrialState.RUNNING,)) if t.intermediate_values
        ]
        time.sleep(0.2)
    assert len(orphans) == GPUS, "the trials did not start training in time"
    driver.kill()
    driver.wait()
    _wait_until_gone(
        [t.user_attrs["worker_pid"] for t in orphans]
    )  # Ray ends a dead driver's actors

    rerun = run_cli(*command[1:], "--storage", pg_url)
    assert rerun.returncode == 0, rerun.stderr

    trials = study.get_trials()
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    assert all(t.state != TrialState.RUNNING for t in trials)
    for orphan in orphans:
        failed = trials[orphan.number]
        assert failed.state == TrialState.FAIL and "killed" in failed.user_attrs["fail_reason"]
        (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == orphan.number]
        assert retry.state == TrialState.COMPLETE and retry.params == failed.params
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 6


def _wait_until_gone(pids: list[int], timeout: float = 60) -> None:
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p)]
        alive = [p for p in alive if psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return
        time.sleep(0.5)
    raise AssertionError(f"worker processes {alive} outlived their driver")


def test_a_real_lora_trial_trains_on_two_ranks_through_ray(
    ray_address: str, sqlite_url: str, demo_dir: Path, tmp_path: Path
) -> None:
    """The real SFT workload, as one DDP job of two ranks (gloo on CPU, NCCL on GPUs): both
    train every step, and rank 0 stores the adapter."""
    space = small_space(
        demo_dir, name="ddp", pruner="none", resources={"gpus_per_trial": 2, "cpus_per_trial": 2}
    )
    space["fixed"] = {**space["fixed"], "max_steps": 6, "eval_steps": 3, "logging_steps": 3}
    name = create_study(write_space(tmp_path / "ddp.yaml", space), storage=sqlite_url)
    progress = run_study(name, storage=sqlite_url, n_trials=1, backend="ray", address=ray_address)
    assert progress.complete == 1
    (trial,) = optuna.load_study(study_name=name, storage=sqlite_url).get_trials()
    assert trial.user_attrs["rank_steps"] == [6, 6]
    assert trial.user_attrs["steps"] == 6 and set(trial.user_attrs["adapter"]) == {
        "adapter_config.json",
        "adapter_model.safetensors",
    }


def test_a_two_rank_trial_keeps_checkpoints_of_every_rank_through_ray(
    ray_address: str, sqlite_url: str, demo_dir: Path, tmp_path: Path
) -> None:
    """Checkpoints of a DDP trial: every rank saves its part at the same step (a barrier, then
    rank 0 records it), the trial finishes, and its checkpoints go with it."""
    space = small_space(
        demo_dir,
        name="ddp_ckpt",
        pruner="none",
        resources={"gpus_per_trial": 2, "cpus_per_trial": 2, "checkpoint_every": 2},
    )
    space["fixed"] = {**space["fixed"], "max_steps": 6, "eval_steps": 3, "logging_steps": 3}
    name = create_study(write_space(tmp_path / "ddp.yaml", space), storage=sqlite_url)
    progress = run_study(name, storage=sqlite_url, n_trials=1, backend="ray", address=ray_address)
    assert progress.complete == 1
    (trial,) = optuna.load_study(study_name=name, storage=sqlite_url).get_trials()
    assert trial.user_attrs["rank_steps"] == [6, 6]
    assert trial.user_attrs["checkpoint"] is None  # kept while it ran, removed at its end
    assert not [p for p in tmp_path.rglob("checkpoint-*") if p.is_file()]


# Last in this module: it leaves the cluster with 2 more GPUs.
def test_a_node_that_joins_mid_sweep_gets_trials(
    ray_cluster: Cluster, sqlite_url: str, tmp_path: Path
) -> None:
    """Six trials at once on a cluster with room for four: two wait, and a node that joins
    mid-sweep runs them beside the first four. The sweep has more trials than it will run, so a
    node that starts slowly on a busy machine still finds work; the test ends it with ctrl-c
    once six trials run at once."""
    space = {
        "params": {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
        "fixed": {"workload": "simulated", "steps": 10, "step_seconds": 0.5},
        "pruner": "none",
    }
    name = create_study(write_space(tmp_path / "join.yaml", space), storage=sqlite_url)
    study = optuna.load_study(study_name=name, storage=sqlite_url)
    # Its output to a file: a pipe read only at the end fills with progress lines within a
    # minute, and the run, blocked writing to it, stops handing out trials.
    log = tmp_path / "run.log"
    run = subprocess.Popen(
        [*TUNER, "study", "run", name, "--backend", "ray", "--address", ray_cluster.address,
         "--n-trials", "10000", "--jobs", str(GPUS + 2), "--storage", sqlite_url],
        stdout=subprocess.DEVNULL, stderr=log.open("w"), preexec_fn=as_from_a_terminal,
    )  # fmt: skip
    try:
        _wait_for_running(study, GPUS, run)
        ray_cluster.nodes.append(
            RayNode(
                f"--address={ray_cluster.address}", "--num-gpus=2", "--num-cpus=2",
                "--node-ip-address=127.0.0.1", env=ray_cluster.env,
                log=ray_cluster.logs / "joined.log",
            )
        )  # fmt: skip
        # Six at once, read from the trials' start and end: at any one instant a slot may be
        # between two trials, the more so on a loaded machine.
        deadline = time.monotonic() + 180
        while _max_concurrent(study) < GPUS + 2:
            assert run.poll() is None, "the sweep ended before six trials ran at once"
            assert time.monotonic() < deadline, "six trials never ran at once"
            time.sleep(0.5)
    finally:
        run.send_signal(signal.SIGINT)
        run.wait(timeout=300)
    assert run.returncode == 130, log.read_text()[-3000:]
    assert not study.get_trials(states=(TrialState.RUNNING,))
    assert _max_concurrent(study) <= GPUS + 2  # never more trials than GPUs


def _wait_for_running(study: optuna.Study, count: int, run: subprocess.Popen) -> None:
    deadline = time.monotonic() + 180
    while len(study.get_trials(states=(TrialState.RUNNING,))) < count:
        assert run.poll() is None, f"the sweep ended before {count} trials ran at once"
        assert time.monotonic() < deadline, f"{count} trials never ran at once"
        time.sleep(0.2)
