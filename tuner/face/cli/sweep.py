"""`tuner sweep`: one sweep of a recurring series, and the series' history."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Annotated

import typer

from tuner.common.errors import TunerError
from tuner.common.text import number as _num
from tuner.face.cli._format import new_table, print_table
from tuner.face.cli._options import (
    Address,
    AsJson,
    BackendName,
    Jobs,
    Requirements,
    Storage,
    WorkingDir,
)
from tuner.face.cli._run import Ending, Where, run_here_or_as_job

app = typer.Typer(
    help="Recurring sweeps (nightly from cron): warm-started, budgeted, promoting a champion.",
    no_args_is_help=True,
)


@app.command("run")
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

    from tuner.core.sweep import ExportFailed, run_sweep, submit_sweep, summary_markdown
    from tuner.store import Busy

    try:
        day = dt.date.fromisoformat(date) if date is not None else None
    except ValueError:
        raise TunerError(f"--date must be YYYY-MM-DD (got {date!r})") from None
    series = {"prefix": name, "date": day, "wait": wait, "out": out}
    summary = run_here_or_as_job(
        Where(storage=storage, backend=backend, address=address, jobs=jobs),
        here=partial(run_sweep, space, **series),
        # With an http:// address the whole sweep is the job: its lock, promotion and summary
        # run on the cluster.
        job=partial(
            submit_sweep, space, **series, working_dir=working_dir, requirements=requirements
        ),
        endings={
            # Not a failure: the sweep that holds the lock is doing the work (cron retries).
            Busy: Ending("skipped", exit_code=0),
            ExportFailed: Ending("error", exit_code=3),  # its own status, for monitoring
        },
    )
    if summary is not None:
        typer.echo(summary_markdown(summary))


@app.command("list")
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
    table = new_table("", "sweep", "trials", "best", "change", "promoted")
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
    print_table(table)
