"""The options several commands take, typed once so that their flags and help read the same
everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

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
