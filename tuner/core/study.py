"""Create, run and summarise studies: the API the CLI and the tests call.

A study holds its own space (user attr `space`), so any machine with the storage URL can run more
of its trials with no YAML file at hand (tuner.store opens it), and `optuna.load_study` opens it
like any other. Where its trials run is a backend's business, chosen by name (tuner.backends).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from trials import files
from trials.config import TrialConfig
from trials.data import DataError, check_rendering, renderer, to_examples
from tuner import backends
from tuner.common import extras
from tuner.common.errors import (
    RunFailed,
    SpaceError,
    StorageError,
    StoreFull,
    StudyDeleted,
    TunerError,
)
from tuner.common.limits import MAX_JOBS, check_count, check_name
from tuner.common.text import command
from tuner.core import base_model
from tuner.core.monitor import FINISHED, Monitor, Progress
from tuner.space import Space, from_stored, load_space
from tuner.store import (
    attrs,
    best_trial,
    deletion,
    gain,
    mask_url,
    open_storage,
    open_study,
    recovery,
    resolve_url,
    start_run,
    state_counts,
    wait_for_space,
)
from tuner.trial import tracking

if TYPE_CHECKING:
    from tuner.store import OpenStudy

logger = logging.getLogger(__name__)

# Per-trial measurements `study show --facts` prints, in order.
FACTS = ("tokens_per_s", "peak_mem_gb", "gpu_hours", "best_eval_step", "truncation_ratio")


# ----------------------------------------------------------------------------- create / open


def create_study(
    space: str | Path,
    *,
    name: str | None = None,
    storage: str | None = None,
    load_if_exists: bool = False,
    enqueue: Sequence[tuple[dict[str, Any], dict[str, Any]]] = (),
    artifacts: str | None = None,
) -> str:
    """Validate the space (its local data, its base model), then create the study; returns its
    name.

    `artifacts`: where the study keeps its artifacts, a local path or s3://BUCKET/PREFIX; else
    $TUNER_ARTIFACTS, else the space's `artifacts:`, else `tuner_artifacts/` beside the store.

    `enqueue`: (resolved values, user attrs) of trials to run first, before the baseline (a
    sweep's warm start); only when the study is new.

    `name` (default: the space's) must pass tuner.common.limits.check_name; an empty one is refused.

    Nothing is written unless the space is valid. If writing the study's attributes fails
    midway, the study is deleted again, so no half-made study is left behind.
    """
    from tuner.store import choose_location  # optuna.artifacts loads boto3: not for reads

    parsed = load_space(space)
    _check_model_and_data(parsed, display=str(space))
    _check_quantization_here(parsed, display=str(space))
    _check_deepspeed_here(parsed, display=str(space))
    if name is not None:
        name = check_name(name, key="--name")
    else:
        name = check_name(parsed.name, key=f"{space}: name")
    url = resolve_url(storage)
    location = choose_location(
        artifacts, space_value=parsed.artifacts, space_file=str(space), storage_url=url
    )
    store = open_storage(url)
    try:
        study = optuna.create_study(
            storage=store, study_name=name, direction=parsed.objective.direction
        )
    except optuna.exceptions.DuplicatedStudyError:
        if not load_if_exists:
            raise StorageError(
                f"study {name!r} already exists in {mask_url(url)}; pass --load-if-exists to "
                "reuse it, or choose another --name"
            ) from None
        _check_same_space(store, name, parsed)
        return name

    try:
        study.set_user_attr(attrs.ARTIFACTS, location.url)
        study.set_user_attr(attrs.SPACE_FILE, str(space))
        for values, trial_attrs in enqueue:
            study.enqueue_trial(parsed.optuna_params(values), user_attrs=trial_attrs)
        baseline = parsed.baseline_values()
        if baseline is not None:
            study.enqueue_trial(parsed.optuna_params(baseline), user_attrs={attrs.BASELINE: True})
        _save_note(study, name, parsed, space_file=str(space))
        # Written last: a study with a space is complete, and readers wait for it.
        study.set_user_attr(attrs.SPACE, parsed.to_stored())
    except BaseException:
        optuna.delete_study(study_name=name, storage=store)
        raise
    logger.info("created study %s in %s", name, mask_url(url))
    return name


def _save_note(study: optuna.Study, name: str, space: Space, *, space_file: str) -> None:
    # The dashboard shows it on the study's page: what this study is, at a glance. Without the
    # 'dashboard' extra there is no page to show it on (and no optuna_dashboard to write it).
    if not extras.is_installed("dashboard"):
        return
    from optuna_dashboard import save_note

    save_note(study, study_note(name, space, space_file=space_file))


def study_note(name: str, space: Any, *, space_file: str | None = None) -> str:
    """The study's description, shown as its note in the dashboard (Markdown)."""
    fixed = space.fixed
    lines = [f"## {name}"]
    if space.description:
        lines += ["", space.description]
    lines.append("")
    model = fixed.get("model_name_or_path")
    if model:
        lines.append(f"- **base model**: `{model}`")
    dataset = fixed.get("dataset")
    if isinstance(dataset, dict):
        lines.append(f"- **data set**: `{dataset.get('path')}` ({dataset.get('format', 'auto')})")
    elif fixed.get("workload") == "simulated":
        lines.append("- **workload**: simulated (no model, no data)")
    objective = space.objective
    lines.append(f"- **objective**: {objective.direction} `{objective.metric}`")
    searched = ", ".join(f"`{name}`" for name in space.params)
    lines.append(f"- **searched**: {searched}")
    if space.fixed.get("deepspeed"):
        lines.append(f"- **DeepSpeed**: {space.fixed['deepspeed']}")
    if space_file:
        lines.append(f"- **space file**: `{space_file}`")
    export = command("tuner", "study", "export", name, "--out", "DIR")
    lines += ["", f"Export the best trial: `{export}`"]
    return "\n".join(lines)


def _check_model_and_data(space: Space, *, display: str) -> None:
    """Read the whole local data set now, so a bad record fails `create`, not every trial; check
    the base model (tuner.core.base_model); and render the first example through the model's chat
    template, so a template that would not train the answers as written fails here too."""
    if space.fixed.get("workload", "sft") != "sft":
        return  # a workload without a model or data
    config = TrialConfig.model_validate(space.fixed)
    examples = None
    if Path(config.dataset.path).exists():  # else a hub id: read when the first trial runs
        try:
            examples = to_examples(config.dataset)
        except DataError as e:
            raise SpaceError(f"{display}: fixed.dataset: {e}") from None
    try:
        tokenizer = base_model.check(config)
    except base_model.ModelError as e:
        raise SpaceError(f"{display}: fixed.model_name_or_path: {e}") from None
    if examples is None:
        return
    try:
        check_rendering(examples, renderer(tokenizer, config), name=Path(config.dataset.path).name)
    except DataError as e:
        raise SpaceError(f"{display}: fixed.template: {e}") from None


def _check_quantization_here(space: Space, *, display: str) -> None:
    """A QLoRA space needs bitsandbytes where it is created: this machine is taken to have the
    workers' set-up (as for its local paths), and without it every trial would fail at load."""
    import importlib.util

    bits = space.fixed.get("quantization_bit")
    if bits is not None and importlib.util.find_spec("bitsandbytes") is None:
        raise SpaceError(
            f"{display}: fixed.quantization_bit: {bits} needs bitsandbytes, which is not "
            "installed here; pip install 'lora-tuner[qlora]' (on the workers too)"
        )


def _check_deepspeed_here(space: Space, *, display: str) -> None:
    """A DeepSpeed space needs the 'deepspeed' extra, taken like bitsandbytes above to be the
    workers' too; without it every trial would fail as the Trainer starts."""
    preset = space.fixed.get("deepspeed")
    if preset is not None:
        extras.require("deepspeed", what=f"{display}: fixed.deepspeed: {Path(preset).name}")


def _check_same_space(store: optuna.storages.BaseStorage, name: str, space: Space) -> None:
    # Through the model, so fields added since the study was made compare as their defaults.
    stored = from_stored(wait_for_space(store, name)).to_stored()
    if stored != space.to_stored():
        raise StorageError(
            f"study {name!r} exists with a different space; use another --name, or "
            f"`{command('tuner', 'study', 'delete', name)}` first"
        )


# ----------------------------------------------------------------------------- running


def run_study(
    name: str,
    *,
    storage: str | None = None,
    n_trials: int | None = None,
    timeout: float | None = None,
    jobs: int | None = None,
    backend: str | None = "local",
    address: str | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    poll_s: float = 1.0,
) -> Progress:
    """Run `n_trials` more trials (default: until the space's budget).

    `local`: `jobs` worker processes on this machine (default 1). `ray`: on the Ray cluster at
    `address`, by the space's `resources`, as many at once as the trials left (or `jobs`): those
    the cluster has no room for wait, which asks its autoscaler for nodes; none placed within
    `resources.placement_timeout` fails the run (BackendError). None: `ray` inside a Ray job,
    else `local`.
    `n_trials` is 1 to tuner.common.limits.MAX_TRIALS, `jobs` 1 to MAX_JOBS.
    `timeout` (default: the budget's) stops new trials from starting after that many seconds;
    running ones finish; `math.inf`: no limit, the budget's `timeout` included. Returns what
    this run did; its `stop_reason` is set when the run stopped because
    `resources.max_identical_failures` trials in a row failed with the same error.
    """
    backend = _check_run_args(backend, n_trials=n_trials, jobs=jobs, timeout=timeout)
    opened = _open_for_run(name, storage, backend=backend)
    study, space = opened.study, opened.space
    n_trials, timeout, jobs = _run_size(
        study, space, backend=backend, n_trials=n_trials, timeout=timeout, jobs=jobs
    )
    # The run's id and seed offset: runs of the study at once draw apart (tuner/store/_runs.py).
    with start_run(opened.url, name) as run:
        plan = backends.RunPlan(
            name,
            opened.url,
            n_trials,
            timeout,
            jobs,
            resources=space.resources,
            budget=space.budget,
            run=run.id,
            seed_offset=run.seed_offset,
            workload=space.fixed.get("workload", "sft"),
            **_device_needs(space),
        )
        monitor = Monitor(
            study, opened.store, target=n_trials, run=run.id, on_progress=on_progress, poll_s=poll_s
        )
        started = datetime.now()  # Optuna records trials' times as naive local time
        stop_reason = _run_watched(plan, monitor, opened, backend=backend, address=address)
    monitor.progress.stop_reason = stop_reason
    _tidy_after_run(opened, since=started)
    return monitor.progress


def _check_run_args(
    backend: str | None, *, n_trials: int | None, jobs: int | None, timeout: float | None
) -> str:
    """Refuse a bad argument before the store is touched; returns the backend's name."""
    backend = backend or backends.default_backend()
    backends.check_name(backend)
    if n_trials is not None:
        check_count(n_trials, key="--n-trials")
    if jobs is not None:
        check_count(jobs, key="--jobs", most=MAX_JOBS)
    if timeout is not None and not timeout > 0:
        raise TunerError(f"--timeout must be > 0, or none for no limit (got {timeout:g}s)")
    return backend


def _open_for_run(name: str, storage: str | None, *, backend: str) -> OpenStudy:
    """Open the study to run, refusing what would fail every trial alike; then fail the trials a
    killed run left RUNNING, before this run counts what is done."""
    opened = open_study(name, storage, heartbeat=True)
    study, space = opened.study, opened.space
    deletion.check_not_marked(name, study.user_attrs)
    tracking.check_installed(space)
    if backend == "local":
        _check_paths_here(name, space)
    orphans = recovery.fail_orphans(study, max_retries=space.resources.max_retries)
    if orphans:
        logger.warning("failed %d trials left RUNNING by a run that was killed", orphans)
    return opened


def _run_size(
    study: optuna.Study,
    space: Space,
    *,
    backend: str,
    n_trials: int | None,
    timeout: float | None,
    jobs: int | None,
) -> tuple[int | None, float | None, int | None]:
    """This run's trials, timeout and jobs: those asked for, else what the budget leaves."""
    if n_trials is None and space.budget.n_trials is not None:
        done = _done(study)
        n_trials = max(0, space.budget.n_trials - done)
        logger.info("budget: %d of %d trials done, %d to go", done, space.budget.n_trials, n_trials)
    timeout = timeout if timeout is not None else space.budget.timeout
    if timeout == math.inf:
        timeout = None  # `--timeout none`: no limit, whatever the budget says
    if backend == "local":
        jobs = jobs or 1
    if n_trials is not None and jobs is not None:
        jobs = max(1, min(jobs, n_trials))  # a worker with nothing to do only costs start-up
    return n_trials, timeout, jobs


def _run_watched(
    plan: backends.RunPlan,
    monitor: Monitor,
    opened: OpenStudy,
    *,
    backend: str,
    address: str | None,
) -> str | None:
    """Run the plan's trials while `monitor` reports them; returns why the run stopped early
    (RunFailed), or None when it ran its course. The monitor is stopped on the way out."""
    monitor.start()
    try:
        if plan.n_trials != 0:
            with tracking.study_run(opened.study, opened.space):
                backends.run_trials(plan, backend=backend, address=address)
    except StudyDeleted as e:
        monitor.stop()
        done = monitor.progress.finished
        raise StudyDeleted(f"{e}; {done} of its trials had finished") from None
    except StoreFull as e:
        e.exit_code = 1  # the run ran: its trials are retried by the next, once there is room
        raise
    except RunFailed as e:
        return str(e)  # returned with the summary: the caller reports both
    finally:
        monitor.stop()
    return None


def _tidy_after_run(opened: OpenStudy, *, since: datetime) -> None:
    """What the run leaves to clear once it ended: orphaned trials, and the checkpoints of its
    trials that failed (since `since`) and that no retry will resume."""
    resources = opened.space.resources
    # Trials of a killed run whose workers were still winding down when this run started.
    recovery.fail_orphans(opened.study, max_retries=resources.max_retries)
    if resources.checkpoint_every is not None:
        from tuner.store import checkpoints

        checkpoints.drop_unresumable(opened.study, opened.artifact_store(), since=since)


def _device_needs(space: Space) -> dict[str, Any]:
    """What a trial asks of the machine it trains on; the simulated workload trains nothing."""
    if space.fixed.get("workload", "sft") != "sft":
        return {}
    return {"bf16": bool(space.fixed.get("bf16")), "deepspeed": space.fixed.get("deepspeed")}


def _done(study: optuna.Study) -> int:
    """Finished trials that count against the budget: a failed trial that a retry replaced
    does not, its retry does."""
    trials = study.get_trials(deepcopy=False)
    replaced = recovery.superseded(trials)
    return sum(t.state in FINISHED and t.number not in replaced for t in trials)


def _check_paths_here(name: str, space: Space) -> None:
    """Local paths were made absolute at create; on this machine they must still be there, or
    every trial would fail the same way."""
    for key, value in (
        ("fixed.model_name_or_path", space.fixed.get("model_name_or_path")),
        ("fixed.dataset.path", (space.fixed.get("dataset") or {}).get("path")),
    ):
        if not value or not Path(value).is_absolute():
            continue
        what = files.kind(value)
        if what is None:
            raise StorageError(f"study {name!r}: {key} {value!r} does not exist on this machine")
        if what not in ("file", "folder"):
            # Replaced since the study was made: every trial would fail (or block) on it.
            raise StorageError(
                f"study {name!r}: {key} {value!r} is {what} now; it must be a file or a folder"
            )


# ----------------------------------------------------------------------------- reading


def baseline_trial(study: optuna.Study) -> FrozenTrial | None:
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get(attrs.BASELINE):
            return t
    return None


def best_report(name: str, storage: str | None = None) -> dict[str, Any]:
    """The best trial, its resolved params, and how far it beat the baseline."""
    opened = open_study(name, storage)
    study = opened.study
    best = best_trial(study)
    if best is None:
        raise StorageError(f"study {name!r} has no completed trial yet")
    report: dict[str, Any] = {
        "study": name,
        "metric": opened.space.objective.metric,
        "direction": study.direction.name.lower(),
        "trial": best.number,
        "value": best.value,
        "params": best.user_attrs.get(attrs.HPARAMS, best.params),
        "n_trials": state_counts(study),
        "baseline": None,
    }
    base = baseline_trial(study)
    if base is not None:
        report["baseline"] = {"trial": base.number, "state": base.state.name, "value": base.value}
        if base.state == TrialState.COMPLETE and base.value is not None:
            margin = gain(base.value, best.value, study.direction)
            report["baseline"]["improvement"] = margin
            report["baseline"]["improvement_pct"] = (
                100 * margin / abs(base.value) if base.value else None
            )
    return report


@dataclass
class TrialRow:
    number: int
    state: str
    params: dict[str, Any]
    value: float | None
    pruned_at_step: int | None
    duration_s: float | None
    note: str
    facts: dict[str, Any]  # what the trial measured: FACTS, where recorded
    runs: dict[str, str] = field(default_factory=dict)  # tracker -> the trial's run (link, folder)

    @staticmethod
    def columns(*, facts: bool = False) -> list[str]:
        base = ["#", "state", "value", "params", "pruned at", "duration", "note"]
        return base + list(FACTS if facts else ())

    def cells(self, *, facts: bool = False) -> list[str]:
        """The row as text, in the order of `columns`: `study show` and the report print it."""
        from tuner.common.text import number

        params = " ".join(f"{k}={number(v)}" for k, v in self.params.items())
        return [
            str(self.number),
            self.state.lower(),
            number(self.value),
            params,
            "" if self.pruned_at_step is None else f"step {self.pruned_at_step}",
            "" if self.duration_s is None else f"{self.duration_s:.1f}s",
            self.note,
            *((number(self.facts.get(key)) for key in FACTS) if facts else ()),
        ]


def trial_rows(name: str, storage: str | None = None) -> list[TrialRow]:
    return study_rows(open_study(name, storage).study)


def study_rows(study: optuna.Study) -> list[TrialRow]:
    """One row per trial: what `study show` and the report's table print."""
    rows = []
    trials = study.get_trials(deepcopy=False)
    retried_as = {
        t.system_attrs[attrs.RETRY_HISTORY][-1]: t.number
        for t in trials
        if t.system_attrs.get(attrs.RETRY_HISTORY)
    }
    for t in trials:
        duration = t.duration.total_seconds() if t.duration else None
        rows.append(
            TrialRow(
                number=t.number,
                state=t.state.name,
                params=t.user_attrs.get(attrs.HPARAMS, t.params),
                value=t.value,
                pruned_at_step=t.last_step if t.state == TrialState.PRUNED else None,
                duration_s=duration,
                note=_note(t, retried_as.get(t.number)),
                facts={k: t.user_attrs[k] for k in FACTS if t.user_attrs.get(k) is not None},
                runs=dict(t.user_attrs.get(attrs.TRACKING) or {}),
            )
        )
    return rows


def _note(trial: FrozenTrial, retry: int | None) -> str:
    """Why a trial failed (and by what it was replaced), and whether it is the baseline."""
    reason = [trial.user_attrs.get(attrs.FAIL_REASON), trial.user_attrs.get(attrs.FAIL_DETAIL)]
    if trial.state == TrialState.FAIL and reason[0] is None:
        # Everything tuner fails records why, except Optuna's own heartbeat check.
        reason[0] = "no heartbeat for the grace period, or failed outside tuner"
    if retry is not None:
        reason.append(f"(retried as trial {retry})")
    if trial.user_attrs.get(attrs.BASELINE):
        reason.insert(0, "baseline")
    return " ".join(filter(None, reason))


@dataclass
class StudyRow:
    name: str
    direction: str
    counts: dict[str, int]
    best_value: float | None
    started: str | None


def list_studies(storage: str | None = None) -> list[StudyRow]:
    """Every study in the store; NoStore (and nothing made) when there is no store."""
    store = open_storage(storage, must_exist=True)
    rows = []
    for summary in optuna.get_all_study_summaries(store, include_best_trial=False):
        study = optuna.load_study(study_name=summary.study_name, storage=store)
        best = best_trial(study)
        rows.append(
            StudyRow(
                name=summary.study_name,
                direction=summary.direction.name.lower(),
                counts=state_counts(study),
                best_value=best.value if best else None,
                started=summary.datetime_start.isoformat(timespec="seconds")
                if summary.datetime_start
                else None,
            )
        )
    return rows


def delete_study(
    name: str, storage: str | None = None, *, force: bool = False, wait_s: float | None = None
) -> int:
    """Delete the study and its artifacts (the trials' and the study's own, wherever its location
    is), checked gone; returns how many artifacts were removed. A study with running trials is
    refused (naming them) unless `force`: then they stop at their next report (at most `wait_s`,
    default the heartbeat grace period), their run ends, and the study goes
    (tuner/store/_deletion.py).
    """
    return deletion.delete(name, storage, force=force, wait_s=wait_s)
