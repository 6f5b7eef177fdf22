"""`tuner`: a thin command line over the library (tuner.core.study, tuner.space, tuner.core.demo).

Each command calls one library function and formats its result; only this module writes to
stdout. A `TunerError` becomes one line on stderr and its exit status (2: bad input); so does
a usage error (unknown command, missing or bad argument).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from tuner.common.errors import TunerError
from tuner.common.text import command as _command
from tuner.common.text import number as _num

app = typer.Typer(
    help="Hyperparameter search for LoRA fine-tuning, on Optuna.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
study_app = typer.Typer(help="Create, run and inspect studies.", no_args_is_help=True)
demo_app = typer.Typer(help="The offline demo: a tiny local model and data.", no_args_is_help=True)
app.add_typer(study_app, name="study")
sweep_app = typer.Typer(
    help="Recurring sweeps (nightly from cron): warm-started, budgeted, promoting a champion.",
    no_args_is_help=True,
)
app.add_typer(sweep_app, name="sweep")


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_DATEFMT = "%Y-%m-%d %H:%M:%S"
# Libraries whose INFO lines are chatter (ray...job.sdk: "WebSocket closed" as a followed job's
# log ends); shown from -vv.
NOISY_LOGGERS = ("httpx", "urllib3", "filelock", "ray.dashboard.modules.job.sdk")


def _show_version(value: bool) -> None:
    if value:
        from tuner import __version__

        typer.echo(f"tuner {__version__}")
        raise typer.Exit()


@app.callback()
def _setup(
    verbose: Annotated[
        int,
        typer.Option(
            "--verbose",
            "-v",
            count=True,
            help="More output: -v tuner's debug lines and Optuna's, -vv every library's "
            "(workers too, through $TUNER_VERBOSITY).",
            show_default=False,
        ),
    ] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Warnings and errors only.")] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_show_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Runs before any command (not for --help)."""
    if quiet or verbose:
        # In the environment, so that worker processes (local, or Ray actors) inherit it.
        os.environ["TUNER_VERBOSITY"] = str(-1 if quiet else verbose)
    _set_log_levels(_verbosity())


def _verbosity() -> int:
    try:
        return int(os.environ.get("TUNER_VERBOSITY", "0"))
    except ValueError:
        return 0


def _set_log_levels(verbosity: int) -> None:
    """-1: warnings only; 0: tuner's INFO lines; 1: tuner's DEBUG lines and Optuna's INFO;
    2+: everything. Optuna's lines go through our handler (one format, with timestamps); at 0
    its INFO lines would repeat ours, and its notes that heartbeats and artifacts are
    experimental are not for the user to act on."""
    import warnings

    import optuna

    verbosity = max(-1, min(verbosity, 2))
    logging.getLogger().setLevel(
        logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity >= 2 else logging.INFO
    )
    for name in ("tuner", "trials"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbosity >= 1 else logging.NOTSET)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.NOTSET if verbosity >= 2 else logging.WARNING)
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    optuna.logging.set_verbosity(
        {-1: logging.WARNING, 0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    )
    if verbosity < 2:
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


app.add_typer(demo_app, name="demo")

Storage = Annotated[
    str | None,
    typer.Option(
        "--storage",
        help="Study store URL (sqlite:///FILE or postgresql://USER@HOST/DB). "
        "Default: $TUNER_STORAGE, else sqlite:///tuner.db here.",
        show_default=False,
    ),
]


NTrials = Annotated[
    int | None,
    typer.Option("--n-trials", help="Trials to run now, 1 to 1,000,000 (default: to the budget)."),
]
AsJson = Annotated[bool, typer.Option("--json", help="Machine-readable output (JSON).")]
StudyName = Annotated[
    str, typer.Argument(metavar="NAME", help="The study's name (see `tuner study list`).")
]
# The names of tuner.backends.BACKENDS (a test checks they agree), spelt out so that --help
# lists them without importing the backends.
BackendName = Literal["local", "ray"]
Address = Annotated[
    str | None,
    typer.Option(
        help="Ray cluster: auto, HOST:PORT or ray://HOST:10001; or its job API, "
        "http://HEAD:8265, to run as a Ray job from a machine off the cluster (Ctrl-C stops it)."
    ),
]
WorkingDir = Annotated[Path, typer.Option(help="Uploaded as the Ray job's working directory.")]
Requirements = Annotated[
    Path | None, typer.Option(help="A pip requirements file installed for the Ray job.")
]
Timeout = Annotated[
    str | None,
    typer.Option(
        help="Start no trial after this long: seconds, 30m, 2h, 1h30m (every number with its "
        "unit: 2h30 is refused); none: no limit, not even the space's budget.timeout."
    ),
]


@study_app.command("create")
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


Jobs = Annotated[
    int | None,
    typer.Option(
        "--jobs",
        "-j",
        help="Trials at once, 1 to 1024. local: default 1. ray: default as many as the trials "
        "left; those the cluster has no room for wait, asking its autoscaler for nodes.",
        show_default=False,
    ),
]


@study_app.command("run")
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
    _stop_on_sigterm()
    if backends.is_job_address(address):
        _check_job_backend(backend)
        job = backends.submit_study(
            name, address=address, storage=storage, n_trials=n_trials, timeout=timeout
        )
        _follow(job, foreground=True)
        return
    from tuner.face.progress import ProgressBar

    with ProgressBar() as bar:
        try:
            progress = run_study(
                name,
                storage=storage,
                n_trials=n_trials,
                timeout=seconds,
                jobs=jobs,
                backend=backend,
                address=address,
                on_progress=bar.update,
            )
        except KeyboardInterrupt:
            bar.close()
            again = _command("tuner", "study", "run", name)
            typer.echo(f"interrupted; run `{again}` again to continue", err=True)
            raise typer.Exit(130) from None
    try:
        report = best_report(name, storage)
    except TunerError:
        report = None  # no completed trial yet: no best line
    failure = _run_failure(progress)
    if as_json:
        typer.echo(json.dumps(_run_summary(name, progress, report, failure)))
    else:
        others = progress.others_finished
        typer.echo(
            f"{_plural(progress.finished, 'trial')} finished: {progress.complete} complete, "
            f"{progress.pruned} pruned, {progress.failed} failed"
            + (f"; other runs of the study finished {others} meanwhile" if others else "")
        )
        if report is not None:
            typer.echo(_best_line(report))
        if failure is None and report is not None:
            # Quoted for the shell, the password masked: they are made to be pasted.
            flag = ["--storage", _masked(storage)] if storage else []
            typer.echo(f"details: {_command('tuner', 'study', 'show', name, *flag)}")
            typer.echo(f"watch:   {_command('tuner', 'dashboard', *flag)}")
            export = _command("tuner", "study", "export", name, *flag, "--out", f"{name}-best")
            typer.echo(f"export:  {export}")
    if failure is not None:
        typer.echo(f"error: {failure}", err=True)
        raise typer.Exit(1)


def _run_failure(progress: Any) -> str | None:
    """Why the run failed, if it did: stopped because its trials kept failing the same way, or
    every trial it finished failed (a run that reports success must have a result). A pruned
    trial is a result: the pruner stopped it on purpose, and its curve informs the search."""
    stop_reason = getattr(progress, "stop_reason", None)
    if stop_reason:
        return stop_reason
    if progress.finished and progress.failed == progress.finished:
        return (
            f"this run finished {_plural(progress.finished, 'trial')} and every one failed "
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


@study_app.command("submit")
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
    _stop_on_sigterm()
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
        _follow(job, foreground=False)
        return
    typer.echo(_job_hints(job), err=True)


@study_app.command("list")
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
    table = _table("study", "direction", "trials", "best", "started")
    for row in rows:
        counts = ", ".join(f"{n} {state}" for state, n in row.counts.items()) or "none"
        table.add_row(row.name, row.direction, counts, _num(row.best_value), row.started or "")
    _print(table)


@study_app.command("show")
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
    table = _table(*TrialRow.columns(facts=facts))
    for row in rows:
        table.add_row(*row.cells(facts=facts))
    _print(table)


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


@study_app.command("best")
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


@study_app.command("export")
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


@study_app.command("report")
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
    typer.echo(f"report: {report.path} ({_plural(report.plots, 'plot')})")
    for title, why in report.skipped.items():
        typer.echo(f"  not drawn: {title}: {why}", err=True)


@study_app.command("delete")
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


@sweep_app.command("run")
def sweep_run(
    space: Annotated[Path, typer.Option("--space", help="The search space YAML file.")],
    name: Annotated[
        str | None,
        typer.Option(
            "--name",
            help="The series: studies are NAME-YYYY-MM-DD (default: the space's name); letters, "
            "digits, '_', '.' and '-', at most 189.",
        ),
    ] = None,
    storage: Storage = None,
    backend: Annotated[
        BackendName, typer.Option(help="local: worker processes here; ray: a Ray cluster.")
    ] = "local",
    address: Address = None,
    jobs: Jobs = None,
    date: Annotated[
        str | None,
        typer.Option(help="The sweep's date, YYYY-MM-DD (default: today), for backfills."),
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="If another sweep of the series runs, wait for it.")
    ] = False,
    out: Annotated[
        str | None,
        typer.Option(
            help="Summaries and exported champions (default: sweeps/NAME); "
            "with an http:// --address, a folder on the cluster."
        ),
    ] = None,
    working_dir: WorkingDir = Path("."),
    requirements: Requirements = None,
) -> None:
    """One sweep of a series: create or resume today's study, run it to the budget, promote."""
    import datetime as dt

    from tuner import backends
    from tuner.core.sweep import ExportFailed, run_sweep, submit_sweep
    from tuner.store import Busy

    try:
        day = dt.date.fromisoformat(date) if date is not None else None
    except ValueError:
        raise TunerError(f"--date must be YYYY-MM-DD (got {date!r})") from None
    _stop_on_sigterm()
    if backends.is_job_address(address):
        # The whole sweep is the job: its lock, promotion and summary run on the cluster.
        _check_job_backend(backend)
        job = submit_sweep(
            space,
            address=address,
            prefix=name,
            storage=storage,
            date=day,
            wait=wait,
            out=out,
            working_dir=working_dir,
            requirements=requirements,
        )
        _follow(job, foreground=True)
        return
    from tuner.face.progress import ProgressBar

    with ProgressBar() as bar:
        try:
            summary = run_sweep(
                space,
                prefix=name,
                storage=storage,
                backend=backend,
                address=address,
                jobs=jobs,
                date=day,
                wait=wait,
                out=out,
                on_progress=bar.update,
            )
        except Busy as e:
            bar.close()
            # Not a failure: the sweep that holds the lock is doing the work (cron retries).
            typer.echo(f"skipped: {e}", err=True)
            return
        except ExportFailed as e:
            bar.close()
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(3) from None  # its own status, for monitoring
    from tuner.core.sweep import summary_markdown

    typer.echo(summary_markdown(summary))


@sweep_app.command("list")
def sweep_list(
    name: Annotated[str | None, typer.Option("--name", help="One series (default: all).")] = None,
    storage: Storage = None,
    as_json: AsJson = False,
) -> None:
    """The series' sweeps, oldest first, with the champion marked."""
    from tuner.core.sweep import list_sweeps
    from tuner.store import NoStore

    try:
        rows = list_sweeps(name, storage)
    except NoStore as e:
        typer.echo("[]" if as_json else f"no sweeps: {e}")
        return
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("no sweeps")
        return
    table = _table("", "sweep", "trials", "best", "change", "promoted")
    for row in rows:
        counts = ", ".join(f"{n} {state}" for state, n in row["trials"].items()) or "none"
        change = "" if row["change"] is None else f"{row['change']:+.4g}"
        table.add_row(
            "champion" if row["champion"] else ("" if row["finished"] else "unfinished"),
            row["study"],
            counts,
            _num(row["best"]),
            change,
            "yes" if row["promoted"] else "",
        )
    _print(table)


@app.command("dashboard")
def dashboard(
    storage: Storage = None,
    host: Annotated[
        str,
        typer.Option(help="Address to bind; anything but loopback needs --read-only or --token."),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free one).")] = 8080,
    read_only: Annotated[
        bool, typer.Option("--read-only", help="Refuse every write (tell, delete, notes).")
    ] = False,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="TUNER_DASHBOARD_TOKEN",
            help="Every request must carry it (open the page once with ?token=...). "
            "Prefer $TUNER_DASHBOARD_TOKEN: a flag shows in the process list.",
            show_default=False,
        ),
    ] = None,
    allow_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-host",
            metavar="NAME",
            help="Also answer to this host name (a proxy's, a service's); repeatable. "
            "Requests naming any other Host are refused (DNS rebinding).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """optuna-dashboard over the study store, with trial artifacts; live while trials run."""
    from tuner.face.dashboard import Access, serve
    from tuner.store import resolve_url

    def ready(url: str) -> None:
        hint = " (open it once with ?token=...)" if token else ""
        mode = " read-only" if read_only else ""
        store = _masked(resolve_url(storage))
        typer.echo(f"dashboard{mode}: {url}{hint} over {store}; Ctrl-C stops it", err=True)

    _stop_on_sigterm()
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a dashboard is stopped
        serve(
            storage,
            host=host,
            port=port,
            access=Access(read_only=read_only, token=token),
            allow_hosts=allow_host or (),
            on_ready=ready,
        )


@app.command("spaces")
def spaces(
    fields: Annotated[
        bool,
        typer.Option(
            "--fields", help="Print every key a space file can hold instead (Markdown reference)."
        ),
    ] = False,
) -> None:
    """The search spaces that ship with tuner (usable by name with --space)."""
    if fields:
        from tuner.space.reference import reference_markdown

        typer.echo(reference_markdown(), nl=False)
        return
    from tuner.space import packaged_spaces, read_yaml

    for name, path in packaged_spaces().items():
        data = read_yaml(path, display=name) or {}
        description = str(data.get("description", "")).strip().splitlines()
        typer.echo(f"{name:<20} {description[0] if description else ''}")


@demo_app.command("prepare")
def demo_prepare(
    root: Annotated[Path, typer.Option("--dir", help="Where to write the demo.")] = Path("demo"),
    force: Annotated[bool, typer.Option(help="Rebuild even if already there.")] = False,
    pretrain_steps: Annotated[
        int, typer.Option(min=1, help="Pre-training steps of the base (fewer: faster, weaker).")
    ] = 400,
) -> None:
    """Build the demo model, tokenizer and data (offline; about 90 s on 2 cores)."""
    from tuner.core.demo import prepare_demo

    paths = prepare_demo(root, force=force, pretrain_steps=pretrain_steps)
    typer.echo(f"demo model: {paths.model}\ndemo data:  {paths.data}")


# ----------------------------------------------------------------------------- formatting


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


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _masked(url: str | None) -> str:
    from tuner.store import mask_url

    return mask_url(url or "")


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


def _check_job_backend(backend: str | None) -> None:
    if backend not in (None, "ray"):
        raise TunerError(
            f"--address http(s)://... is a Ray cluster's job API: it needs --backend ray "
            f"(got --backend {backend})"
        )


def _job_hints(job: Any) -> str:
    where = f"{job.job_id} --address {job.address}"
    return f"follow it: ray job logs --follow {where}\nstop it:   ray job stop {where}"


def _follow(job: Any, *, foreground: bool) -> None:
    """Show a Ray job's log as it runs and exit with its status. Ctrl-C stops a foreground
    run's job (`study run`/`sweep run` with an http:// address), as it would stop a local run;
    a submitted job (`study submit --follow`) keeps running."""
    from tuner.backends import follow_job

    def show(chunk: str) -> None:
        sys.stdout.write(chunk)
        sys.stdout.flush()

    typer.echo(f"Ray job {job.job_id} at {job.address}:", err=True)
    try:
        outcome = follow_job(job, on_log=show, stop_on_interrupt=foreground)
    except KeyboardInterrupt:
        if foreground:
            typer.echo(
                f"interrupted: stopped Ray job {job.job_id}; the same command continues the run",
                err=True,
            )
        else:
            typer.echo(f"Ray job {job.job_id} keeps running\n{_job_hints(job)}", err=True)
        raise typer.Exit(130) from None
    if outcome.exit_code:
        said = f": {outcome.message}" if outcome.message else ""
        typer.echo(
            f"Ray job {job.job_id} {outcome.status.lower()} (exit {outcome.exit_code}){said}",
            err=True,
        )
        raise typer.Exit(outcome.exit_code)
    typer.echo(f"Ray job {job.job_id} succeeded", err=True)


def _stop_on_sigterm() -> None:
    """`kill`, systemd and job schedulers stop with SIGTERM: clean up as for Ctrl-C."""
    import signal

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def _table(*columns: str) -> Any:
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def _print(renderable: Any) -> None:
    from rich.console import Console

    Console(width=None if sys.stdout.isatty() else 200).print(renderable)


def main() -> None:
    # Timestamps: runs are often unattended (cron, a Ray job), their logs read afterwards.
    # The levels follow -v/-q (_setup).
    logging.basicConfig(
        level=logging.INFO, format=LOG_FORMAT, datefmt=LOG_DATEFMT, stream=sys.stderr
    )
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        # prog_name: `python -m tuner` (a Ray job's entrypoint) names itself `tuner` too, in
        # usage lines and in the shell completion's variable (_TUNER_COMPLETE).
        code = app(standalone_mode=False, prog_name="tuner")
    except TunerError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(getattr(e, "exit_code", 2))
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    except typer.TyperException as e:
        # A usage error: a mistyped command or option, a missing or bad argument. typer 0.29
        # carries its own copy of click, whose exceptions all derive from TyperException (not
        # from click's: the `click` package need not even be installed). One line, as for every
        # other bad input; usage errors exit 2.
        message = e.format_message().strip()
        if message:  # empty for a bare group (`tuner study`): its help was just printed
            ctx = getattr(e, "ctx", None)
            where = ctx.command_path if ctx is not None else "tuner"
            typer.echo(f"error: {message} (see `{where} --help`)", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
