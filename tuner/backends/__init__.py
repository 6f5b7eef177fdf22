"""Where trials run, by name (`tuner study run --backend NAME`).

The registry maps each name to its class, imported only when it is used (Ray loads only for
`ray`). Every backend runs under the same driver (driver.py), which holds the run's policy; a
backend only starts, polls and kills slots (base.py).
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

from tuner.backends.base import Backend, RunPlan
from tuner.common.errors import TunerError

if TYPE_CHECKING:
    from tuner.backends.ray_job import (
        JobOutcome,
        Submitted,
        follow_job,
        is_job_address,
        submit_job,
        submit_study,
    )

__all__ = [
    "BACKENDS",
    "Backend",
    "JobOutcome",
    "RunPlan",
    "Submitted",
    "check_name",
    "default_backend",
    "follow_job",
    "get_backend",
    "is_job_address",
    "run_trials",
    "submit_job",
    "submit_study",
]

BACKENDS = {
    "local": "tuner.backends.local:LocalBackend",  # worker processes on this machine
    "ray": "tuner.backends.ray:RayBackend",  # actors on a Ray cluster
}
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray for a job's entrypoint
# What a backend offers beyond running trials, loaded on first use: a run as a Ray job
# (`tuner study submit`, `--address http://HEAD:8265`), for a driver off the cluster.
_LAZY = {
    name: "tuner.backends.ray_job"
    for name in (
        "submit_study",
        "submit_job",
        "follow_job",
        "is_job_address",
        "Submitted",
        "JobOutcome",
    )
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tuner.backends' has no attribute {name!r}")


def default_backend() -> str:
    """`ray` inside a Ray job (`ray job submit`, `tuner study submit`), else `local`."""
    return "ray" if RAY_JOB_ENV in os.environ else "local"


def check_name(name: str) -> None:
    if name not in BACKENDS:
        raise TunerError(f"--backend must be one of {', '.join(BACKENDS)} (got {name!r})")


def get_backend(name: str, *, address: str | None = None) -> Backend:
    """The backend called `name`; `address` is the cluster's, for a backend that has one."""
    check_name(name)
    module, _, cls = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)(address=address)


def run_trials(plan: RunPlan, *, backend: str, address: str | None = None) -> None:
    """Run the plan's trials on the named backend, under the driver."""
    from tuner.backends import driver

    driver.run(get_backend(backend, address=address), plan)
