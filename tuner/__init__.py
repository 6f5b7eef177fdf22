"""tuner: hyperparameter search for LoRA fine-tuning, on Optuna.

The public API; heavy libraries (optuna, torch) load on first use, so `tuner --help` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = [
    "BackendError",
    "RunFailed",
    "SpaceError",
    "StorageError",
    "TunerError",
    "best_report",
    "create_study",
    "export_trial",
    "load_space",
    "run_study",
    "write_report",
]

from tuner.errors import BackendError, RunFailed, SpaceError, StorageError, TunerError

if TYPE_CHECKING:
    from tuner.export import export_trial
    from tuner.report import write_report
    from tuner.space import load_space
    from tuner.study import best_report, create_study, run_study

_LAZY = {
    "load_space": "tuner.space",
    "create_study": "tuner.study",
    "run_study": "tuner.study",
    "best_report": "tuner.study",
    "export_trial": "tuner.export",
    "write_report": "tuner.report",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tuner' has no attribute {name!r}")
