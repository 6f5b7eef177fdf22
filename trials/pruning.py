"""Trainer callback (trials/callbacks.py) that reports every evaluation to the Optuna trial and
stops training the moment the trial is pruned; and, as training begins, the steps it will take."""

from __future__ import annotations

from typing import Any

from trials.reporter import Reporter


class PruningCallback:
    """Reports `eval_loss` at the Trainer's `global_step` (so a pruner's `n_warmup_steps` counts
    training steps) and raises `optuna.TrialPruned` out of `trainer.train()` when pruned."""

    def __init__(self, trial: Any | None, metric: str = "eval_loss") -> None:
        self.reporter = Reporter(trial, metric)

    @property
    def store_seconds(self) -> float:
        return self.reporter.store_seconds

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        self.reporter.plan(state.max_steps)  # the Trainer's count: epochs and resumes included

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):  # noqa: ANN001
        value = (metrics or {}).get(self.reporter.metric)
        if value is not None:
            self.reporter.report(
                value, state.global_step, final=state.global_step >= state.max_steps
            )
