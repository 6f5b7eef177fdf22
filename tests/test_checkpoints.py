"""A trial whose worker dies resumes from its last checkpoint, on any worker, and trains exactly
what an uninterrupted run would (real LoRA trials on the demo model, real stores)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from conftest import S3, TUNER, run_cli, s3_env, small_space, write_space
from optuna.trial import FrozenTrial, TrialState
from ray_nodes import RAY, RayNode, start_head

from tuner.common.errors import SpaceError
from tuner.core.study import create_study
from tuner.space import load_space

# Two processes run the Ray modules, two modules each (`ray`: test_ray and test_submit;
# `ray-nodes`: test_checkpoints and test_autoscaling): one chain of all four outlasted the
# rest of the suite, and more clusters at once than two starve each other on 2 cores.
pytestmark = [pytest.mark.ray, pytest.mark.xdist_group("ray-nodes")]

STEPS, EVERY = 40, 10
PARAMS = {"learning_rate": 3e-3, "lora_rank": 4, "lora_alpha": 8}


def _space(demo: Path, name: str, *, checkpoint_every: object) -> dict:
    space = small_space(
        demo,
        name=name,
        pruner="none",
        baseline=PARAMS,
        budget={"n_trials": 1},
        resources={"checkpoint_every": checkpoint_every, "max_retries": 1},
    )
    # Small steps evaluated often: a kill lands between checkpoints, and the learning curve
    # shows where a resumed trial picked up.
    space["fixed"] = {
        **space["fixed"],
        "max_steps": STEPS,
        "eval_steps": 5,
        "per_device_train_batch_size": 4,
    }
    space["params"] = {
        **space["params"],
        "lora_dropout": {"type": "float", "low": 0.05, "high": 0.1},
    }
    # Dropout draws random numbers: the RNG state must resume too.
    space["baseline"] = {**PARAMS, "lora_dropout": 0.1}
    return space


def _checkpointed(study: optuna.Study, timeout: float = 180) -> FrozenTrial:
    """The running trial once it has kept a checkpoint and trained past it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for trial in study.get_trials(states=(TrialState.RUNNING,)):
            saved = trial.user_attrs.get("checkpoint")
            if saved and max(trial.intermediate_values, default=0) > saved["step"]:
                return trial
        time.sleep(0.1)
    raise AssertionError("no trial kept a checkpoint in time")


def _local_run(name: str, url: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*TUNER, "study", "run", name, "--storage", url, "--jobs", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _leftover_checkpoints(root: Path) -> list[Path]:
    return [p for p in root.rglob("checkpoint-*") if p.is_file()]


def test_a_killed_workers_trial_resumes_from_its_checkpoint_and_trains_the_same(
    sqlite_url: str, demo_dir: Path, tmp_path: Path
) -> None:
    plain = create_study(
        write_space(tmp_path / "plain.yaml", _space(demo_dir, "plain", checkpoint_every=None)),
        storage=sqlite_url,
    )
    result = run_cli("study", "run", plain, "--storage", sqlite_url, "--jobs", "1")
    assert result.returncode == 0, result.stderr
    (reference,) = optuna.load_study(study_name=plain, storage=sqlite_url).trials
    assert reference.state == TrialState.COMPLETE

    name = create_study(
        write_space(tmp_path / "ckpt.yaml", _space(demo_dir, "ckpt", checkpoint_every=EVERY)),
        storage=sqlite_url,
    )
    study = optuna.load_study(study_name=name, storage=sqlite_url)
    run = _local_run(name, sqlite_url)
    victim = _checkpointed(study)
    os.kill(victim.user_attrs["worker_pid"], signal.SIGKILL)
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr

    trials = study.get_trials()
    assert trials[victim.number].state == TrialState.FAIL
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert retry.state == TrialState.COMPLETE and retry.params == reference.params
    resumed = retry.user_attrs["resumed_from_step"]
    assert resumed > 0 and resumed % EVERY == 0
    # The learning curve carries on: the steps before the checkpoint are the dead trial's,
    # the rest the retry's, and every value is the uninterrupted run's.
    assert sorted(retry.intermediate_values) == sorted(reference.intermediate_values)
    for step, value in reference.intermediate_values.items():
        assert retry.intermediate_values[step] == pytest.approx(value, abs=1e-4), step
    assert retry.value == pytest.approx(reference.value, abs=1e-4)
    # Exactly its budget, and the checkpoints are gone with the finished trial.
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 1
    assert retry.user_attrs["checkpoint"] is None
    assert _leftover_checkpoints(tmp_path) == []


def test_a_trial_nothing_will_resume_leaves_no_checkpoint(
    sqlite_url: str, demo_dir: Path, tmp_path: Path
) -> None:
    """A worker killed past its retries: its trial ends FAIL for good, and the run removes the
    checkpoint it kept (it would otherwise hold storage until the study is deleted)."""
    space = _space(demo_dir, "final", checkpoint_every=EVERY)
    space["resources"] = {**space["resources"], "max_retries": 0}
    name = create_study(write_space(tmp_path / "final.yaml", space), storage=sqlite_url)
    study = optuna.load_study(study_name=name, storage=sqlite_url)
    run = _local_run(name, sqlite_url)
    victim = _checkpointed(study)
    assert _leftover_checkpoints(tmp_path)  # kept while the trial ran
    os.kill(victim.user_attrs["worker_pid"], signal.SIGKILL)
    _, stderr = run.communicate(timeout=300)
    # Its one trial failed, so every trial of the run failed: an error the caller must see.
    assert run.returncode == 1 and "every one failed" in stderr, stderr
    (trial,) = study.get_trials()
    assert trial.state == TrialState.FAIL and trial.user_attrs["checkpoint"]["step"] > 0
    assert _leftover_checkpoints(tmp_path) == []


def test_checkpoint_every_takes_steps_or_a_duration(demo_files: Path, tmp_path: Path) -> None:
    steps = load_space(
        write_space(tmp_path / "a.yaml", _space(demo_files, "a", checkpoint_every=50))
    )
    assert (steps.resources.checkpoint_steps, steps.resources.checkpoint_seconds) == (50, None)
    timed = load_space(
        write_space(tmp_path / "b.yaml", _space(demo_files, "b", checkpoint_every="30m"))
    )
    assert (timed.resources.checkpoint_steps, timed.resources.checkpoint_seconds) == (None, 1800)
    for bad in (0, 2.5, "soon", True):
        path = write_space(tmp_path / "bad.yaml", _space(demo_files, "bad", checkpoint_every=bad))
        with pytest.raises(SpaceError, match="checkpoint_every"):
            load_space(path)


# ------------------------------------------------------------------ on Ray: an actor, a node


@dataclass
class Cluster:
    address: str
    workers: list[RayNode]  # two nodes of one logical GPU each, each in its own directory


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str) -> Iterator[Cluster]:
    """A head with no GPU and two worker nodes of one logical GPU, token auth on; each node
    runs in a working directory of its own and reaches the S3 server. Stopped by their process
    groups alone."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, **s3_env(s3_endpoint), "RAY_AUTH_MODE": "token", "PATH": path}
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    logs = tmp_path_factory.mktemp("ray-logs")
    head, address = start_head(
        "--num-gpus=0",
        "--num-cpus=1",
        env=env,
        temp_dir=Path(f"/tmp/ray-ckpt-{os.getpid()}"),  # Ray's socket paths must stay short
        log=logs / "head.log",
    )
    nodes = [head]
    try:
        for i in range(2):
            cwd = tmp_path_factory.mktemp(f"node{i}")
            nodes.append(
                RayNode(
                    f"--address={address}", "--num-gpus=1", "--num-cpus=2",
                    "--node-ip-address=127.0.0.1", env=env, log=logs / f"node{i}.log", cwd=cwd,
                )
            )  # fmt: skip
        saved = os.environ.get("RAY_AUTH_MODE")
        os.environ["RAY_AUTH_MODE"] = "token"
        yield Cluster(address, nodes[1:])
        os.environ.pop("RAY_AUTH_MODE") if saved is None else os.environ.update(RAY_AUTH_MODE=saved)
    finally:
        for node in reversed(nodes):
            node.stop()


def _ray_run(name: str, url: str, address: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [*TUNER, "study", "run", name, "--backend", "ray", "--address", address, "--storage", url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def _ray_space(demo: Path, name: str) -> dict:
    space = _space(demo, name, checkpoint_every=EVERY)
    space["budget"] = {"n_trials": 2}
    space["resources"] = {**space["resources"], "gpus_per_trial": 1, "cpus_per_trial": 1}
    return space


def _assert_resumed_within_budget(study: optuna.Study, victim: FrozenTrial) -> None:
    trials = study.get_trials()
    assert trials[victim.number].state == TrialState.FAIL
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert retry.state == TrialState.COMPLETE and retry.params == victim.params
    assert retry.user_attrs["resumed_from_step"] >= victim.user_attrs["checkpoint"]["step"] > 0
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 2
    assert all(t.state != TrialState.RUNNING for t in trials)


def test_a_killed_actors_trial_resumes_from_its_checkpoint_on_ray(
    ray_cluster: Cluster, pg_url: str, demo_dir: Path, tmp_path: Path
) -> None:
    name = create_study(
        write_space(tmp_path / "a.yaml", _ray_space(demo_dir, "actor")), storage=pg_url
    )
    study = optuna.load_study(study_name=name, storage=pg_url)
    run = _ray_run(name, pg_url, ray_cluster.address)
    victim = _checkpointed(study)
    os.kill(victim.user_attrs["worker_pid"], signal.SIGKILL)
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr
    _assert_resumed_within_budget(study, victim)


# Last in this module: it leaves the cluster one node short.
def test_a_trial_on_a_lost_node_resumes_from_its_checkpoint_on_another(
    ray_cluster: Cluster, pg_url: str, demo_dir: Path, tmp_path: Path, s3: S3
) -> None:
    """The whole node of a running trial goes at once, as a preempted spot instance does. No
    disk is shared: the checkpoint reaches the other node through the study's S3 location."""
    space = write_space(tmp_path / "n.yaml", _ray_space(demo_dir, "node"))
    name = create_study(space, storage=pg_url, artifacts=f"s3://{s3.bucket}/sweeps")
    study = optuna.load_study(study_name=name, storage=pg_url)
    run = _ray_run(name, pg_url, ray_cluster.address, env=s3.env)
    victim = _checkpointed(study)
    (node,) = [n for n in ray_cluster.workers if n.runs(victim.user_attrs["worker_pid"])]
    node.kill()
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr
    _assert_resumed_within_budget(study, victim)
    (retry,) = [
        t for t in study.get_trials() if t.system_attrs.get("failed_trial") == victim.number
    ]
    assert retry.user_attrs["worker_pid"] != victim.user_attrs["worker_pid"]  # the other node's
    # The adapters are there (the best kept), and no checkpoint is left once the trials ended.
    assert s3.listed("sweeps/") and not [k for k in s3.listed("sweeps/") if "checkpoint-" in k]
