"""Report each validation loss to the Optuna trial and stop training the moment it is pruned."""

from __future__ import annotations

import math
import time
from typing import Any

import optuna
from transformers import TrainerCallback


class NonFiniteLoss(RuntimeError):
    """Training diverged: the validation loss is NaN or infinite."""


class PruningCallback(TrainerCallback):
    """`trial.report(eval_loss, global_step)` after every evaluation; prune when Optuna says so.

    The step is the optimizer step, so a pruner's `n_warmup_steps` counts training steps. The
    evaluation after the last step is reported but never prunes: the work is already done.
    """

    def __init__(self, trial: Any | None, metric: str = "eval_loss") -> None:
        self.trial = trial
        self.metric = metric
        self.store_seconds = 0.0  # time spent talking to the study store, for the overhead figure

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):  # noqa: ANN001
        value = (metrics or {}).get(self.metric)
        if value is None:
            return
        if not math.isfinite(value):
            raise NonFiniteLoss(f"{self.metric} is {value} at step {state.global_step}")
        if self.trial is None:
            return
        started = time.perf_counter()
        self.trial.report(value, state.global_step)
        prune = state.global_step < state.max_steps and self.trial.should_prune()
        self.store_seconds += time.perf_counter() - started
        if prune:
            raise optuna.TrialPruned(
                f"pruned at step {state.global_step} with {self.metric}={value:.4f}"
            )
