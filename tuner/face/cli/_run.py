"""The one way `study run` and `sweep run` run: here (worker processes on this machine, or a
Ray cluster joined as a driver) under a progress bar, or, for an http(s):// --address, as a Ray
job followed from here. Ctrl-C (and SIGTERM, turned into one) stops either cleanly; a failure
the command expects is one line on stderr with its own exit status."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NoReturn, TypeVar

import typer

from tuner.common.errors import TunerError

T = TypeVar("T")


@dataclass(frozen=True)
class Where:
    """Where a run goes: the command's --storage, --backend, --address and --jobs."""

    storage: str | None
    backend: str | None
    address: str | None
    jobs: int | None


@dataclass(frozen=True)
class Ending:
    """How a run that raised an expected error ends: `word: error` on stderr, then exit status
    `exit_code` (0: not a failure, the command just has nothing more to say)."""

    word: str
    exit_code: int


def run_here_or_as_job(
    where: Where,
    *,
    here: Callable[..., T],
    job: Callable[..., Any],
    again: str | None = None,
    endings: Mapping[type[Exception], Ending] = MappingProxyType({}),
) -> T | None:
    """Run `here(storage=, backend=, address=, jobs=, on_progress=)` under a progress bar and
    return what it returns; or, for an http(s):// address, submit `job(address=, storage=)` as
    a Ray job and follow its log to its end. None: it ran as a job, or ended by `endings`.

    On Ctrl-C, `again` is the command that continues the run, for the line that says so;
    without it, `main` says "interrupted"."""
    from tuner import backends

    stop_on_sigterm()
    if backends.is_job_address(where.address):
        check_job_backend(where.backend)
        watch_job(job(address=where.address, storage=where.storage), foreground=True)
        return None
    from tuner.face.progress import ProgressBar

    with ProgressBar() as bar:
        try:
            return here(
                storage=where.storage,
                backend=where.backend,
                address=where.address,
                jobs=where.jobs,
                on_progress=bar.update,
            )
        except KeyboardInterrupt:
            if again is None:
                raise
            bar.close()  # the bar's last state first, then the line below it
            typer.echo(f"interrupted; run `{again}` again to continue", err=True)
            raise typer.Exit(130) from None
        except tuple(endings) as e:
            bar.close()
            ending = next(end for kind, end in endings.items() if isinstance(e, kind))
            typer.echo(f"{ending.word}: {e}", err=True)
            if ending.exit_code:
                raise typer.Exit(ending.exit_code) from None
            return None


def fail(message: str, *, exit_code: int) -> NoReturn:
    """The run's failure as one line on stderr, and its exit status."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(exit_code)


def check_job_backend(backend: str | None) -> None:
    if backend not in (None, "ray"):
        raise TunerError(
            f"--address http(s)://... is a Ray cluster's job API: it needs --backend ray "
            f"(got --backend {backend})"
        )


def job_hints(job: Any) -> str:
    where = f"{job.job_id} --address {job.address}"
    return f"follow it: ray job logs --follow {where}\nstop it:   ray job stop {where}"


def watch_job(job: Any, *, foreground: bool) -> None:
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
            typer.echo(f"Ray job {job.job_id} keeps running\n{job_hints(job)}", err=True)
        raise typer.Exit(130) from None
    if outcome.exit_code:
        said = f": {outcome.message}" if outcome.message else ""
        typer.echo(
            f"Ray job {job.job_id} {outcome.status.lower()} (exit {outcome.exit_code}){said}",
            err=True,
        )
        raise typer.Exit(outcome.exit_code)
    typer.echo(f"Ray job {job.job_id} succeeded", err=True)


def stop_on_sigterm() -> None:
    """`kill`, systemd and job schedulers stop with SIGTERM: clean up as for Ctrl-C."""
    import signal

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
