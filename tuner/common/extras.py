"""The optional parts of tuner: extras of the `lora-tuner` distribution (pyproject.toml).

The core runs the SQLite quickstart on one machine. Ray, DeepSpeed, PostgreSQL and the
dashboard are extras, imported only where they are used; a command that needs one that is
missing says which, and how to install it, in one line.
"""

from __future__ import annotations

import importlib.util

from tuner.common.errors import TunerError

DISTRIBUTION = "lora-tuner"  # the name on PyPI; `tuner` and `trials` are other projects'
# The module each extra brings (the one whose absence means the extra is missing).
MODULES = {
    "ray": "ray",
    "deepspeed": "deepspeed",
    "postgres": "psycopg2",
    "dashboard": "optuna_dashboard",
}


class ExtraMissing(TunerError):
    """A command needs an extra that is not installed here."""


def install_hint(extra: str) -> str:
    return f"pip install '{DISTRIBUTION}[{extra}]'"


def is_installed(extra: str) -> bool:
    return importlib.util.find_spec(MODULES[extra]) is not None


def require(extra: str, *, what: str) -> None:
    """Raise ExtraMissing, saying that `what` needs it, unless `extra` is installed."""
    if not is_installed(extra):
        raise _missing(extra, what)


def missing_extra(error: BaseException | None, *, what: str) -> ExtraMissing | None:
    """The ExtraMissing behind an import that failed inside a library (SQLAlchemy loading
    psycopg2 for a postgresql:// URL, which Optuna re-raises as its own ImportError), if the
    missing module is an extra's; None otherwise."""
    while error is not None:
        if isinstance(error, ModuleNotFoundError) and error.name:
            top = error.name.split(".")[0]
            for extra, module in MODULES.items():
                if module == top:
                    return _missing(extra, what)
        error = error.__cause__ or error.__context__
    return None


def _missing(extra: str, what: str) -> ExtraMissing:
    return ExtraMissing(f"{what} needs the {extra!r} extra: {install_hint(extra)}")
