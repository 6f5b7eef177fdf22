"""What a user may give as a count or a name, each rule once: the CLI's flags, the space's keys
and the library's arguments all check here.

Counts are Python ints, which never wrap; the limits keep them to what a run can do at all, so
that a slip (`--n-trials 4294967296`, `--jobs 1e12` worth of worker processes) is refused in one
line rather than taken literally.

Names become more than rows: a study's name is printed in command hints, names TensorBoard's
folder of its trials and a sweep's exported champion (`NAME-YYYY-MM-DD`, its summary
`NAME-YYYY-MM-DD.json.tmp`), and is the key a second machine types. So it is printable, one
line, no path, and short enough to be a file name with a suffix.
"""

from __future__ import annotations

import re

from tuner.common.errors import TunerError
from tuner.common.text import shown

# A million trials is far beyond a sweep of real trainings (and beyond what Optuna's samplers
# read in reasonable time: every worker reads the whole study); the store numbers trials in a
# 32-bit INTEGER column on PostgreSQL (2,147,483,647), well above it.
MAX_TRIALS = 1_000_000
# Trial slots at once: each is a worker process (local) or a Ray actor that the driver polls
# every second; more would only queue. Also the most suggestions sampled ahead (lookahead).
MAX_JOBS = 1024
# Optuna's study_name column holds 512 characters, a file system's names 255 bytes; 200 bytes
# leaves room for a sweep's `-YYYY-MM-DD` and `.json.tmp`, and for `--out NAME-best`.
MAX_NAME_BYTES = 200
_DATE_SUFFIX = len("-YYYY-MM-DD")
# A series prefix is also the name of its folder of exports and of its lock.
_SERIES = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class BadName(TunerError):
    """A study or series name that cannot be stored, printed or used as a folder name."""


def check_count(value: int, *, key: str, most: int = MAX_TRIALS) -> int:
    """`value` if it is a whole number in [1, most]; else TunerError naming `key`."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise TunerError(f"{key} must be a whole number from 1 to {most:,} (got {shown(value)})")
    return value


def check_name(name: str, *, key: str, most: int = MAX_NAME_BYTES) -> str:
    """`name` if it may name a study; else BadName saying why, naming `key` (the flag, or the
    space file's `name`)."""
    if not isinstance(name, str) or not name.strip():
        raise BadName(f"{key} must not be empty (got {shown(name)})")
    why = None
    if not name.isprintable():
        why = "must be printable: no newlines, tabs or other control characters"
    elif name != name.strip():
        why = "must not start or end with a space"
    elif "/" in name or "\\" in name or ".." in name:
        why = "must not hold '/', '\\' or '..' (it names folders)"
    elif len(name.encode()) > most:
        why = f"must be at most {most} bytes long, not {len(name.encode())}"
    if why is not None:
        raise BadName(f"{key} {why} (got {shown(name)})")
    return name


def check_series(prefix: str, *, key: str) -> str:
    """A sweep series' name: a study name once `-YYYY-MM-DD` is added, and plain characters
    only (it names the folder of the series' exports)."""
    if isinstance(prefix, str) and prefix and not _SERIES.fullmatch(prefix):
        raise BadName(
            f"{key} {shown(prefix)}: a series name is letters, digits, '_', '.' and '-', "
            "starting with a letter or digit"
        )
    return check_name(prefix, key=key, most=MAX_NAME_BYTES - _DATE_SUFFIX)
