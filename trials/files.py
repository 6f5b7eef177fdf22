"""What a path is, asked of the file system without opening it.

Opening a FIFO blocks until a writer comes, and reading /dev/zero never ends: a path a user names
(a space file, a data file) is looked at with `os.stat` first, and only a regular file (or a
folder, where one is allowed) is opened.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

_SPECIAL = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def kind(path: str | Path) -> str | None:
    """`file`, `folder`, or what else the path is (`a FIFO (named pipe)`, ...); None when
    nothing is there. Symbolic links are followed: what counts is what would be read."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "folder"
    for test, name in _SPECIAL:
        if test(mode):
            return name
    return "not a regular file"


def read_at_most(path: str | Path, limit: int) -> bytes:
    """Up to `limit` + 1 bytes of a regular file: one more than allowed says it is too long
    (a file under /proc reports size 0 and may still hold more)."""
    with open(path, "rb") as f:
        return f.read(limit + 1)
