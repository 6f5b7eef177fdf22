"""Opening a tuner study: the store, the study's stored space, and the sampler and pruner built
from it. Every process that touches a study (CLI, driver, worker, dashboard) opens it here.

A study holds its own space (user attr `space`), so any machine with the storage URL can run more
of its trials with no YAML file at hand, and `optuna.load_study` opens it like any other.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

import optuna

from tuner.common.errors import StorageError, StudyDeleted, did_you_mean
from tuner.space import Space, from_stored
from tuner.store import attrs
from tuner.store._rdb import NoStore, open_storage
from tuner.store._urls import mask_url, resolve_url, study_location


@dataclass
class OpenStudy:
    study: optuna.Study
    space: Space
    artifacts: str  # the study's artifact location: a local path or s3://BUCKET/PREFIX
    url: str
    store: optuna.storages.RDBStorage  # the study's store without Optuna's per-study cache

    def artifact_store(self) -> Any:
        """The study's Optuna artifact store (tuner.store._artifacts.open_artifacts)."""
        from tuner.store._artifacts import open_artifacts

        return open_artifacts(self.artifacts)


def open_study(
    name: str,
    storage: str | None = None,
    *,
    heartbeat: bool = False,
    seed_offset: int = 0,
    in_run: bool = False,
) -> OpenStudy:
    """Load a tuner study with its sampler and pruner built from the stored space.

    `heartbeat`: this process runs trials (or fails stale ones): they beat, and a trial whose
    heartbeat went stale is failed and retried up to the space's `resources.max_retries`.
    `seed_offset` moves the sampler's seed, so that processes sampling apart draw apart.
    `in_run`: a worker or the driver of a run, whose study `run_study` has opened already: the
    tables exist, and are not inspected again.
    """
    from tuner.search import algorithms
    from tuner.store._recovery import RetryStale

    url = resolve_url(storage)
    try:
        # Opening a study never makes a store: a mistyped --storage leaves nothing behind.
        store = open_storage(url, heartbeat=heartbeat, tables=False, must_exist=not in_run)
    except NoStore as e:
        raise StorageError(f"no study {name!r}: {e}") from None
    try:
        stored = store.get_study_user_attrs(store.get_study_id_from_name(name))
        if attrs.SPACE not in stored:
            stored = {**stored, attrs.SPACE: wait_for_space(store, name)}
        space = from_stored(stored[attrs.SPACE])
        if heartbeat:
            with warnings.catch_warnings():  # Optuna marks its retry callback experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                retry = RetryStale(max_retry=space.resources.max_retries)
            store.heartbeat_stale_trial_callback = retry
        study = optuna.load_study(
            study_name=name,
            storage=store,
            sampler=algorithms.build_sampler(space.sampler, seed_offset=seed_offset),
            pruner=algorithms.build_pruner(space.pruner),
        )
    except KeyError:  # not there, or deleted while it was being opened
        raise _missing(name, url, store, in_run=in_run) from None
    return OpenStudy(study, space, study_location(stored, url), url, store)


def _missing(name: str, url: str, store: Any, *, in_run: bool) -> StorageError:
    if in_run:  # the run found it a moment ago: it was deleted since (tuner.store._deletion)
        return StudyDeleted(f"study {name!r} was deleted while this run ran")
    names = [s.study_name for s in store.get_all_studies()]
    return StorageError(
        f"no study {name!r} in {mask_url(url)}{did_you_mean(name, names)} (see `tuner study list`)"
    )


def wait_for_space(store: Any, name: str, wait_s: float = 10) -> dict:
    """The space stored in study `name`. A study created a moment ago by another process may
    not have it yet: it is written last."""
    deadline = time.monotonic() + wait_s
    while True:
        stored = store.get_study_user_attrs(store.get_study_id_from_name(name))
        if attrs.SPACE in stored or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if attrs.SPACE not in stored:
        raise StorageError(
            f"study {name!r} was not made by `tuner study create` (it has no stored space)"
        )
    return stored[attrs.SPACE]
