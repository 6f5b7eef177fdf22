"""`tuner`: a thin command line over the library (tuner.core.study, tuner.space, tuner.core.demo).

Each command calls one library function and formats its result; only this package writes to
stdout. A `TunerError` becomes one line on stderr and its exit status (2: bad input); so does
a usage error (unknown command, missing or bad argument).

One module per command group (study, sweep, demo; dashboard and spaces are single commands);
`_run` is the one way `study run` and `sweep run` run (here, on Ray, or as a Ray job).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated

import typer

from tuner.common.errors import TunerError
from tuner.face.cli import dashboard, demo, spaces, study, sweep
from tuner.face.cli._options import BackendName
from tuner.face.cli.study import _run_failure

# `main` is the console script (pyproject.toml); the others are imported from here by tests.
__all__ = ["BackendName", "_run_failure", "app", "main"]

app = typer.Typer(
    help="Hyperparameter search for LoRA fine-tuning, on Optuna.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
# --help lists the single commands, then the groups, each in the order registered here.
app.command("dashboard")(dashboard.dashboard)
app.command("spaces")(spaces.spaces)
app.add_typer(study.app, name="study")
app.add_typer(sweep.app, name="sweep")
app.add_typer(demo.app, name="demo")

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
