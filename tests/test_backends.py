"""Where trials run on this machine: one GPU per worker when there are GPUs, and a Ctrl-C that
reaches a worker only where its trial can record it."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
from conftest import small_space, write_space
from optuna.trial import TrialState

from tuner.backends.base import RunPlan
from tuner.backends.local import assign_gpus, check_serves, visible_gpus
from tuner.common.errors import BackendError
from tuner.core.study import create_study, run_study
from tuner.space import Resources


def test_each_worker_gets_its_own_gpu_and_extra_jobs_share() -> None:
    assert assign_gpus(2, []) == [None, None]
    assert assign_gpus(2, ["0", "1", "2", "3"]) == ["0", "1"]
    assert assign_gpus(3, ["4", "6"]) == ["4", "6", "4"]


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 3")
    assert visible_gpus() == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []


def test_without_a_gpu_driver_there_is_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """No NVIDIA or AMD kernel driver: no GPU, learnt without importing torch in the driver."""
    from tuner.backends import local

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(local, "GPU_DRIVERS", ("/nonexistent/nvidia",))
    assert visible_gpus() == []


def test_the_local_backend_refuses_what_this_machine_cannot_train(
    sqlite_url: str, tmp_path: Path, demo_files: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One line at run start, before any worker starts (and DeepSpeed compiles anything): more
    GPUs per trial than this machine shows, or DeepSpeed where it is not installed."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU, on a GPU runner too
    eight = small_space(demo_files, name="eight", resources={"gpus_per_trial": 8})
    name = create_study(write_space(tmp_path / "eight.yaml", eight), storage=sqlite_url)
    with pytest.raises(BackendError) as error:
        run_study(name, storage=sqlite_url, n_trials=1)
    message = str(error.value)
    assert message.startswith(
        "resources.gpus_per_trial: 8 GPUs per trial, and this machine has 0 visible "
        "(CUDA_VISIBLE_DEVICES); the local backend cannot run it: run it with --backend ray"
    )
    assert "quickstart.yaml" in message and "\n" not in message
    assert optuna.load_study(study_name=name, storage=sqlite_url).get_trials() == []

    zero2 = small_space(demo_files, name="zero2", fixed={"deepspeed": "zero2"})
    name = create_study(write_space(tmp_path / "zero2.yaml", zero2), storage=sqlite_url)
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # how Python spells "not installed"
    with pytest.raises(BackendError, match=r"^fixed.deepspeed: zero2 needs DeepSpeed, which is "):
        run_study(name, storage=sqlite_url, n_trials=1)
    assert optuna.load_study(study_name=name, storage=sqlite_url).get_trials() == []


def test_what_the_local_backend_serves_without_a_gpu() -> None:
    """A trial of one GPU (the default: what a cluster would be asked for) or less runs on the
    CPU, bf16 included (torch computes it there); so do DeepSpeed trials (tests/test_study.py).
    More GPUs per trial than are visible are refused; as many are served, one GPU a trial."""
    for gpus, bf16 in ((1, True), (0.5, False), (0, True)):
        plan = RunPlan(
            "s", "sqlite://", 1, None, 1, resources=Resources(gpus_per_trial=gpus), bf16=bf16
        )
        check_serves(plan, [])
    two = RunPlan("s", "sqlite://", 1, None, 1, resources=Resources(gpus_per_trial=2))
    check_serves(two, ["0", "1"])
    with pytest.raises(BackendError, match="2 GPUs per trial, and this machine has 1 visible"):
        check_serves(two, ["0"])


@pytest.mark.slow
def test_an_interrupt_outside_a_trial_is_held_until_the_trial_records_it(
    sqlite_url: str, tmp_path: Path
) -> None:
    """Ctrl-C, forwarded to a worker while Optuna creates (or tells) a trial, does not break
    into Optuna's bookkeeping, where it once left a trial RUNNING with nothing recorded: it is
    held, and the trial meets it as it starts, ending FAIL with the reason."""
    space = {
        "params": {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
        "fixed": {"workload": "simulated", "simulated": {"steps": 2, "step_seconds": 0.01}},
    }
    name = create_study(write_space(tmp_path / "s.yaml", space), storage=sqlite_url)
    script = textwrap.dedent(f"""
        import os, signal
        from tuner.backends.local import _HeldInterrupts
        from tuner.backends.worker import Worker, WorkerSpec

        worker = Worker(WorkerSpec({name!r}, {sqlite_url!r}, "here", 0, 1))
        held = _HeldInterrupts()
        worker.objective.interruptible = held.trial
        os.kill(os.getpid(), signal.SIGINT)  # arrives between trials: held
        assert held.pending
        try:
            worker.run_one()
        except KeyboardInterrupt:
            print("interrupted")
    """)
    ran = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert ran.stdout.strip() == "interrupted", ran.stderr[-2000:]
    (trial,) = optuna.load_study(study_name=name, storage=sqlite_url).get_trials()
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs["fail_reason"] == "interrupted (Ctrl-C or a stop signal)"


def test_a_worker_trains_on_its_share_of_the_cpus_or_on_tuner_torch_threads(
    demo_files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch's threads in a worker are its share of the cores, unless TUNER_TORCH_THREADS says
    how many: on a machine shared with other work, threads that wait for a core spin on it (a
    tiny trial took 2.5× the CPU with 2 threads on 2 busy cores than with 1)."""
    import torch

    from tuner.space import load_space
    from tuner.trial.objective import Objective

    space = load_space(write_space(tmp_path / "s.yaml", small_space(demo_files)))
    objective = Objective(space, artifacts=str(tmp_path / "artifacts"))
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("TUNER_TORCH_THREADS", raising=False)
        objective.warm_up(threads=2)
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("TUNER_TORCH_THREADS", "1")
        objective.warm_up(threads=2)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_workers_of_a_training_run_fork_from_the_stack_and_others_spawn() -> None:
    """Where the fork server saves 6-7 s of imports a worker (training, no GPU, Linux), and
    where workers spawn: a GPU (CUDA does not survive the fork) or nothing heavy to import."""
    import importlib.util

    from tuner.backends.local import STACK, worker_context

    training = RunPlan("s", "sqlite://", 1, None, 1)
    simulated = RunPlan("s", "sqlite://", 1, None, 1, workload="simulated")
    assert worker_context(training, []).get_start_method() == "forkserver"
    assert worker_context(training, ["0"]).get_start_method() == "spawn"
    assert worker_context(simulated, []).get_start_method() == "spawn"
    # The server ignores a preload that does not import: a renamed module would cost silently.
    assert importlib.util.find_spec(STACK) is not None


DRIVER = """
import multiprocessing as mp, os, sys, time
from pathlib import Path
from tuner.backends import lifeline

def worker(driver, folder):
    lifeline.watch(driver, (Path(folder) / "gone").touch)
    (Path(folder) / "watching").touch()
    time.sleep(120)

if __name__ == "__main__":
    process = mp.get_context(sys.argv[1]).Process(target=worker, args=(os.getpid(), sys.argv[2]))
    process.start()
    print(process.pid, flush=True)
    time.sleep(120)
"""


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_a_worker_sees_its_driver_killed_however_it_started(method: str, tmp_path: Path) -> None:
    """`kill -9` of the driver alone: a spawned worker is re-parented; a forked one keeps its
    parent, the fork server, which the worker itself keeps alive. Both see the driver gone."""
    import os
    import signal
    import time

    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    driver = subprocess.Popen(
        [sys.executable, str(script), method, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    worker = int(driver.stdout.readline())
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "watching").exists():
            assert time.monotonic() < deadline and driver.poll() is None
            time.sleep(0.1)
        assert not (tmp_path / "gone").exists()
        driver.kill()
        driver.wait()
        deadline = time.monotonic() + 10
        while not (tmp_path / "gone").exists():
            assert time.monotonic() < deadline, "the worker never saw its driver gone"
            time.sleep(0.1)
    finally:
        driver.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)
