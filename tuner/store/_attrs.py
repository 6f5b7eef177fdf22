"""The names of what tuner keeps on a study and its trials (Optuna user and system attrs).

One place, so that the process that writes an attr and every process that reads it agree, and
so that a reader of the store (a notebook, optuna-dashboard) can find what each one means.
"""

from __future__ import annotations

# ----------------------------------------------------------------------------- study user attrs

SPACE = "space"  # the validated space as stored; written last, so a study that has it is complete
SPACE_FILE = "space_file"  # the YAML it was created from, for people
# Where the study's artifacts (adapters, checkpoints, reports, tokenised data) live: a local path
# or s3://BUCKET/PREFIX (tuner.store.artifacts). Studies made before it have ARTIFACT_DIR only.
ARTIFACTS = "artifacts"
ARTIFACT_DIR = "artifact_dir"  # an older study's artifact folder
SWEEP = "sweep"  # a recurring sweep's summary, written when it ends (tuner.sweep)
# The study's MLflow parent run (tuner.tracking): run_id, experiment_id, tracking_uri (never with
# a password), url. Workers on any node nest their trial's run under it.
MLFLOW = "mlflow"
# Set by `tuner study delete` before it deletes the study: who asked, and when. Every process of a
# run checks it, stops its trials at their next report and starts none (tuner.store.deletion).
DELETING = "deleting"

# ----------------------------------------------------------------------------- trial user attrs

HPARAMS = "hparams"  # the values the trial trained with (multiples resolved), by param name
BASELINE = "baseline"  # True on the trial of the space's `baseline`
WARM_START = "warm_start"  # "STUDY#N": enqueued from the previous sweep's trial N
ADAPTER = "adapter"  # adapter file name -> artifact id
ADAPTER_DROPPED = "adapter_dropped"  # why a finished trial keeps no adapter (budget.keep_adapters)
FAIL_REASON = "fail_reason"  # one line: `nan`, `oom`, or the error / who failed it and why
FAIL_DETAIL = "fail_detail"  # the error behind a `nan` or `oom` reason
TIMINGS = "timings"  # seconds per phase of the trial
RANK_STEPS = "rank_steps"  # the step each rank of a multi-GPU trial stopped at
BEST_TEMPERATURE = "best_temperature"  # the sampling temperature an export uses
CHECKPOINT = "checkpoint"  # the checkpoint a retry resumes from: token, step, ranks
TRACKING = "tracking"  # tracker -> the trial's run: its MLflow or W&B link, TensorBoard folder
RESUMED_FROM_STEP = "resumed_from_step"  # the step a retry of a dead worker's trial resumed at
# The steps the trial trains, recorded by its workload as training starts (trials.reporter, which
# names it too: trials/ does not import tuner/), for the progress bar's step count and ETA.
MAX_STEPS = "max_steps"
# Where the trial runs, so that whoever outlives its worker can fail it (tuner.store.recovery).
WORKER = "worker"  # the backend's id of the slot that runs it
RUN = "run"  # the id of the `study run` that runs it (tuner.store.runs): what each run counts
HOST = "host"
PID = "worker_pid"
DRIVER_PID = "driver_pid"  # a local worker's driver: a next run waits for its orphans to end

# ----------------------------------------------------------------------------- trial system attrs

FED = "tuner_fed"  # True when the driver sampled the trial's params (tuner.backends.feed)
# Optuna's own, read by tuner: set by `enqueue_trial` and by the retry of a failed trial.
FIXED_PARAMS = "fixed_params"
FAILED_TRIAL = "failed_trial"  # the number of the trial a retry replaces
RETRY_HISTORY = "retry_history"


def failure(trial) -> tuple[str, ...]:  # noqa: ANN001 - any trial with user_attrs
    """What a trial said of its failure: its reason, then the detail behind it if any; () if
    nothing. One reading for the progress lines and the driver's count of alike failures."""
    said = (trial.user_attrs.get(FAIL_REASON), trial.user_attrs.get(FAIL_DETAIL))
    return tuple(s for s in said if s is not None)
