"""The study store, and the one way into it (as Optuna has `storages/`).

Studies live in Optuna's own RDB storage: an embedded SQLite file by default, PostgreSQL for
teams and clusters. Everything in tuner that reads or writes a study comes through here:

- `studies`: `open_study`, the study with its stored space, sampler and pruner;
- `attrs`: the names of what tuner keeps on studies and trials;
- `urls`, `rdb`, `reconnect`: store URLs (passwords masked), opening the store, riding out a
  database that restarts;
- `recovery`: trials whose worker is gone (dead processes, stale heartbeats) failed and retried;
- `deletion`: deleting a study that may be running (refused, or its trials stopped first),
  verified gone before anything says so;
- `artifacts`, `retention`: the study's artifact location (a folder or s3://BUCKET/PREFIX) and
  its Optuna artifact store (`open_artifacts`): adapters, checkpoints, reports, tokenised data;
  the best k adapters kept; `folders`: a folder as one object there (the data cache's entries,
  checkpoints); `checkpoints`: a trial's checkpoints, and which one a retry resumes;
- `ranking`: which value is better in a study's direction, the best trial;
- `budget`: what a study has spent; `locks`: one driver per sweep series; `runs`: runs of one
  study at once, each with its id (on its trials) and its seeds apart;
- `optuna_private`: the private members of Optuna tuner relies on, checked by a test.
"""

from tuner.store.rdb import NoStore, open_storage
from tuner.store.studies import OpenStudy, open_study
from tuner.store.urls import default_artifact_dir, mask_text, mask_url, resolve_url, strip_password

__all__ = [
    "NoStore",
    "OpenStudy",
    "default_artifact_dir",
    "mask_text",
    "mask_url",
    "open_storage",
    "open_study",
    "resolve_url",
    "strip_password",
]
