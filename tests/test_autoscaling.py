"""A sweep on a cluster that grows on demand: slots wait for room and ask for it, trials start as
nodes join, and a trial that fits no node fails the run with one line instead of "0 trials".

The driver's side runs on threads (fast, exact); the Ray side on Ray's own fake multi-node
autoscaler: a head without GPUs whose autoscaler launches worker nodes of 2 logical GPUs, from
0 up to 2, as processes on this machine.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
from conftest import TUNER, write_space
from optuna.trial import TrialState
from ray_nodes import RAY, RayNode, start_autoscaling_head
from test_driver import ThreadBackend, ThreadSlot, _study
from test_ray import _max_concurrent

from tuner.backends import driver
from tuner.backends.base import RunPlan
from tuner.common.errors import BackendError
from tuner.core.study import create_study, run_study
from tuner.space import Resources

# Two processes run the Ray modules, two modules each (`ray`: test_ray and test_submit;
# `ray-nodes`: test_checkpoints and test_autoscaling): one chain of all four outlasted the
# rest of the suite, and more clusters at once than two starve each other on 2 cores.
pytestmark = [pytest.mark.ray, pytest.mark.xdist_group("ray-nodes")]

# ------------------------------------------------------------------------------ the driver


class GrowingBackend(ThreadBackend):
    """An elastic place of `room` slots that a test grows, as an autoscaler would: a slot
    started beyond the room waits until there is room for it."""

    elastic = True

    def __init__(self, *, room: int) -> None:
        super().__init__(slots=room)
        self.room = room
        self.holding: list[WaitingSlot] = []  # the slots placed, alive
        self.handed_unplaced = 0  # trials handed to a slot still waiting: must stay 0
        self.withdrawn = 0  # slots killed while they waited
        self.peak = 0

    def capacity(self, plan: RunPlan) -> int:
        return self.room

    def start(self, plan: RunPlan, index: int) -> WaitingSlot:
        self.started += 1
        return WaitingSlot(self, plan, index, fails=False)

    def unplaced(self, plan: RunPlan) -> str:
        return f"a trial asks for 1 thread; the place has {self.room}"


class WaitingSlot(ThreadSlot):
    backend: GrowingBackend

    def placed(self) -> bool:
        backend = self.backend
        if self not in backend.holding and len(backend.holding) < backend.room:
            backend.holding.append(self)
            backend.peak = max(backend.peak, len(backend.holding))
        return self in backend.holding

    def run(self, params: dict[str, Any] | None) -> None:
        if self not in self.backend.holding:
            self.backend.handed_unplaced += 1
        super().run(params)

    def kill(self) -> None:
        if self in self.backend.holding:
            self.backend.holding.remove(self)
        else:
            self.backend.withdrawn += 1
        super().kill()


def test_slots_wait_for_room_and_the_run_finishes_exactly_its_trials(
    sqlite_url: str, tmp_path: Path
) -> None:
    """From no room at all to 2 slots, then 3: every trial runs on a placed slot, the waiting
    slots past the trials left are withdrawn, none of that is a death, and exactly 6 trials
    run. Waiting (7 s) is not running: a trial timeout of 6 s ends no trial (of 1 s, and a few
    more on a loaded machine)."""
    study = _study(tmp_path, sqlite_url, (), step_seconds=0.5)
    backend = GrowingBackend(room=0)
    resources = Resources(trial_timeout=6, lookahead=0)
    plan = RunPlan(study.study_name, sqlite_url, 6, None, None, resources=resources)

    def grow() -> None:  # the second step comes while the first trials still run (1 s each)
        time.sleep(7)
        backend.room = 2
        time.sleep(0.4)
        backend.room = 3

    threading.Thread(target=grow, daemon=True).start()
    run = driver.Driver(backend, plan)
    run.run()

    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * 6
    assert backend.started == 6  # as many slots as the run could use, asked for at once
    assert backend.handed_unplaced == 0
    assert backend.withdrawn == 3 and backend.peak == 3
    assert run.deaths == 0


def test_no_room_within_the_placement_timeout_fails_the_run(
    sqlite_url: str, tmp_path: Path
) -> None:
    study = _study(tmp_path, sqlite_url, ())
    backend = GrowingBackend(room=0)
    resources = Resources(lookahead=0, placement_timeout=2)
    plan = RunPlan(study.study_name, sqlite_url, 3, None, None, resources=resources)
    began = time.monotonic()
    with pytest.raises(BackendError) as error:
        driver.run(backend, plan)
    assert str(error.value) == (
        "no trial could be placed in 2 s (resources.placement_timeout): "
        "a trial asks for 1 thread; the place has 0"
    )
    assert time.monotonic() - began < 10
    assert study.get_trials() == []
    assert backend.withdrawn == 3  # the waiting slots are withdrawn with the run


def test_a_long_sweep_keeps_max_waiting_slots_waiting_not_one_per_trial(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 10,000-trial sweep on a place with room for 2: 2 slots run and MAX_WAITING more wait
    (what asks an autoscaler for nodes), not a slot per trial: 10,000 placement groups, which
    the driver took minutes to even ask for. (MAX_WAITING made 4 here: each slot of this test
    opens the study in this process.)"""
    monkeypatch.setattr(driver, "MAX_WAITING", 4)
    study = _study(tmp_path, sqlite_url, (), step_seconds=0.2)
    backend = GrowingBackend(room=2)
    plan = RunPlan(
        study.study_name, sqlite_url, 10_000, 5.0, None, resources=Resources(lookahead=0)
    )
    driver.Driver(backend, plan).run()
    assert backend.started == 2 + 4
    assert backend.withdrawn == 4  # with the run, past its timeout
    assert backend.handed_unplaced == 0 and backend.peak == 2
    assert study.get_trials(states=(TrialState.COMPLETE,))


# ------------------------------------------------------------------------------ on Ray


@dataclass(frozen=True)
class Autoscaling:
    address: str
    env: dict[str, str]
    head: RayNode


@pytest.fixture(scope="module")
def autoscaling(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Autoscaling]:
    """A head with no GPUs and 2 CPUs; its autoscaler launches nodes of 2 GPUs and 2 CPUs, at
    least 0, at most 2. Token auth on. Stopped by the head's process group alone, which holds
    the nodes its autoscaler launched (tests/ray_nodes.py)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": path}
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    logs = tmp_path_factory.mktemp("ray-autoscaling")
    head, address = start_autoscaling_head(
        {"gpu_node": {"resources": {"CPU": 2, "GPU": 2}, "max_workers": 2}},
        head_cpus=2,
        env=env,
        temp_dir=Path(f"/tmp/ray-tuner-as-{os.getpid()}"),  # Ray's socket paths must stay short
        log=logs / "head.log",
    )
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "token"
    try:
        yield Autoscaling(address, env, head)
    finally:
        import ray

        ray.shutdown()
        head.stop()
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved


def _space(tmp_path: Path, gpus: int, **resources: object) -> Path:
    space = {
        "params": {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
        "fixed": {"workload": "simulated", "simulated": {"steps": 8, "step_seconds": 1.0}},
        "pruner": "none",
        "resources": {"gpus_per_trial": gpus, "cpus_per_trial": 1, **resources},
    }
    return write_space(tmp_path / f"gpus{gpus}.yaml", space)


def _left_placement_groups() -> list[str]:
    import ray

    table = ray.util.placement_group_table()
    return [pg["state"] for pg in table.values() if pg["state"] != "REMOVED"]


def test_a_sweep_from_zero_gpus_scales_up_and_finishes_its_trials(
    autoscaling: Autoscaling,
    sqlite_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No GPU in the cluster when the run starts: its 6 waiting slots ask the autoscaler, which
    launches both GPU nodes; 6 trials finish, 4 at a time at the peak (2 nodes × 2 GPUs, the
    head has none), and nothing the run asked for is left standing."""
    import ray

    name = create_study(_space(tmp_path, 1), storage=sqlite_url)
    caplog.set_level("INFO", logger="tuner")
    began = time.monotonic()
    progress = run_study(
        name, storage=sqlite_url, n_trials=6, backend="ray", address=autoscaling.address
    )
    took = time.monotonic() - began

    study = optuna.load_study(study_name=name, storage=sqlite_url)
    assert progress.complete == 6
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * 6
    gpu_nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU") == 2]
    assert len(gpu_nodes) == 2
    assert _max_concurrent(study) == 4  # both new nodes ran trials at once
    assert _left_placement_groups() == []

    messages = [r.getMessage() for r in caplog.records]
    assert "waiting for the autoscaler: asked for 6 × {GPU: 1, CPU: 1}" in messages
    (placed,) = [r for r in caplog.records if r.getMessage().startswith("first trial placed")]
    waited = float(re.fullmatch(r"first trial placed after ([\d.]+) s", placed.getMessage())[1])
    asked = placed.created - waited  # the first request, as the driver counts it
    first = min(t.datetime_start for t in study.get_trials()).timestamp()
    print(
        f"\nautoscaling from 0 GPUs: first slot placed {waited:.1f} s after the first request, "
        f"first trial began on a new node {first - asked:.1f} s after it; "
        f"6 trials in {took:.1f} s"
    )


def test_a_trial_bigger_than_any_node_fails_the_run_with_one_line(
    autoscaling: Autoscaling, sqlite_url: str, tmp_path: Path
) -> None:
    """4 GPUs a trial, nodes of 2: the CLI exits 2 within the placement timeout, saying what a
    trial asks for and the most any node offered; no trial was created."""
    name = create_study(_space(tmp_path, 4, placement_timeout=8), storage=sqlite_url)
    began = time.monotonic()
    result = subprocess.run(
        [*TUNER, "study", "run", name, "--backend", "ray", "--address", autoscaling.address,
         "--n-trials", "2", "--storage", sqlite_url],
        env=autoscaling.env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    took = time.monotonic() - began
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert re.fullmatch(
        r"error: no trial could be placed in 8 s \(resources\.placement_timeout\): a trial asks "
        r"for 4 GPU \+ 1 CPU on one node; the most any node offered is [0-2] GPU, 2 CPU",
        errors[0],
    ), errors[0]
    assert "Traceback" not in result.stderr
    print(f"\n{errors[0]} (after {took:.1f} s)")
    assert took < 120
    assert optuna.load_study(study_name=name, storage=sqlite_url).get_trials() == []


def test_a_failed_placement_withdraws_what_it_asked_for(
    autoscaling: Autoscaling, sqlite_url: str, tmp_path: Path
) -> None:
    """In the driver's own process (whose Ray connection outlives the run): after the
    placement timeout, no placement group of the run is left pending."""
    name = create_study(_space(tmp_path, 4, placement_timeout=4), storage=sqlite_url)
    with pytest.raises(BackendError, match="a trial asks for 4 GPU"):
        run_study(name, storage=sqlite_url, n_trials=3, backend="ray", address=autoscaling.address)
    assert _left_placement_groups() == []
