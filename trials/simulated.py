"""A trial that trains nothing: it sleeps for each step and reports a synthetic validation curve.

It exercises what surrounds a trial (placement, reporting, pruning, the store) at the cost of a
sleep, so scheduling can be tested and benchmarked without GPUs:

    tuner study create --space simulated.yaml && tuner study run simulated --backend ray

The curve falls from 4.0 towards a floor set by the hyperparameters: best near learning rate 1e-3
and rank 16; the seed adds a little noise, so equal params give equal curves.
"""

from __future__ import annotations

import math
import random
import time
from typing import Any

from trials.config import TrialConfig
from trials.reporter import Reporter, TrialResult


def floor(config: TrialConfig) -> float:
    """The loss this configuration converges to."""
    lr_term = (math.log10(config.learning_rate) + 3) ** 2
    rank_term = (math.log2(config.lora_rank) - 4) ** 2 / 8
    dropout_term = abs(config.lora_dropout - 0.05)
    return 1.0 + 0.5 * lr_term + 0.3 * rank_term + dropout_term


def loss_at(config: TrialConfig, step: int, rng: random.Random) -> float:
    """The validation loss reported at `step`: from 4.0 towards the floor, with a little noise."""
    target = floor(config)
    return target + (4.0 - target) * math.exp(-step / 3) + rng.gauss(0, 0.01)


def rng_for(config: TrialConfig) -> random.Random:
    return random.Random(f"{config.seed}:{config.learning_rate}:{config.lora_rank}")


def run(
    config: TrialConfig, *, trial: Any | None = None, timings: dict[str, float] | None = None
) -> TrialResult:
    timings = {} if timings is None else timings
    rng = rng_for(config)
    reporter = Reporter(trial)
    started = time.perf_counter()
    loss = 4.0
    knobs = config.simulated
    reporter.plan(knobs.steps)
    for step in range(1, knobs.steps + 1):
        time.sleep(knobs.step_seconds)
        loss = loss_at(config, step, rng)
        if step > 1 and knobs.diverge_above_lr and config.learning_rate > knobs.diverge_above_lr:
            loss = math.nan
        while step > 1 and knobs.hang_above_lr and config.learning_rate > knobs.hang_above_lr:
            time.sleep(1)  # only a kill ends it, as with a real hang
        timings["stopped_at_step"] = step
        reporter.report(loss, step, final=step == knobs.steps)
    timings["train_s"] = time.perf_counter() - started
    timings["store_s"] = reporter.store_seconds
    return TrialResult(
        eval_loss=loss,
        perplexity=math.exp(loss),
        train_loss=loss,
        steps=knobs.steps,
        timings=timings,
    )
