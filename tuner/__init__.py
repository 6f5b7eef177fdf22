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

from tuner.common.errors import BackendError, RunFailed, SpaceError, StorageError, TunerError

if TYPE_CHECKING:
    from tuner.core.export import export_trial
    from tuner.core.study import best_report, create_study, run_study
    from tuner.face.report import write_report
    from tuner.space import load_space

_LAZY = {
    "load_space": "tuner.space",
    "create_study": "tuner.core.study",
    "run_study": "tuner.core.study",
    "best_report": "tuner.core.study",
    "export_trial": "tuner.core.export",
    "write_report": "tuner.face.report",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tuner' has no attribute {name!r}")
