"""What a study has spent, for the budgets that stop it: GPU-hours held by its trials."""

from __future__ import annotations

from datetime import datetime
from typing import Any


def gpu_hours_held(study: Any, gpus_per_trial: float, *, now: datetime | None = None) -> float:
    """Wall time × GPUs per trial, summed over the study's trials; running ones count so far.

    From the store's own start and end times, so every worker and the driver agree, and a trial
    that was pruned or failed counts what it held like one that completed.
    """
    total_s = 0.0
    for trial in study.get_trials(deepcopy=False):
        if trial.datetime_start is None:
            continue  # waiting in the queue
        end = trial.datetime_complete or now or datetime.now(trial.datetime_start.tzinfo)
        total_s += max(0.0, (end - trial.datetime_start).total_seconds())
    return total_s * gpus_per_trial / 3600


def spent(study: Any, gpus_per_trial: float, budget: float | None) -> bool:
    return budget is not None and gpu_hours_held(study, gpus_per_trial) >= budget
