"""One root exception; the CLI turns any of these into a one-line message and exit status 2."""


class TunerError(Exception):
    """A problem the user can fix: the message says what was wrong and what is allowed."""


class SpaceError(TunerError):
    """A search-space file (or a space stored in a study) is invalid."""


class StorageError(TunerError):
    """The study store cannot be reached, or a study in it is missing or conflicting."""


class BackendError(TunerError):
    """Trials could not be started or kept running where they were asked to run."""


def did_you_mean(word: str, candidates: object) -> str:
    """`; did you mean 'x'?` for the nearest candidate, or nothing when none is near."""
    import difflib

    close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""
