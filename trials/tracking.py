"""Where one trial reports its run: the HF Trainer's own integrations (`report_to`), named and
placed per trial. tuner fills this in for rank 0 of each trial (tuner/trial/tracking.py); a trial
run
by hand reports nowhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Tracking:
    """What the Trainer needs to report one trial's run."""

    report_to: list[str]  # of trials.config.TRACKERS
    run_name: str  # STUDY/trial-N: the run's name in MLflow and W&B
    tensorboard_dir: str | None = None  # this trial's own folder of event files


def trainer_args(tracking: Tracking | None) -> dict[str, Any]:
    """`report_to` and `run_name` for the Trainer's arguments. TensorBoard is left out: its
    callback comes from `callbacks`, writing to the trial's folder."""
    if tracking is None:
        return {"report_to": "none"}
    report_to = [name for name in tracking.report_to if name != "tensorboard"]
    return {"report_to": report_to or "none", "run_name": tracking.run_name}


def tracking_callbacks(tracking: Tracking | None) -> list[Any]:
    """HF's TensorBoardCallback writing to the trial's folder (what TENSORBOARD_LOGGING_DIR
    would set, but per trial rather than per process). Its writer is made again after training
    for the final evaluation, into the same folder."""
    if tracking is None or "tensorboard" not in tracking.report_to:
        return []
    from transformers.integrations import TensorBoardCallback

    callback = TensorBoardCallback()
    callback.logging_dir = tracking.tensorboard_dir
    return [callback]
