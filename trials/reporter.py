"""What a trial reports: each evaluation to its Optuna trial as it happens, and its result at the
end. Free of the training stack, so light workloads start fast."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import optuna

# The trial's user attr of the steps it trains (tuner.store._attrs.MAX_STEPS, for the progress bar;
# named here too, as trials/ does not import tuner/).
MAX_STEPS = "max_steps"
# The study's user attr that `tuner study delete` sets before deleting it (tuner.store._attrs.
# DELETING, named here too): a trial that reads it stops at this report.
DELETING = "deleting"


class NonFiniteLoss(RuntimeError):
    """Training diverged: the validation loss is NaN or infinite."""


class StudyDeleting(RuntimeError):
    """The study is being deleted (`tuner study delete --force`): the trial stops at this report.
    Raised on rank 0, which records the trial; the other ranks stop as if pruned."""


class Reporter:
    """`trial.report(value, step)`; raises `optuna.TrialPruned` when the pruner says so, and
    `StudyDeleting` when the study is marked for deletion (one read of its attrs per report).

    The report after the last step never prunes: the work is already done. Without a trial
    (a run by hand, or a rank other than 0 of a multi-GPU trial) it reports nothing. In a
    multi-rank trial, rank 0 decides and every rank gets its decision at the same step, so all
    stop together: none is left waiting in a collective for a rank that stopped.
    """

    def __init__(self, trial: Any | None, metric: str = "eval_loss") -> None:
        self.trial = trial
        self.metric = metric
        # A loss falls as a run gets better. In a study that maximises (a generation score), it
        # is reported negated: the pruner compares values in the study's direction, and would
        # otherwise stop the trials whose loss is lowest.
        self.sign = 1.0
        if trial is not None and trial.study.direction == optuna.study.StudyDirection.MAXIMIZE:
            self.sign = -1.0
        self.store_seconds = 0.0  # time spent talking to the study store, for the overhead figure

    def plan(self, max_steps: int) -> None:
        """Record the steps the run will train, as it starts: whoever watches the study (the
        progress bar) can then tell how far a running trial is, and when it will be done."""
        if self.trial is not None and max_steps > 0:
            started = time.perf_counter()
            self.trial.set_user_attr(MAX_STEPS, max_steps)
            self.store_seconds += time.perf_counter() - started

    def report(self, value: float, step: int, *, final: bool = False) -> None:
        if not math.isfinite(value):
            raise NonFiniteLoss(f"{self.metric} is {value} at step {step}")
        prune = deleting = False
        if self.trial is not None:
            started = time.perf_counter()
            self.trial.report(self.sign * value, step)  # the store rides out lost connections
            if not final:
                deleting = DELETING in self.trial.study.user_attrs
                prune = deleting or self.trial.should_prune()
            self.store_seconds += time.perf_counter() - started
        # Every rank stops at the same step either way: the others only hear "stop".
        if _agree(prune):
            if deleting:
                raise StudyDeleting(f"the study is being deleted; stopped at step {step}")
            raise optuna.TrialPruned(f"pruned at step {step} with {self.metric}={value:.4f}")


def _agree(decision: bool) -> bool:
    """Rank 0's decision, on every rank of a torch-distributed trial; else the decision."""
    dist = sys.modules.get("torch.distributed")  # never imported here for one-process trials
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return decision
    if dist.get_world_size() == 1:
        return decision
    box = [decision]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


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
    tokens_per_s: float = 0.0  # in training steps (not evaluations), all ranks together
    peak_mem_gb: float | None = None  # peak GPU memory of this process (rank 0); None on CPU
    gpu_hours: float = 0.0  # the trial's wall time x the GPUs it held
    best_eval_step: int | None = None  # the step of the lowest validation loss
    per_device_train_batch_size: int = 0  # what it trained with: halved after an out-of-memory
    gradient_accumulation_steps: int = 0
    oom_retries: int = 0  # 1: the first attempt ran out of memory
    deepspeed_stage: int = 0  # the ZeRO stage the trial trained with; 0: no DeepSpeed
    quantization_bit: int | None = None  # 4 or 8: trained on a k-bit base (QLoRA); None: not
    data_source: str = ""  # tokenized, shared (the study's cache), fetched, memory; empty: none
    # The generation objective: the mean score of sampled answers at the trial's temperature,
    # and at each temperature of the space's grid (same adapter, no retraining).
    score: float | None = None
    temperature_scores: dict[str, float] = field(default_factory=dict)
    adapter_dir: str = ""  # empty: the workload trains no adapter
    timings: dict[str, float] = field(default_factory=dict)

    def metric(self, name: str) -> float:
        """The objective's value: a loss by name, else the generation score."""
        if name in ("eval_loss", "perplexity"):
            return float(getattr(self, name))
        return math.nan if self.score is None else float(self.score)
