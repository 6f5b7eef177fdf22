"""One root exception; the CLI turns any of these into a one-line message and its exit status
(`exit_code`: 2 for input the user can fix, 1 for a run that ran and failed)."""

from typing import TypeVar

E = TypeVar("E", bound=BaseException)


class TunerError(Exception):
    """A problem the user can fix: the message says what was wrong and what is allowed."""

    exit_code = 2


class SpaceError(TunerError):
    """A search-space file (or a space stored in a study) is invalid."""


class StorageError(TunerError):
    """The study store cannot be reached, or a study in it is missing or conflicting."""


class BackendError(TunerError):
    """Trials could not be started or kept running where they were asked to run."""


class ExportError(TunerError):
    """An export cannot be made where asked, or failed its verification; nothing was written."""


class StoreFull(StorageError):
    """The study store's disk is full (SQLite's file system, or the PostgreSQL server's): no
    write goes through until space is freed. Exit status 2 where nothing ran (creating a
    study); a run that meets it sets 1."""


class StudyDeleted(StorageError):
    """The study of a run was deleted under it (`tuner study delete`): the run stops, exit
    status 1."""

    exit_code = 1


class RunFailed(TunerError):
    """A run started and its trials failed: not the input's fault as far as tuner could tell
    beforehand, so exit status 1, as for any command that ran and failed."""

    exit_code = 1


def caused_by(error: BaseException, kind: type[E]) -> E | None:
    """The first `kind` among `error` and the exceptions it was raised from or while handling."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def did_you_mean(word: object, candidates: object, aliases: dict[str, str] | None = None) -> str:
    """`; did you mean 'x'?` for a known alias or the nearest candidate; nothing if none is near."""
    import difflib

    names = [str(c) for c in candidates]  # type: ignore[attr-defined]
    alias = (aliases or {}).get(str(word).lower())
    if alias in names:
        return f"; did you mean {alias!r}?"
    close = difflib.get_close_matches(str(word), names, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""
