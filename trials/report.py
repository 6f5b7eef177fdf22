"""What a trial reports: each evaluation to its Optuna trial as it happens, and its result at the
end. Free of the training stack, so light workloads start fast."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import optuna


class NonFiniteLoss(RuntimeError):
    """Training diverged: the validation loss is NaN or infinite."""


class Reporter:
    """`trial.report(value, step)`; raises `optuna.TrialPruned` when the pruner says so.

    The report after the last step never prunes: the work is already done. Without a trial
    (a run by hand) it only checks that the value is finite.
    """

    def __init__(self, trial: Any | None, metric: str = "eval_loss") -> None:
        self.trial = trial
        self.metric = metric
        self.store_seconds = 0.0  # time spent talking to the study store, for the overhead figure

    def report(self, value: float, step: int, *, final: bool = False) -> None:
        if not math.isfinite(value):
            raise NonFiniteLoss(f"{self.metric} is {value} at step {step}")
        if self.trial is None:
            return
        started = time.perf_counter()
        self.trial.report(value, step)
        prune = not final and self.trial.should_prune()
        self.store_seconds += time.perf_counter() - started
        if prune:
            raise optuna.TrialPruned(f"pruned at step {step} with {self.metric}={value:.4f}")


@dataclass
class TrialResult:
    """What a finished trial leaves: its metrics, the facts a person looks at later, timings."""

    eval_loss: float
    perplexity: float
    train_loss: float | None
    steps: int
    tokens_seen: int = 0
    trainable_params: int = 0
    total_params: int = 0
    truncation_ratio: float = 0.0
    adapter_dir: str = ""  # empty: the workload trains no adapter
    timings: dict[str, float] = field(default_factory=dict)

    def metric(self, name: str) -> float:
        return float(getattr(self, name))
