"""The one extension point for where trials run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class RunPlan:
    """One `run_study` call, as a backend receives it."""

    study_name: str
    storage_url: str
    n_trials: int | None  # trials to finish in this run; None: until timeout or interrupted
    timeout: float | None  # seconds after which no new trial starts; running ones finish
    jobs: int  # trials at once (local backend)
    gpus_per_trial: float = 1  # what a trial asks of a cluster (Ray backend)
    cpus_per_trial: float = 1
    max_retries: int = 2  # retries of a trial whose worker died
    gpu_hours: float | None = None  # no trial starts once the study's trials held this much
    trial_timeout: float | None = None  # a trial running longer is killed and failed
    lookahead: int | None = None  # suggestions the driver keeps ready; None: by the slots

    @property
    def ranks(self) -> int:
        """Processes that train one trial: one per GPU when it needs several."""
        return int(self.gpus_per_trial) if self.gpus_per_trial > 1 else 1

    def feed_depth(self, slots: int) -> int:
        """How many suggestions the driver keeps ready for `slots` trials at once."""
        if self.lookahead is not None:
            return self.lookahead
        return max(1, slots)


class Backend(Protocol):
    """Runs the trials of a plan against the study store, and returns when they are done.

    Contract:
    - exactly `n_trials` trials are started (fewer only after `timeout`, the `gpu_hours`
      budget or an interrupt);
    - every trial it started is finished in the store (COMPLETE, PRUNED or FAIL) when `run`
      returns or raises, including on KeyboardInterrupt, which it re-raises after cleaning up;
    - a worker that dies fails its running trial with the reason, and the run goes on;
    - a trial running past `trial_timeout` has its worker killed and fails, not retried.
    """

    name: str

    def run(self, plan: RunPlan) -> None: ...
