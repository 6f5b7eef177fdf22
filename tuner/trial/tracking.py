"""Experiment tracking (`fixed.report_to`): each trial is one run, named STUDY/trial-N, in
TensorBoard, MLflow or W&B, through the HF Trainer's own integrations (trials/tracking.py).
tuner names and places each run, and logs what the Trainer does not know: the searched params
and the trial's final facts and state. Its link is kept on the trial (user attr `tracking`).

- MLflow: the driver makes one parent run per study, once (its id, experiment and server are
  kept on the study, user attr `mlflow`), so that a worker on any node nests its trial's run
  under it. A worker reaches the server at its own $MLFLOW_TRACKING_URI, else at the URI the
  study recorded, which never holds a password: credentials come from each node's environment
  (MLFLOW_TRACKING_USERNAME/PASSWORD, MLFLOW_TRACKING_TOKEN), as the S3 ones do. The trial's run
  is started before training and made the active run, so HF's MLflowCallback logs the Trainer's
  arguments and curves into it; tuner ends it with the trial's state.
- TensorBoard: event files in the study's artifact folder, `tensorboard/STUDY/trial-N`. With an
  S3 location they are written in the node's cache and uploaded when the trial ends, under
  `PREFIX/tensorboard/STUDY/trial-N/`.
- W&B: a run per trial named STUDY/trial-N, grouped by study ($WANDB_RUN_GROUP), finished when
  the trial ends; W&B's own settings (WANDB_PROJECT, WANDB_MODE=offline) apply.

A tracker that cannot be reached fails nothing: one warning, and the trial trains without it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from trials.config import trackers
from trials.tracking import Tracking
from tuner.common.errors import TunerError
from tuner.common.extras import install_hint
from tuner.store import attrs, mask_url

logger = logging.getLogger(__name__)

EXPERIMENT = "tuner"  # the MLflow experiment of studies when MLFLOW_EXPERIMENT_NAME is unset
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
EXTRAS = {"tensorboard": "tracking", "mlflow": "tracking", "wandb": "wandb"}  # pyproject.toml's
PROBE_S = 5.0  # how long a tracking server may take to answer that it is up
# MLflow retries a request 7 times with a doubling backoff (minutes in all) by default: a
# tracker that went away would hold a GPU trial that long. Set unless set already.
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
# The final facts logged as metrics of a trial's run, where the trial recorded them.
FACTS = (
    "eval_loss",
    "perplexity",
    "train_loss",
    "score",
    "steps",
    "tokens_seen",
    "tokens_per_s",
    "peak_mem_gb",
    "gpu_hours",
)
STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}  # MLflow's run statuses


def space_trackers(space: Any) -> list[str]:
    return trackers(space.fixed.get("report_to"))


def check_installed(space: Any) -> None:
    """Fail the run at once (one line) when a tracker's package is missing here, rather than
    every trial failing on it."""
    for name in space_trackers(space):
        if importlib.util.find_spec(PACKAGES[name]) is None:
            raise TunerError(
                f"fixed.report_to: {name} needs the {PACKAGES[name]} package where trials run "
                f"({install_hint(EXTRAS[name])})"
            )


def run_name(study_name: str, number: int) -> str:
    return f"{study_name}/trial-{number}"


# ----------------------------------------------------------------------------- the study's run


@contextlib.contextmanager
def study_run(study: Any, space: Any) -> Iterator[None]:
    """The driver's part, around a run of the study's trials: the MLflow parent run, made on
    the study's first run and reopened by later ones, ended when the run ends."""
    parent = _open_parent(study, space) if "mlflow" in space_trackers(space) else None
    try:
        yield
    finally:
        if parent is not None:
            _close_parent(study, parent)


def tracking_uri() -> str:
    """The MLflow server this process reports to: $MLFLOW_TRACKING_URI, else MLflow's default
    (an SQLite file in the working directory, as an absolute URI)."""
    import mlflow

    return os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()


def _mlflow_env() -> None:
    """Bounded retries; and no "View run at URL" on stdout: MLflow prints the tracking URI as
    given, password included, and only the CLI writes stdout."""
    for key, value in MLFLOW_HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


def _open_parent(study: Any, space: Any) -> dict[str, str] | None:
    from mlflow import MlflowClient
    from mlflow.entities import Param

    _mlflow_env()
    uri = tracking_uri()
    if not _reachable(uri, f"study {study.study_name}'s trials train without MLflow runs"):
        return None
    client = MlflowClient(uri)
    recorded = study.user_attrs.get(attrs.MLFLOW)
    try:
        if recorded and _exists(client, recorded["run_id"]):
            client.update_run(recorded["run_id"], status="RUNNING")
            return recorded
        experiment_id = _experiment(client)
        run = client.create_run(
            experiment_id, run_name=study.study_name, tags={"tuner.study": study.study_name}
        )
        described = {
            "model": space.fixed.get("model_name_or_path"),
            "dataset": (space.fixed.get("dataset") or {}).get("path"),
            "objective": f"{space.objective.direction} {space.objective.metric}",
            "searched": ", ".join(space.params),
        }
        params = [Param(k, str(v)[:6000]) for k, v in described.items() if v]
        client.log_batch(run.info.run_id, params=params)
    except Exception as e:  # noqa: BLE001 - any failure of the tracker: warn, train on
        _warn(uri, e, f"study {study.study_name}'s trials train without MLflow runs")
        return None
    recorded = {
        "run_id": run.info.run_id,
        "experiment_id": experiment_id,
        "tracking_uri": _without_credentials(uri),
        "url": _link(uri, experiment_id, run.info.run_id),
    }
    study.set_user_attr(attrs.MLFLOW, recorded)
    logger.info("MLflow run of study %s: %s", study.study_name, mask_url(recorded["url"]))
    return recorded


def _close_parent(study: Any, parent: dict[str, str]) -> None:
    """The study's counts and best value on the parent run, which ends FINISHED."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from tuner.store import best_trial, state_counts

    uri = tracking_uri()
    try:
        client = MlflowClient(uri)
        values = {f"trials_{state}": n for state, n in state_counts(study).items()}
        best = best_trial(study)
        if best is not None:
            values.update(best_value=best.value, best_trial=best.number)
        stamp = _now_ms()
        metrics = [Metric(k, float(v), stamp, 0) for k, v in values.items()]
        client.log_batch(parent["run_id"], metrics=metrics)
        client.set_terminated(parent["run_id"], "FINISHED")
    except Exception as e:  # noqa: BLE001 - the run is done; its summary is only missing
        _warn(uri, e, "the study's MLflow run keeps its last summary")


def _experiment(client: Any) -> str:
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name)


def _exists(client: Any, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False  # deleted, or the study now reports to another server


# ----------------------------------------------------------------------------- a trial's run


class TrialRun:
    """Rank 0's run of one trial in the study's trackers: a context around the trial, whose
    exit records how it ended. `tracking` is what the Trainer reports with (None: nothing)."""

    def __init__(
        self, trial: Any, space: Any, *, artifacts: str, store: Any, values: dict[str, Any]
    ) -> None:
        self.trial = trial
        self.store = store  # the study's artifact store, as the worker opened it
        self.names = space_trackers(space)
        self.values = values
        self.artifacts = artifacts
        self.name = run_name(trial.study.study_name, trial.number)
        self.links: dict[str, str] = {}
        self.mlflow_uri: str | None = None
        self.tensorboard: Path | None = None
        self.tracking: Tracking | None = None

    def __enter__(self) -> TrialRun:
        if not self.names:
            return self
        names = list(self.names)
        if "mlflow" in names and not self._start_mlflow():
            names.remove("mlflow")
        if "tensorboard" in names:
            self.tensorboard = self._tensorboard_dir()
            self.links["tensorboard"] = str(self._tensorboard_shown())
        if "wandb" in names:
            # wandb.init reads it: the trials of a study show as one group.
            os.environ.setdefault("WANDB_RUN_GROUP", self.trial.study.study_name)
        if self.links:
            self.trial.set_user_attr(attrs.TRACKING, self.links)
        tb = str(self.tensorboard) if self.tensorboard else None
        self.tracking = Tracking(report_to=names, run_name=self.name, tensorboard_dir=tb)
        return self

    def __exit__(self, kind: Any, error: BaseException | None, tb: Any) -> None:
        if self.tracking is None:
            return
        import optuna

        if error is None:
            state, reason = "COMPLETE", None
        elif isinstance(error, optuna.TrialPruned):
            state, reason = "PRUNED", None
        else:
            state, reason = "FAIL", str(error).strip().splitlines()[0][:500] if str(error) else ""
        if "wandb" in self.tracking.report_to:
            self._end_wandb(state)
        if self.mlflow_uri is not None:
            self._end_mlflow(state, reason)
        if self.tensorboard is not None:
            self._upload_tensorboard()

    # -- MLflow

    def _start_mlflow(self) -> bool:
        import mlflow

        _mlflow_env()
        parent = self.trial.study.user_attrs.get(attrs.MLFLOW) or {}
        uri = os.environ.get("MLFLOW_TRACKING_URI") or parent.get("tracking_uri") or tracking_uri()
        if not _reachable(uri, f"trial {self.trial.number} trains without an MLflow run"):
            return False
        try:
            mlflow.set_tracking_uri(uri)
            experiment_id = parent.get("experiment_id") or _experiment(mlflow.MlflowClient(uri))
            run = mlflow.start_run(
                experiment_id=experiment_id,
                run_name=self.name,
                parent_run_id=parent.get("run_id"),
                tags={
                    "tuner.study": self.trial.study.study_name,
                    "tuner.trial": str(self.trial.number),
                },
            )
            # The searched values as the study resolved them (multiples multiplied); the
            # Trainer's callback adds its own arguments beside them.
            mlflow.log_params({k: str(v)[:6000] for k, v in self.values.items()})
        except Exception as e:  # noqa: BLE001 - any failure of the tracker: warn, train on
            _warn(uri, e, f"trial {self.trial.number} trains without an MLflow run")
            _drop_active_run()
            return False
        self.mlflow_uri = uri
        self.links["mlflow"] = _link(uri, experiment_id, run.info.run_id)
        return True

    def _end_mlflow(self, state: str, reason: str | None) -> None:
        import mlflow

        uri = self.mlflow_uri
        try:
            if not _reachable(uri, f"trial {self.trial.number}'s MLflow run is left unfinished"):
                _drop_active_run()
                return
            facts = self.trial.user_attrs if state == "COMPLETE" else {}
            metrics = {k: float(facts[k]) for k in FACTS if _number(facts.get(k))}
            if metrics:
                mlflow.log_metrics(metrics)
            tags = {"tuner.state": state}
            if reason:
                tags["tuner.fail_reason"] = mask_url(reason)
            mlflow.set_tags(tags)
            mlflow.flush_async_logging()  # HF's callback logs in the background
            mlflow.end_run(STATUS[state])
        except Exception as e:  # noqa: BLE001 - the trial has ended; only its run misses facts
            _warn(uri, e, f"trial {self.trial.number}'s MLflow run misses its final facts")
            _drop_active_run()

    # -- TensorBoard

    def _tensorboard_dir(self) -> Path:
        from tuner.common.locations import parse_location
        from tuner.common.settings import node_cache_dir

        location = parse_location(self.artifacts, source="the study's artifact location")
        root = location.path if location.path is not None else node_cache_dir()
        return root / "tensorboard" / self._tensorboard_key()

    def _tensorboard_key(self) -> str:
        return f"{self.trial.study.study_name}/trial-{self.trial.number}"

    def _tensorboard_shown(self) -> str:
        """Where a person points TensorBoard: the folder, or its S3 copy."""
        if self.artifacts.startswith("s3://"):
            return f"{self.artifacts.rstrip('/')}/tensorboard/{self._tensorboard_key()}"
        return str(self.tensorboard)

    def _upload_tensorboard(self) -> None:
        """With an S3 location: the trial's event files as plain objects, for `tensorboard
        --logdir s3://...` or a sync; the node's copy goes."""
        import shutil

        from tuner.store import PrefixedBoto3Store, store_errors

        store = self.store
        if not isinstance(store, PrefixedBoto3Store) or self.tensorboard is None:
            return
        try:
            for path in sorted(p for p in self.tensorboard.rglob("*") if p.is_file()):
                relative = path.relative_to(self.tensorboard).as_posix()
                key = store.key(f"tensorboard/{self._tensorboard_key()}/{relative}")
                store.client.upload_file(str(path), store.bucket, key)
        except store_errors() as e:
            logger.warning(
                "trial %d: TensorBoard events not uploaded to %s: %s",
                self.trial.number,
                self.artifacts,
                _first_line(e),
            )
            return
        shutil.rmtree(self.tensorboard, ignore_errors=True)

    # -- W&B

    def _end_wandb(self, state: str) -> None:
        """Finish the trial's W&B run (HF's callback leaves it open: the worker's next trial
        would log into it), keeping its link."""
        try:
            import wandb

            if wandb.run is None:
                return
            url = wandb.run.url
            wandb.finish(exit_code=0 if state != "FAIL" else 1)
            if url:
                self.trial.set_user_attr(attrs.TRACKING, {**self.links, "wandb": url})
        except Exception as e:  # noqa: BLE001 - any failure of the tracker: warn
            logger.warning("trial %d: W&B run not finished: %s", self.trial.number, _first_line(e))


# ----------------------------------------------------------------------------- helpers


def _link(uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page on an MLflow server; for a server-less store, `runs:/ID` (MLflow's own
    name for a run, as `mlflow ui` over that store shows it)."""
    if uri.startswith(("http://", "https://")):
        return (
            f"{_without_credentials(uri).rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
        )
    return f"runs:/{run_id}"


def _reachable(uri: str | None, consequence: str) -> bool:
    """Whether an MLflow server answers its health check (a URI without a server, an SQLite
    file say, always does). One warning when it does not, saying what follows."""
    if not uri or not uri.startswith(("http://", "https://")):
        return True
    # The health check needs no credentials (and urllib takes none in a URL).
    try:
        with urllib.request.urlopen(f"{_without_credentials(uri)}/health", timeout=PROBE_S):
            return True
    except Exception as e:  # noqa: BLE001 - down, refused, a proxy's error page: all unreachable
        _warn(uri, e, consequence)
        return False


_WARNED: set[tuple[str, str]] = set()


def _without_credentials(uri: str) -> str:
    """The URI without user, password, query or fragment: what may be stored and shown. The
    credentials come from each machine's MLFLOW_TRACKING_USERNAME/PASSWORD or _TOKEN."""
    if not uri.startswith(("http://", "https://")):
        return uri
    parts = urllib.parse.urlsplit(uri)
    bare = parts._replace(netloc=parts.netloc.rpartition("@")[2], query="", fragment="")
    return bare.geturl().rstrip("/")


def _warn(uri: str | None, error: BaseException, consequence: str) -> None:
    """A warning the first time a process meets this error of this server; after that the
    same news of each trial is a debug line, not a wall of warnings for a long sweep."""
    shown, why = mask_url(uri or "?"), mask_url(_first_line(error))
    level = logging.DEBUG if (shown, why) in _WARNED else logging.WARNING
    _WARNED.add((shown, why))
    logger.log(level, "MLflow at %s: %s; %s", shown, why, consequence)


def _drop_active_run() -> None:
    """Forget this thread's active MLflow run without asking the server (it is away; its
    retries would hold the worker): the worker's next trial starts its own. MLflow's own
    `end_run` pops the same stack, then calls the server."""
    import mlflow

    with contextlib.suppress(Exception):
        while mlflow.active_run() is not None:
            mlflow.tracking.fluent._active_run_stack.get().pop()


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300]}" if lines else type(error).__name__


def _number(value: Any) -> bool:
    import math

    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
