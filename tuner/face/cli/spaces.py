"""`tuner spaces`: the packaged search spaces, and the reference of a space file's keys."""

from __future__ import annotations

from typing import Annotated

import typer


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
