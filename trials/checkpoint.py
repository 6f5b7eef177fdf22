"""Checkpoints of a trial, so that a trial whose worker or node dies resumes where it was.

The Trainer writes each checkpoint itself (`Trainer._save_checkpoint`: the adapter, optimizer,
scheduler, every rank's RNG state and the trainer state), into the trial's own output folder on
its node. This callback only decides when (every `steps`, or every `seconds` of training), and
hands each complete checkpoint to a `Keeper`, which puts it where a retry on another node finds
it (tuner's keeps it in the study's artifact store). `trainer.train(resume_from_checkpoint=...)`
is the Trainer's own resume: it restores all of it and skips the batches already trained on, so
a resumed trial trains exactly what the uninterrupted one would.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Protocol


class Keeper(Protocol):
    """Where a trial's checkpoints live beyond its node."""

    every_steps: int | None  # a checkpoint every so many optimizer steps, or
    every_seconds: float | None  # every so many seconds of training

    def restore(self, into: Path) -> Path | None:
        """The checkpoint this trial resumes from, fetched into `into`; None: start at step 0."""

    def save(self, step: int, folder: Path) -> None:
        """Keep what this process wrote of the checkpoint at `step` (every rank calls it)."""

    def commit(self, step: int) -> None:
        """Every rank has saved `step`: it is now the one to resume from."""


class CheckpointCallback:
    """Asks the Trainer for a checkpoint when one is due and passes it to the keeper."""

    def __init__(self, keeper: Keeper) -> None:
        self.keeper = keeper
        self.last_step = 0
        self.last_time = time.monotonic()

    def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        self.last_step, self.last_time = state.global_step, time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        if state.global_step < state.max_steps and self._due(state.global_step):
            control.should_save = True

    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self.keeper.save(state.global_step, folder)
        _barrier()  # every rank's part is kept before the checkpoint is the one to resume from
        self.keeper.commit(state.global_step)
        self.last_step, self.last_time = state.global_step, time.monotonic()

    def _due(self, step: int) -> bool:
        every_steps, every_seconds = self.keeper.every_steps, self.keeper.every_seconds
        if every_steps:
            return step - self.last_step >= every_steps
        if every_seconds:
            # Ranks' clocks disagree: all must save together (the save is collective), so
            # the ranks agree on "due" as a whole.
            return _any_rank(time.monotonic() - self.last_time >= every_seconds)
        return False


def _distributed() -> Any | None:
    import torch.distributed as dist

    return (
        dist
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        else None
    )


def _barrier() -> None:
    if (dist := _distributed()) is not None:
        dist.barrier()


def _any_rank(flag: bool) -> bool:
    dist = _distributed()
    if dist is None:
        return flag
    import torch

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces GPU tensors only
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
