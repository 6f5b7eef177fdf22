"""The study store, and the one way into it (as Optuna has `storages/`): every module outside
this package imports from `tuner.store`, never from its private submodules.

Studies live in Optuna's own RDB storage: an embedded SQLite file by default, PostgreSQL for
teams and clusters. Everything in tuner that reads or writes a study comes through here:

- `_studies`: `open_study`, the study with its stored space, sampler and pruner;
- `attrs`: the names of what tuner keeps on studies and trials;
- `_urls`, `_rdb`, `_reconnect`: store URLs (passwords masked), opening the store, riding out a
  database that restarts;
- `recovery`: trials whose worker is gone (dead processes, stale heartbeats) failed and retried;
- `deletion`: deleting a study that may be running (refused, or its trials stopped first),
  verified gone before anything says so;
- `_artifacts`, `retention`: the study's artifact location (a folder or s3://BUCKET/PREFIX) and
  its Optuna artifact store (`open_artifacts`): adapters, checkpoints, reports, tokenised data;
  the best k adapters kept; `_folders`: a folder as one object there (the data cache's entries,
  checkpoints); `checkpoints`: a trial's checkpoints, and which one a retry resumes;
- `_ranking`: which value is better in a study's direction, the best trial;
- `_budget`: what a study has spent; `_locks`: one driver per sweep series; `_runs`: runs of one
  study at once, each with its id (on its trials) and its seeds apart;
- `optuna_private`: the private members of Optuna tuner relies on, checked by a test.

The modules named without an underscore (`attrs`, `recovery`, `deletion`, `retention`,
`checkpoints`, `optuna_private`) are handed out whole: their names read best qualified
(`recovery.fail_stale`, `attrs.SPACE`). Every name is imported on first use (PEP 562), so that
reading a study never loads what writing artifacts needs (optuna.artifacts, boto3).
"""

from __future__ import annotations

import importlib
from typing import Any

# What the face hands out, and the private module it comes from.
_NAMES = {
    "open_study": "_studies",
    "OpenStudy": "_studies",
    "wait_for_space": "_studies",
    "NoStore": "_rdb",
    "StoreFile": "_rdb",
    "open_storage": "_rdb",
    "default_artifact_dir": "_urls",
    "mask_text": "_urls",
    "mask_url": "_urls",
    "resolve_url": "_urls",
    "sqlite_path": "_urls",
    "strip_password": "_urls",
    "study_location": "_urls",
    "choose_location": "_artifacts",
    "local_cache_dir": "_artifacts",
    "open_artifacts": "_artifacts",
    "PrefixedBoto3Store": "_artifacts",
    "shared_data_cache": "_artifacts",
    "store_errors": "_artifacts",
    "Saved": "_checkpoints",
    "StoredCheckpoints": "_checkpoints",
    "resumable": "_checkpoints",
    "best_trial": "_ranking",
    "better": "_ranking",
    "counts_as_best": "_ranking",
    "gain": "_ranking",
    "rank_key": "_ranking",
    "state_counts": "_ranking",
    "gpu_hours_held": "_budget",
    "spent": "_budget",
    "Busy": "_locks",
    "series_lock": "_locks",
    "start_run": "_runs",
}
_MODULES = {
    "attrs": "_attrs",
    "checkpoints": "_checkpoints",
    "deletion": "_deletion",
    "optuna_private": "_optuna_private",
    "recovery": "_recovery",
    "retention": "_retention",
}

__all__ = sorted([*_NAMES, *_MODULES])


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return importlib.import_module(f"{__name__}.{_MODULES[name]}")
    if name in _NAMES:
        return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
