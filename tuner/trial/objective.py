"""The Optuna objective: suggested values → a trial config → one fine-tune → the trial's state.

Outcomes map to states as a person reading the study expects: a finite validation loss is
COMPLETE; a pruned run is PRUNED; an error, an out-of-memory or a NaN/infinite loss is FAIL with
the reason in the trial's user attrs (Optuna alone would store an infinite value as COMPLETE).
Out-of-memory and NaN also set a constraint on the trial, which the sampler learns from.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna

from trials.reporter import StudyDeleting
from tuner.common.errors import StoreFull, caused_by
from tuner.common.settings import get_settings, node_cache_dir
from tuner.common.text import error_line
from tuner.space import Space
from tuner.store import (
    Saved,
    StoredCheckpoints,
    attrs,
    deletion,
    local_cache_dir,
    open_artifacts,
    rank_key,
    recovery,
    resumable,
    retention,
    shared_data_cache,
    store_errors,
)
from tuner.trial.tracking import TrialRun

logger = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class AdapterNotStored(RuntimeError):
    """The trial trained, but its adapter could not be stored (the disk is full, say)."""


class NonFiniteObjective(RuntimeError):
    pass


class Objective:
    """Callable for `Study.optimize`; one instance per worker process."""

    def __init__(self, space: Space, *, artifacts: str, ranks: int = 1) -> None:
        self.space = space
        self.ranks = ranks  # above 1: this process is rank 0 of a multi-GPU trial
        self.shared = False  # whether this trial's config has reached the other ranks
        self.artifacts = artifacts  # the study's location: a local path or s3://BUCKET/PREFIX
        self.artifact_store = open_artifacts(artifacts)
        # The data is tokenised once per study, not once per worker: in the location's folder
        # when the workers share it; else in this node's cache, synced through the location.
        self.data_cache = local_cache_dir(artifacts, node_cache_dir())
        self.shared_data = shared_data_cache(artifacts, self.artifact_store)
        self.worker: str | None = None  # the backend's name for this worker, recorded per trial
        self.run: str | None = None  # the id of the run it works for, recorded per trial
        self.driver_pid: int | None = None  # a local worker's driver, recorded per trial
        self.on_trial_start: Any = None  # set by a backend that tracks its running trials
        # Where a Ctrl-C may land in a trial: the whole of the objective, and nothing around it
        # (creating the trial, telling it), so that an interrupt never leaves a trial half-made.
        # A worker process that holds its interrupts elsewhere sets it (tuner.backends.local).
        self.interruptible: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
        # Why an interrupted trial failed: a Ctrl-C, unless its worker says otherwise (a worker
        # whose driver died interrupts its own trial, tuner.backends.lifeline).
        self.interrupted_because = recovery.INTERRUPTED

    def warm_up(self, *, threads: int) -> None:
        """Prepare this worker process for the workload: import its training stack now (so the
        first trial's time does not include it), quiet its logs, set torch's thread count."""
        if self.space.fixed.get("workload", "sft") == "simulated":
            from trials import simulated  # noqa: F401

            return
        from tuner.trial import stack

        stack.load()  # loaded already where the worker was forked from a server that had it
        import torch

        from trials import sft

        torch.set_num_threads(get_settings().torch_threads or threads)
        sft.set_deepspeed_accelerator()
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    def __call__(self, trial: optuna.Trial) -> float:
        timings: dict[str, float] = {}
        self.shared = False
        try:
            with self.interruptible():
                recovery.mark(trial, self.worker, self.run, self.driver_pid)
                if self.on_trial_start is not None:
                    self.on_trial_start(trial)
                values = self.space.suggest(trial)
                trial.set_user_attr(attrs.HPARAMS, values)
                with TrialRun(
                    trial,
                    self.space,
                    artifacts=self.artifacts,
                    store=self.artifact_store,
                    values=values,
                ) as run:
                    return self._train(trial, values, timings, run.tracking)
        except optuna.TrialPruned:
            trial.set_user_attr(attrs.TIMINGS, timings)
            self._record_rank_steps(trial, timings)
            raise
        except KeyboardInterrupt:
            trial.set_user_attr(attrs.FAIL_REASON, self.interrupted_because)
            _said_by_the_driver()
            raise
        except StudyDeleting:
            # FAIL, not PRUNED: the trial did not lose, its study is going
            # (tuner/store/_deletion.py).
            trial.set_user_attr(attrs.FAIL_REASON, deletion.REASON)
            trial.set_user_attr(attrs.TIMINGS, timings)
            self._record_rank_steps(trial, timings)
            _said_by_the_driver()  # the delete says what happened
            raise
        except Exception as e:
            if caused_by(e, StoreFull):
                _said_by_the_driver()  # and nothing more can be written
                raise
            kind = _failure_kind(e)
            # `nan` and `oom` are codes to filter on; other errors are their own first line.
            trial.set_user_attr(attrs.FAIL_REASON, kind or error_line(e, 500))
            if kind:
                trial.set_user_attr(attrs.FAIL_DETAIL, error_line(e, 500))
                # Optuna's samplers skip FAIL trials; a violated constraint is what makes TPE
                # (tuner.search.algorithms.TPESampler) steer away from the region that ran out of
                # memory or diverged.
                trial.set_constraint(kind, 1.0)
            trial.set_user_attr(attrs.TIMINGS, timings)
            raise

    def _train(
        self, trial: optuna.Trial, values: dict[str, Any], timings: dict, tracking: Any = None
    ) -> float:
        started = time.perf_counter()
        config = self.space.trial_config(values)
        checkpoints = self._checkpoints(trial)
        if self.ranks > 1:
            from trials import distributed

            distributed.share({"config": config.model_dump(), **_checkpoint_payload(checkpoints)})
            self.shared = True
        try:
            with tempfile.TemporaryDirectory(prefix=f"tuner-trial-{trial.number}-") as tmp:
                result = self._run(config, trial, timings, Path(tmp), checkpoints, tracking)
                self._record_rank_steps(trial, timings)
                return self._finish(trial, config, result, started)
        finally:
            # The trial has ended here (finished, pruned, or failed by its own error): nothing
            # will resume it. A worker that dies never gets here, and its checkpoint stays.
            if checkpoints is not None:
                checkpoints.discard()

    def _finish(self, trial: optuna.Trial, config: Any, result: Any, started: float) -> float:
        """Record what the trial trained and left, and store its adapter."""
        value = result.metric(self.space.objective.metric)
        if not math.isfinite(value):
            raise NonFiniteObjective(f"{self.space.objective.metric} is {value}")
        if result.adapter_dir:
            upload_started = time.perf_counter()
            keep = self.space.budget.keep_adapters
            if retention.keep_adapter(
                trial.study, self.artifact_store, number=trial.number, value=value, keep=keep
            ):
                trial.set_user_attr(
                    attrs.ADAPTER, self._upload_adapter(trial, Path(result.adapter_dir))
                )
            else:
                trial.set_user_attr(attrs.ADAPTER_DROPPED, f"not among the best {keep}")
            result.timings["upload_s"] = time.perf_counter() - upload_started
        facts = asdict(result)
        facts.pop("adapter_dir")
        facts["timings"]["objective_s"] = time.perf_counter() - started
        if result.temperature_scores:
            # The temperature an export should sample the adapter at: the grid's best, or the
            # trial's own when that scored better.
            scores = {**result.temperature_scores, f"{config.temperature:g}": value}
            direction = self.space.objective.direction
            best = min(scores, key=lambda t: rank_key(scores[t], direction))
            facts[attrs.BEST_TEMPERATURE] = float(best)
        for key, fact in facts.items():
            trial.set_user_attr(key, fact)
        return value

    def _record_rank_steps(self, trial: optuna.Trial, timings: dict) -> None:
        """Rank 0 of a multi-GPU trial, once training has ended on it: wait for every rank to
        end too, and record the step each stopped at (all equal, or a rank ran on alone)."""
        if self.ranks > 1 and self.shared:
            from trials import distributed

            steps = distributed.gather(timings.get("stopped_at_step"))
            trial.set_user_attr(attrs.RANK_STEPS, steps)

    def follow(self) -> int | None:
        """A rank other than 0: train the trial rank 0 shares, reporting nothing (rank 0 decides
        on pruning for all). Returns the step it stopped at; None when rank 0 ran no trial."""
        from trials import distributed
        from trials.config import TrialConfig

        payload = distributed.share(None)
        if payload is None:
            return None
        config = TrialConfig.model_validate(payload["config"])
        checkpoints = (
            self._checkpoints(None, shared=payload) if "checkpoint_token" in payload else None
        )
        timings: dict[str, float] = {}
        with (
            tempfile.TemporaryDirectory(prefix="tuner-rank-") as tmp,
            contextlib.suppress(optuna.TrialPruned),  # rank 0 records the prune
        ):
            self._run(config, None, timings, Path(tmp), checkpoints)
        distributed.gather(timings.get("stopped_at_step"))
        return timings.get("stopped_at_step")

    def _run(
        self,
        config: Any,
        trial: optuna.Trial | None,
        timings: dict,
        tmp: Path,
        checkpoints: StoredCheckpoints | None = None,
        tracking: Any = None,
    ) -> Any:
        return run_workload(
            config,
            trial=trial,
            timings=timings,
            output_dir=tmp,
            cache=self.data_cache,
            shared_cache=self.shared_data,
            objective=self.space.objective,
            checkpoints=checkpoints,
            tracking=tracking,
        )

    def _checkpoints(
        self, trial: optuna.Trial | None, *, shared: dict[str, Any] | None = None
    ) -> StoredCheckpoints | None:
        """This process's keeper of the trial's checkpoints; None when the space keeps none
        (`resources.checkpoint_every`) or the workload has no steps to resume. Rank 0 holds the
        `trial` (a retry resumes what it inherited); the other ranks what rank 0 `shared`."""
        resources = self.space.resources
        if resources.checkpoint_every is None or self.space.fixed.get("workload") == "simulated":
            return None
        every = {
            "every_steps": resources.checkpoint_steps,
            "every_seconds": resources.checkpoint_seconds,
        }
        if trial is not None:
            resume = resumable(trial)
            return StoredCheckpoints(
                self.artifact_store, **every, ranks=self.ranks, trial=trial, resume=resume
            )
        return StoredCheckpoints(
            self.artifact_store,
            **every,
            rank=_rank(),
            ranks=_world(),
            resume=Saved.from_attr(shared["resume"]),
            token=shared["checkpoint_token"],
        )

    def _upload_adapter(self, trial: optuna.Trial, adapter_dir: Path) -> dict[str, str]:
        """Store the adapter's files in the study's artifact store, linked from the trial, so an
        export finds them from the study alone. Returns file name → artifact id."""
        uploaded: dict[str, str] = {}
        try:
            for name in ADAPTER_FILES:
                uploaded[name] = optuna.artifacts.upload_artifact(
                    artifact_store=self.artifact_store,
                    file_path=str(adapter_dir / name),
                    study_or_trial=trial,
                )
        except store_errors() as e:
            # A full disk or an unreachable S3, say: the trial fails, and the files stored so far
            # go too, so nothing of a half-stored adapter is left (each write was atomic).
            gone = (*store_errors(), optuna.artifacts.exceptions.ArtifactNotFound)
            for artifact_id in uploaded.values():
                with contextlib.suppress(*gone):
                    self.artifact_store.remove(artifact_id)
            why = getattr(e, "strerror", None) or e
            raise AdapterNotStored(f"could not store the adapter in {self.artifacts}: {why}") from e
        return uploaded


def run_workload(
    config: Any,
    *,
    trial: optuna.Trial | None,
    timings: dict,
    output_dir: Path,
    cache: Path,
    shared_cache: Any = None,
    objective: Any = None,
    checkpoints: Any = None,
    tracking: Any = None,
) -> Any:
    """The trial's workload (`fixed.workload`), on this process's share of the trial; rank 0
    reports it to the trackers of `tracking` (trials.tracking), the other ranks to none."""
    if config.workload == "simulated":
        from trials import simulated

        return simulated.run(config, trial=trial, timings=timings)
    from trials import sft

    generation = objective if objective is not None and objective.samples else None
    return sft.run(
        config,
        output_dir=output_dir,
        trial=trial,
        timings=timings,
        data_cache=cache,
        shared_cache=shared_cache,
        generation=generation,
        checkpoints=checkpoints,
        tracking=tracking,
    )


def quiet_worker_logs(level: int) -> None:
    """In a worker process: the driver reports each finished trial, so Optuna's own lines and
    its notes that heartbeats and artifacts are experimental would only repeat it."""
    logging.basicConfig(
        level=level,
        # The CLI's format (timestamped, for unattended runs), with the worker's process.
        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def _said_by_the_driver() -> None:
    """The trial ends for a reason the run itself reports in one line (an interrupt, a delete,
    a full store): Optuna's warning of the failed trial, with its traceback, would only alarm.
    The worker stops after it, so its Optuna log stays quiet from here."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)


def _failure_kind(error: BaseException) -> str | None:
    """`nan` for a diverged run, `oom` for out of memory, else None."""
    from trials.reporter import NonFiniteLoss

    if isinstance(error, NonFiniteLoss | NonFiniteObjective):
        return "nan"
    if type(error).__name__ == "OutOfMemoryError" or "out of memory" in str(error).lower():
        return "oom"
    return None


def _checkpoint_payload(checkpoints: StoredCheckpoints | None) -> dict[str, Any]:
    """What the other ranks of a multi-GPU trial need to keep their part of its checkpoints."""
    if checkpoints is None:
        return {}
    resume = checkpoints.resume.as_attr() if checkpoints.resume else None
    return {"checkpoint_token": checkpoints.token, "resume": resume}


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))
