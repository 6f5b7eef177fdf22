"""`tuner study`: create, run and inspect one study."""

from __future__ import annotations

import json
import math
import sys
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer

from tuner.common.errors import TunerError
from tuner.common.text import command as _command
from tuner.common.text import number as _num
from tuner.face.cli._format import masked, new_table, plural, print_table
from tuner.face.cli._options import (
    Address,
    AsJson,
    BackendName,
    Jobs,
    NTrials,
    Requirements,
    Storage,
    StudyName,
    Timeout,
    WorkingDir,
)
from tuner.face.cli._run import (
    Where,
    fail,
    job_hints,
    run_here_or_as_job,
    stop_on_sigterm,
    watch_job,
)

app = typer.Typer(help="Create, run and inspect studies.", no_args_is_help=True)


@app.command("create")
def study_create(
    space: Annotated[str, typer.Option("--space", help="Space YAML: a path, or a packaged name.")],
    name: Annotated[
        str | None,
        typer.Option(
            help="Study name (default: the space's): printable, one line, no '/', '\\' or "
            "'..', at most 200 bytes."
        ),
    ] = None,
    storage: Storage = None,
    load_if_exists: Annotated[
        bool, typer.Option("--load-if-exists", help="Reuse a study of this name and space.")
    ] = False,
    artifacts: Annotated[
        str | None,
        typer.Option(
            "--artifacts",
            help="Where the study keeps adapters, checkpoints, reports and tokenised data: a "
            "path or s3://BUCKET/PREFIX (endpoint: $AWS_ENDPOINT_URL). Default: "
            "$TUNER_ARTIFACTS, else the space's `artifacts:`, else tuner_artifacts/ beside "
            "the store.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Validate a search space and create its study; prints the study name."""
    from tuner.core.study import create_study

    typer.echo(
        create_study(
            space, name=name, storage=storage, load_if_exists=load_if_exists, artifacts=artifacts
        )
    )


@app.command("run")
def study_run(
    name: StudyName,
    storage: Storage = None,
    n_trials: NTrials = None,
    timeout: Timeout = None,
    jobs: Jobs = None,
    backend: Annotated[
        BackendName | None,
        typer.Option(
            help="local: worker processes here; ray: a Ray cluster. "
            "Default: ray inside a Ray job (`ray job submit`), else local.",
            show_default=False,
        ),
    ] = None,
    address: Address = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="The final summary as one JSON object on stdout.")
    ] = False,
) -> None:
    """Run trials of a study on this machine, with a progress bar; Ctrl-C stops cleanly.

    Exit status 1 when the run was stopped (its trials kept failing the same way) or when it
    finished trials and every one failed."""
    from tuner import backends
    from tuner.core.study import best_report, run_study
    from tuner.space import parse_duration

    seconds = _duration(timeout, parse_duration)
    progress = run_here_or_as_job(
        Where(storage=storage, backend=backend, address=address, jobs=jobs),
        here=partial(run_study, name, n_trials=n_trials, timeout=seconds),
        job=partial(backends.submit_study, name, n_trials=n_trials, timeout=timeout),
        again=_command("tuner", "study", "run", name),
    )
    if progress is None:
        return  # it ran as a Ray job, whose log and status were its output
    try:
        report = best_report(name, storage)
    except TunerError:
        report = None  # no completed trial yet: no best line
    failure = _run_failure(progress)
    if as_json:
        typer.echo(json.dumps(_run_summary(name, progress, report, failure)))
    else:
        _say_run(name, progress, report, ok=failure is None, storage=storage)
    if failure is not None:
        fail(failure, exit_code=1)


def _say_run(
    name: str, progress: Any, report: dict[str, Any] | None, *, ok: bool, storage: str | None
) -> None:
    """The run's counts and best line; after a good run, the commands that come next."""
    others = progress.others_finished
    typer.echo(
        f"{plural(progress.finished, 'trial')} finished: {progress.complete} complete, "
        f"{progress.pruned} pruned, {progress.failed} failed"
        + (f"; other runs of the study finished {others} meanwhile" if others else "")
    )
    if report is None:
        return
    typer.echo(_best_line(report))
    if ok:
        # Quoted for the shell, the password masked: they are made to be pasted.
        flag = ["--storage", masked(storage)] if storage else []
        typer.echo(f"details: {_command('tuner', 'study', 'show', name, *flag)}")
        typer.echo(f"watch:   {_command('tuner', 'dashboard', *flag)}")
        export = _command("tuner", "study", "export", name, *flag, "--out", f"{name}-best")
        typer.echo(f"export:  {export}")


def _run_failure(progress: Any) -> str | None:
    """Why the run failed, if it did: stopped because its trials kept failing the same way, or
    every trial it finished failed (a run that reports success must have a result). A pruned
    trial is a result: the pruner stopped it on purpose, and its curve informs the search."""
    stop_reason = getattr(progress, "stop_reason", None)
    if stop_reason:
        return stop_reason
    if progress.finished and progress.failed == progress.finished:
        return (
            f"this run finished {plural(progress.finished, 'trial')} and every one failed "
            "(see `tuner study show`)"
        )
    return None


def _run_summary(
    name: str, progress: Any, report: dict[str, Any] | None, failure: str | None
) -> dict[str, Any]:
    return {
        "study": name,
        "finished": progress.finished,
        "complete": progress.complete,
        "pruned": progress.pruned,
        "failed": progress.failed,
        # This run's id (each of its trials has it as user attr `run`), and the trials that other
        # runs of the study at once finished while it ran: `finished` counts this run's only.
        "run": progress.run,
        "others_finished": progress.others_finished,
        "best_value": report["value"] if report else None,
        "best_trial": report["trial"] if report else None,
        "metric": report["metric"] if report else None,
        "stop_reason": getattr(progress, "stop_reason", None),
        "error": failure,
    }


@app.command("submit")
def study_submit(
    name: StudyName,
    address: Annotated[
        str, typer.Option(help="The Ray dashboard of the cluster: http://HEAD:8265.")
    ],
    storage: Storage = None,
    n_trials: NTrials = None,
    timeout: Timeout = None,
    working_dir: WorkingDir = Path("."),
    requirements: Requirements = None,
    follow: Annotated[
        bool,
        typer.Option(
            "--follow",
            help="Show the job's log until it ends, and exit with its status "
            "(Ctrl-C leaves it running).",
        ),
    ] = False,
) -> None:
    """Submit the sweep to a Ray cluster as a job; prints the job id."""
    from tuner.backends import submit_study
    from tuner.space import parse_duration

    _duration(timeout, parse_duration)  # a bad value fails here, not on the cluster
    stop_on_sigterm()
    job = submit_study(
        name,
        address=address,
        storage=storage,
        n_trials=n_trials,
        timeout=timeout,
        working_dir=working_dir,
        requirements=requirements,
    )
    typer.echo(job.job_id)
    if follow:
        watch_job(job, foreground=False)
        return
    typer.echo(job_hints(job), err=True)


@app.command("list")
def study_list(storage: Storage = None, as_json: AsJson = False) -> None:
    """Studies in the store, with trial counts and best values."""
    import dataclasses

    from tuner.core.study import list_studies
    from tuner.store import NoStore

    try:
        rows = list_studies(storage)
    except NoStore as e:
        if as_json:
            typer.echo("[]")
        else:
            typer.echo(f"no studies: {e}")
        return
    if as_json:
        typer.echo(json.dumps([dataclasses.asdict(row) for row in rows], indent=2))
        return
    if not rows:
        typer.echo("no studies")
        return
    table = new_table("study", "direction", "trials", "best", "started")
    for row in rows:
        counts = ", ".join(f"{n} {state}" for state, n in row.counts.items()) or "none"
        table.add_row(row.name, row.direction, counts, _num(row.best_value), row.started or "")
    print_table(table)


@app.command("show")
def study_show(
    name: StudyName,
    storage: Storage = None,
    facts: Annotated[
        bool,
        typer.Option(
            "--facts", help="Also tokens/s, peak GPU memory, GPU-hours, best step, truncation."
        ),
    ] = False,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json", help="The trial table, params and facts included, as a JSON list of rows."
        ),
    ] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="The same table as CSV.")] = False,
) -> None:
    """Every trial: state, value, params, where it was pruned, how long it took."""
    from tuner.core.study import TrialRow, trial_rows

    rows = trial_rows(name, storage)
    if as_json or as_csv:
        _print_records([_record(row) for row in rows], as_csv=as_csv)
        return
    table = new_table(*TrialRow.columns(facts=facts))
    for row in rows:
        table.add_row(*row.cells(facts=facts))
    print_table(table)


def _record(row: Any) -> dict[str, Any]:
    """A trial as a flat row, named as Optuna's `trials_dataframe()` names its columns (params_X,
    user_attrs_X for the measured facts), so that the same scripts read both."""
    return {
        "number": row.number,
        "value": row.value,
        "state": row.state,
        "duration_s": row.duration_s,
        **{f"params_{k}": v for k, v in row.params.items()},
        **{f"user_attrs_{k}": v for k, v in row.facts.items()},
        "pruned_at_step": row.pruned_at_step,
        "note": row.note,
    }


def _print_records(records: list[dict[str, Any]], *, as_csv: bool) -> None:
    if not as_csv:
        typer.echo(json.dumps(records, indent=2))
        return
    import csv

    columns: dict[str, None] = {}  # every row's keys, in first-seen order
    for record in records:
        columns.update(dict.fromkeys(record))
    writer = csv.DictWriter(sys.stdout, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)


@app.command("best")
def study_best(
    name: StudyName,
    storage: Storage = None,
    as_json: AsJson = False,
) -> None:
    """The best trial's params and value, and its margin over the baseline."""
    from tuner.core.study import best_report

    report = best_report(name, storage)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(_best_line(report))
    for key, value in report["params"].items():
        typer.echo(f"  {key}: {_num(value)}")


@app.command("export")
def study_export(
    name: StudyName,
    out: Annotated[
        str,
        typer.Option(
            "--out",
            help="Folder to write (made atomically): a new one, or an earlier export with "
            "--force; never the working directory, the model's, the data's or the study's.",
        ),
    ],
    trial: Annotated[
        int | None, typer.Option("--trial", help="Trial number (default: the best).")
    ] = None,
    storage: Storage = None,
    adapter_only: Annotated[
        bool, typer.Option("--adapter-only", help="The PEFT adapter, not a merged model.")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an earlier export at --out (nothing else).")
    ] = False,
) -> None:
    """Merge the best trial's adapter into its base and save a verified checkpoint."""
    from tuner.core.export import export_trial

    report = export_trial(
        name, out=out, storage=storage, trial_number=trial, adapter_only=adapter_only, force=force
    )
    check = report.verification
    kind = "adapter" if report.adapter_only else "merged model"
    typer.echo(
        f"exported trial {report.trial} ({_num(report.value)}) as a {kind} to {report.out} "
        f"in {report.seconds:.0f}s; verified: logits within {check.max_logit_diff:.2g}, "
        f"greedy tokens equal, validation loss {check.val_loss:.4f}; "
        f"sampling temperature {report.temperature:g}, top_p {report.top_p:g}"
    )


@app.command("report")
def study_report(
    name: StudyName,
    out: Annotated[Path, typer.Option("--out", help="The HTML file to write.")] = Path(
        "report.html"
    ),
    storage: Storage = None,
    attach: Annotated[
        bool,
        typer.Option(
            "--attach/--no-attach", help="Also keep the report as a study artifact (dashboard)."
        ),
    ] = True,
) -> None:
    """One self-contained HTML file: plots, trial table, the best trial and how to export it."""
    from tuner.face.report import write_report

    report = write_report(name, out=out, storage=storage, attach=attach)
    typer.echo(f"report: {report.path} ({plural(report.plots, 'plot')})")
    for title, why in report.skipped.items():
        typer.echo(f"  not drawn: {title}: {why}", err=True)


@app.command("delete")
def study_delete(
    name: StudyName,
    storage: Storage = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Delete it even while trials run: they stop at their next report (FAIL "
            "'study deleted') and their run ends.",
        ),
    ] = False,
) -> None:
    """Delete a study, its trials and their artifacts (adapters, reports, checkpoints).
    Refused while its trials run, unless --force; "deleted" is printed only once it is gone."""
    from tuner.core.study import delete_study

    if not yes and sys.stdin.isatty():
        typer.confirm(f"delete study {name!r} and its adapters?", abort=True)
    removed = delete_study(name, storage, force=force)
    typer.echo(f"deleted study {name} ({removed} artifact files)")


def _best_line(report: dict[str, Any]) -> str:
    line = f"best {report['metric']} {_num(report['value'])} (trial {report['trial']})"
    base = report.get("baseline")
    if base and base.get("improvement") is not None:
        pct = base.get("improvement_pct")
        line += (
            f"; baseline {_num(base['value'])} (trial {base['trial']}): "
            f"better by {_num(base['improvement'])}" + (f" ({pct:.1f}%)" if pct is not None else "")
        )
    elif base:
        line += f"; baseline trial {base['trial']} is {base['state'].lower()}"
    return line


def _duration(text: str | None, parse) -> float | None:  # noqa: ANN001
    """--timeout as seconds; `none` is math.inf, no limit (run_study's word for it)."""
    if text is None:
        return None
    if text.strip().lower() == "none":
        return math.inf
    try:
        return parse(text)
    except ValueError as e:
        raise TunerError(f"--timeout {e}; or none for no limit") from None
