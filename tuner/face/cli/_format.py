"""Small pieces of output that several commands print the same way."""

from __future__ import annotations

import sys
from typing import Any


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def masked(url: str | None) -> str:
    from tuner.store import mask_url

    return mask_url(url or "")


def new_table(*columns: str) -> Any:
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def print_table(renderable: Any) -> None:
    """Print a table; piped, 200 columns wide so that a script's lines are not folded at 80."""
    from rich.console import Console

    Console(width=None if sys.stdout.isatty() else 200).print(renderable)
