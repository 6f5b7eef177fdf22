"""The driver's policy, made deterministic with a third backend: slots that are threads of this
process, each running tuner's own worker against a real SQLite store, whose start and failures
the test controls. It is also what a new backend looks like: the whole of it is below."""

from __future__ import annotations

import queue
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import optuna
import pytest
from conftest import write_space
from optuna.trial import TrialState

from tuner.backends import driver
from tuner.backends.base import Ended, RunPlan
from tuner.backends.worker import Worker, WorkerSpec
from tuner.core.study import create_study
from tuner.space import Resources

_STOP = object()


class ThreadBackend:
    """`slots` slots, each a thread; a slot waits `start_delay_s` before its worker starts (a
    base model loading), and the first `failed_starts` slots fail to start at all."""

    elastic = False

    def __init__(self, *, slots: int, start_delay_s: float = 0.0, failed_starts: int = 0) -> None:
        self.slots = slots
        self.start_delay_s = start_delay_s
        self.failed_starts = failed_starts
        self.started = 0
        self.changed = threading.Event()

    def open(self, plan: RunPlan) -> None:
        pass

    def capacity(self, plan: RunPlan) -> int:
        return self.slots

    def start(self, plan: RunPlan, index: int) -> ThreadSlot:
        self.started += 1
        fails = self.started <= self.failed_starts
        return ThreadSlot(self, plan, index, fails=fails)

    def wait(self, slots: list[ThreadSlot], timeout: float) -> None:
        self.changed.wait(timeout)
        self.changed.clear()

    def unplaced(self, plan: RunPlan) -> str:
        return "threads always start"

    def close(self) -> None:
        pass


class ThreadSlot:
    def __init__(self, backend: ThreadBackend, plan: RunPlan, index: int, *, fails: bool) -> None:
        self.backend = backend
        self.worker = f"thread-{uuid.uuid4().hex[:8]}"
        self.inbox: queue.Queue = queue.Queue()
        self.outcome: Ended | None = None
        spec = WorkerSpec(plan.study_name, plan.storage_url, self.worker, index, threads=1)
        threading.Thread(target=self._serve, args=(spec, fails), daemon=True).start()

    def _serve(self, spec: WorkerSpec, fails: bool) -> None:
        time.sleep(self.backend.start_delay_s)
        if fails:
            self._end(Ended(died="could not start"))
            return
        worker = Worker(spec)
        while (params := self.inbox.get()) is not _STOP:
            self._end(Ended(ran=worker.run_one(params)))

    def _end(self, ended: Ended) -> None:
        self.outcome = ended
        self.backend.changed.set()

    def run(self, params: dict[str, Any] | None) -> None:
        self.inbox.put(params)

    def placed(self) -> bool:
        return True

    def poll(self) -> Ended | None:
        ended, self.outcome = self.outcome, None
        return ended

    def interrupt(self) -> bool:
        return False

    def kill(self) -> None:
        self.inbox.put(_STOP)


def _study(
    tmp_path: Path, url: str, lrs: tuple[float, ...], step_seconds: float = 0.05
) -> optuna.Study:
    space = {
        "params": {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}},
        "fixed": {"workload": "simulated", "simulated": {"steps": 2, "step_seconds": step_seconds}},
        "pruner": "none",
    }
    name = create_study(write_space(tmp_path / "s.yaml", space), storage=url)
    study = optuna.load_study(study_name=name, storage=url)
    for lr in lrs:
        study.enqueue_trial({"learning_rate": lr})
    return study


LRS = (1e-3, 2e-3, 3e-3)


@pytest.mark.slow
def test_a_slot_slower_to_start_than_the_trial_timeout_keeps_its_trial(
    sqlite_url: str, tmp_path: Path
) -> None:
    """The timeout counts from when a trial began, not from when its slot was asked: a slot
    that loads for longer than `trial_timeout` is not killed, no hand-out is lost, and every
    enqueued trial runs (seen in CI on a loaded box: one was left WAITING)."""
    study = _study(tmp_path, sqlite_url, LRS)
    # A trial takes 0.1 s of steps, a loaded machine's store writes aside: 4 s is far off.
    resources = Resources(trial_timeout=4.0, lookahead=0)
    plan = RunPlan(study.study_name, sqlite_url, 3, None, 2, resources=resources)
    driver.run(ThreadBackend(slots=2, start_delay_s=8.0), plan)

    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert [t.params["learning_rate"] for t in trials] == list(LRS)


def test_a_worker_that_dies_before_its_trial_begins_gives_its_turn_back(
    sqlite_url: str, tmp_path: Path
) -> None:
    """Its hand-out became no trial: the next slot takes it, and the count stays exact."""
    study = _study(tmp_path, sqlite_url, LRS)
    plan = RunPlan(study.study_name, sqlite_url, 3, None, 2, resources=Resources(lookahead=0))
    backend = ThreadBackend(slots=2, failed_starts=1)
    driver.run(backend, plan)

    trials = study.get_trials()
    assert backend.started == 3  # the failed slot was replaced
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert [t.params["learning_rate"] for t in trials] == list(LRS)


def test_out_of_memory_and_divergence_are_not_a_broken_set_up() -> None:
    """Trials that run out of memory or diverge fail with the same line again and again near a
    batch or learning-rate edge; that is the params' doing, which the sampler steers away from,
    so they never stop the run as alike failures do. Any other error counts."""
    from tuner.store import attrs

    def failed(reason: str, detail: str | None = None) -> optuna.trial.FrozenTrial:
        said = {attrs.FAIL_REASON: reason} | ({attrs.FAIL_DETAIL: detail} if detail else {})
        return optuna.trial.create_trial(state=TrialState.FAIL, user_attrs=said)

    oom = "CUDA out of memory (at per-device batch 1, already halved once)"
    assert driver._own_error(failed("oom", oom)) is None
    assert driver._own_error(failed("nan", "loss is nan at step 3")) is None
    assert driver._own_error(failed("OSError: no file named model.safetensors")) == (
        "OSError: no file named model.safetensors",
    )
    complete = optuna.trial.create_trial(state=TrialState.COMPLETE, value=1.0)
    assert driver._own_error(complete) is None
