"""`tuner dashboard`: optuna-dashboard over the study store."""

from __future__ import annotations

import contextlib
from typing import Annotated

import typer

from tuner.face.cli._format import masked
from tuner.face.cli._options import Storage
from tuner.face.cli._run import stop_on_sigterm


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
        store = masked(resolve_url(storage))
        typer.echo(f"dashboard{mode}: {url}{hint} over {store}; Ctrl-C stops it", err=True)

    stop_on_sigterm()
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a dashboard is stopped
        serve(
            storage,
            host=host,
            port=port,
            access=Access(read_only=read_only, token=token),
            allow_hosts=allow_host or (),
            on_ready=ready,
        )
