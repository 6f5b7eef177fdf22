"""What a finished trial is judged on: validation loss and perplexity, from the last evaluation."""

from __future__ import annotations

import math
from typing import Any


def final_metrics(trainer: Any) -> dict[str, float]:
    """The last evaluation's loss (evaluating now if the last step was not evaluated)."""
    state = trainer.state
    evals = [log for log in state.log_history if "eval_loss" in log]
    if not evals or evals[-1].get("step") != state.global_step:
        trainer.evaluate()
        evals = [log for log in state.log_history if "eval_loss" in log]
    loss = float(evals[-1]["eval_loss"])
    return {"eval_loss": loss, "perplexity": _perplexity(loss)}


def best_eval_step(trainer: Any) -> int | None:
    """The step of the lowest validation loss: where a longer run stopped helping."""
    evals = [log for log in trainer.state.log_history if "eval_loss" in log]
    return int(min(evals, key=lambda log: log["eval_loss"])["step"]) if evals else None


def last_train_loss(trainer: Any) -> float | None:
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return float(losses[-1]) if losses else None


def _perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf
