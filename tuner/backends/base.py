"""The one extension point for where trials run: a backend starts, polls and kills slots.

A slot is what runs one trial at a time and stays warm between trials (a worker process here, a
Ray actor or a gang of them there). Everything else (how many trials, when to stop, what a death
costs) is the driver's (tuner/backends/driver.py), the same for every backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from tuner.space import Budget, Resources


@dataclass(frozen=True)
class RunPlan:
    """One `run_study` call, as the driver and a backend receive it: the run's own facts, and
    the space's `resources` and `budget` as the space holds them. Their defaults are the space
    models' own, so that a plan built without a space (a test, a benchmark) runs as a space that
    leaves them out would."""

    study_name: str
    storage_url: str
    n_trials: int | None  # trials to finish in this run; None: until timeout or interrupted
    timeout: float | None  # seconds after which no new trial starts; running ones finish
    jobs: int | None  # trials at once; None: the backend's own (local 1, Ray what the run can use)
    # What a trial asks of a cluster, and what a death, a hang, a wait for room or a run of
    # failures alike costs (tuner.space.Resources).
    resources: Resources = field(default_factory=Resources)
    # The driver reads its `gpu_hours`: no trial starts once the study's trials held that much.
    # Its `n_trials` and `timeout` are the study's; this run's are the fields above, which
    # `run_study` derived from them.
    budget: Budget = field(default_factory=Budget)
    # What a trial needs of the machine it trains on (the local backend checks them at start):
    # the space's `fixed`, not its resources.
    bf16: bool = False
    workload: str = "sft"  # the space's `fixed.workload`: how a local worker starts depends on it
    deepspeed: str | None = None  # the trial's DeepSpeed config, which needs deepspeed there
    # Which run this is, among the study's runs at once (tuner/store/_runs.py): recorded on each of
    # its trials, and added to every seed of its samplers.
    run: str = ""
    seed_offset: int = 0

    @property
    def ranks(self) -> int:
        """Processes that train one trial: one per GPU when it needs several."""
        gpus = self.resources.gpus_per_trial
        return int(gpus) if gpus > 1 else 1

    def feed_depth(self, slots: int) -> int:
        """How many suggestions the driver keeps ready for `slots` trials at once."""
        if self.resources.lookahead is not None:
            return self.resources.lookahead
        return max(1, slots)


@dataclass(frozen=True)
class Ran:
    """What a worker says after running one trial."""

    trial_id: int | None  # None: no trial began (the store failed first)
    requeued: bool = False  # another process failed it as stale and enqueued its retry


@dataclass(frozen=True)
class Ended:
    """How a slot's trial ended, as its backend saw it."""

    ran: Ran | None = None  # the worker's own word; None when it died
    died: str | None = None  # why the worker died, for the trial's fail reason
    retry: bool = True  # whether a trial that died with its worker may be retried
    reusable: bool = True  # False: the slot cannot take another trial and is replaced


class Slot(Protocol):
    """Runs one trial at a time, reusing its warm state (the base model) from trial to trial."""

    worker: str  # unique per slot: recorded on each trial it runs (`worker` user attr)

    def run(self, params: dict[str, Any] | None) -> None:
        """Start one trial (fed `params`, or sampled by the worker when None); returns at once."""

    def placed(self) -> bool:
        """Whether the slot holds its resources, so that a trial handed to it runs (after the
        slot's warm-up). False while it waits for room: a Ray slot waits for the autoscaler."""

    def poll(self) -> Ended | None:
        """How the trial ended, or None while it runs (or the slot is still starting)."""

    def interrupt(self) -> bool:
        """Ask the running trial to stop (it ends FAIL, "interrupted"); returns at once, and
        whether it could ask. The driver waits a grace period for the slots it could ask, and
        kills the others at once."""

    def kill(self) -> None:
        """End the slot now, and release what it holds."""


class Backend(Protocol):
    """A place where slots run.

    Contract: `start` returns a slot that runs what it is given, one trial at a time, each
    trial recording the slot's `worker` id; `poll` reports a worker that died (its process or
    node gone) as `Ended(died=...)`. On an `elastic` place a slot may start before there is room
    for it, and `placed` stays False until there is. The driver does the rest.
    """

    # Whether slots may start beyond the room, and wait for it: on a cluster that grows on
    # demand, a waiting slot is what asks for the room (the driver then starts as many as the
    # run can use); elsewhere the driver starts only what `capacity` says fits.
    elastic: bool

    def open(self, plan: RunPlan) -> None:
        """Connect to the place (called once, before anything else)."""

    def capacity(self, plan: RunPlan) -> int:
        """How many slots of `plan` the place holds now."""

    def start(self, plan: RunPlan, index: int) -> Slot | None:
        """A new slot, number `index` among the run's slots; None when there is no room now."""

    def wait(self, slots: list[Slot], timeout: float) -> None:
        """Return when one of `slots` may have ended or been placed, or after `timeout` s."""

    def unplaced(self, plan: RunPlan) -> str:
        """Why no slot could be placed, in one line: what a trial asks for, and the most any
        place (node) offered while the run waited."""

    def close(self) -> None:
        """Release what `open` took."""
