"""`tuner demo`: the offline demo's model and data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="The offline demo: a tiny local model and data.", no_args_is_help=True)


@app.command("prepare")
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
