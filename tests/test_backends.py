"""Where trials run on this machine: one GPU per worker when there are GPUs, and a Ctrl-C that
reaches a worker only where its trial can record it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
from conftest import write_space
from optuna.trial import TrialState

from tuner.backends.local import assign_gpus, visible_gpus
from tuner.study import create_study


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
