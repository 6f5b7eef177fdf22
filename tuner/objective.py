"""The Optuna objective: suggested values → a trial config → one fine-tune → the trial's state.

Outcomes map to states as a person reading the study expects: a finite validation loss is
COMPLETE; a pruned run is PRUNED; an error, an out-of-memory or a NaN/infinite loss is FAIL with
the reason in the trial's user attrs (Optuna alone would store an infinite value as COMPLETE).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna

from tuner.space import Space

logger = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class NonFiniteObjective(RuntimeError):
    pass


class Objective:
    """Callable for `Study.optimize`; one instance per worker process."""

    def __init__(self, space: Space, *, artifact_dir: Path) -> None:
        self.space = space
        artifact_dir.mkdir(parents=True, exist_ok=True)
        self.artifact_store = optuna.artifacts.FileSystemArtifactStore(str(artifact_dir))
        self.on_trial_start: Any = None  # set by a backend that tracks its running trials

    def warm_up(self, *, threads: int) -> None:
        """Prepare this worker process for the workload: import its training stack now (so the
        first trial's time does not include it), quiet its logs, set torch's thread count."""
        if self.space.fixed.get("workload", "sft") == "simulated":
            from trials import simulated  # noqa: F401

            return
        import datasets
        import peft  # noqa: F401
        import torch
        import transformers
        import trl  # noqa: F401

        from trials import sft

        torch.set_num_threads(threads)
        sft.set_deepspeed_accelerator()
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        datasets.disable_progress_bars()
        # Deprecation notices from inside transformers/peft/trl, once per trial per worker.
        warnings.filterwarnings("ignore", category=FutureWarning)

    def __call__(self, trial: optuna.Trial) -> float:
        if self.on_trial_start is not None:
            self.on_trial_start(trial)
        values = self.space.suggest(trial)
        trial.set_user_attr("hparams", values)
        timings: dict[str, float] = {}
        try:
            return self._train(trial, values, timings)
        except optuna.TrialPruned:
            trial.set_user_attr("timings", timings)
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", "interrupted (Ctrl-C or a stop signal)")
            raise
        except Exception as e:
            trial.set_user_attr("fail_reason", _one_line(e))
            trial.set_user_attr("timings", timings)
            if _is_out_of_memory(e):
                trial.set_user_attr("oom", True)
            raise

    def _train(self, trial: optuna.Trial, values: dict[str, Any], timings: dict) -> float:
        started = time.perf_counter()
        config = self.space.trial_config(values)
        with tempfile.TemporaryDirectory(prefix=f"tuner-trial-{trial.number}-") as tmp:
            if config.workload == "simulated":
                from trials import simulated

                result = simulated.run(config, trial=trial, timings=timings)
            else:
                from trials import sft

                result = sft.run(config, output_dir=Path(tmp), trial=trial, timings=timings)
            value = result.metric(self.space.objective.metric)
            if not math.isfinite(value):
                raise NonFiniteObjective(f"{self.space.objective.metric} is {value}")
            if result.adapter_dir:
                upload_started = time.perf_counter()
                trial.set_user_attr(
                    "adapter", self._upload_adapter(trial, Path(result.adapter_dir))
                )
                result.timings["upload_s"] = time.perf_counter() - upload_started
        facts = asdict(result)
        facts.pop("adapter_dir")
        facts["timings"]["objective_s"] = time.perf_counter() - started
        for key, fact in facts.items():
            trial.set_user_attr(key, fact)
        return value

    def _upload_adapter(self, trial: optuna.Trial, adapter_dir: Path) -> dict[str, str]:
        """Store the adapter's files in the study's artifact store, linked from the trial, so an
        export finds them from the study alone. Returns file name → artifact id."""
        return {
            name: optuna.artifacts.upload_artifact(
                artifact_store=self.artifact_store,
                file_path=str(adapter_dir / name),
                study_or_trial=trial,
            )
            for name in ADAPTER_FILES
        }


def fail_trial(storage: optuna.storages.BaseStorage, trial_id: int, reason: str) -> bool:
    """Fail a trial left RUNNING by a worker that died, with the reason, rather than wait for
    its heartbeat to go stale. Returns whether it was still RUNNING."""
    trial = storage.get_trial(trial_id)
    if trial.state != optuna.trial.TrialState.RUNNING:
        return False
    storage.set_trial_user_attr(trial_id, "fail_reason", reason)
    storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
    logger.warning("trial %d failed: %s", trial.number, reason)
    return True


def quiet_worker_logs(level: int) -> None:
    """In a worker process: the driver reports each finished trial, so Optuna's own lines and
    its notes that heartbeats and artifacts are experimental would only repeat it."""
    logging.basicConfig(level=level, format="%(levelname)s %(processName)s %(name)s: %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:500]}" if text else type(error).__name__


def _is_out_of_memory(error: BaseException) -> bool:
    return type(error).__name__ == "OutOfMemoryError" or "out of memory" in str(error).lower()
