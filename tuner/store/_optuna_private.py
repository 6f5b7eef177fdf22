"""Every private member of Optuna that tuner relies on, in one place, each with why.

Optuna keeps these out of its public API and may change them in any release. Code elsewhere
reaches the instance attributes through the accessors below, and names the overridden methods
in `OVERRIDDEN`; `tests/test_optuna_private.py` checks each one against the installed Optuna, so
an upgrade that removes or renames one fails there, naming it, instead of somewhere in a sweep.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial


def storage(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The study's storage. Needed to write a system attr on a trial from a sampler hook (which
    gets a FrozenTrial, not a Trial), and to fail a trial with its reason first."""
    return study._storage


def study_id(study: optuna.Study) -> int:
    """The study's id in its storage, for the storage calls that take one."""
    return study._study_id


def trial_id(trial: FrozenTrial | optuna.Trial) -> int:
    """A trial's id in its storage (Optuna exposes only its number)."""
    return trial._trial_id


def stale_trial_ids(storage: Any, study_id: int) -> set[int]:
    """Ids of the study's RUNNING trials whose heartbeat is older than the store's grace period:
    the one query that reads heartbeats (`fail_stale_trials` fails them too, which a delete that
    only asks whether trials are alive must not). The store must have heartbeats on."""
    return set(storage._get_stale_trial_ids(study_id))


# (module, class, member, why). Methods tuner overrides or wraps, and attributes it reads.
OVERRIDDEN: tuple[tuple[str, str, str, str], ...] = (
    (
        "optuna.samplers",
        "TPESampler",
        "_sample",
        "tuner.search.algorithms.TPESampler builds TPE's model with the FAIL trials that "
        "violated a "
        "constraint (out of memory, NaN), which TPE alone never reads",
    ),
    (
        "optuna.study",
        "Study",
        "_get_trials",
        "what TPE's `_sample` reads trials through; tuner.search.algorithms wraps it",
    ),
    (
        "optuna.artifacts",
        "FileSystemArtifactStore",
        "_get_filepath",
        "where an artifact's file lives, so tuner.store._artifacts can write it atomically",
    ),
    # tuner.store._reconnect retries the calls that Optuna's cache layer (`_CachedStorage`, which
    # every Study wraps around an RDBStorage) makes on its RDB storage, private ones included.
    ("optuna.storages", "RDBStorage", "_create_new_trial", "retried on a lost connection"),
    ("optuna.storages", "RDBStorage", "_set_trial_param", "retried on a lost connection"),
    ("optuna.storages", "RDBStorage", "_get_best_trial_id", "retried on a lost connection"),
    ("optuna.storages", "RDBStorage", "_get_trials", "retried on a lost connection"),
    (
        "optuna.storages",
        "RDBStorage",
        "_get_stale_trial_ids",
        "retried on a lost connection; read by `stale_trial_ids` above",
    ),
)

# Instance attributes: checked on real objects by the test.
INSTANCE_ATTRIBUTES: tuple[tuple[str, str, str], ...] = (
    ("Study", "_storage", "see `storage` above"),
    ("Study", "_study_id", "see `study_id` above"),
    ("FrozenTrial", "_trial_id", "see `trial_id` above"),
    ("Trial", "_trial_id", "see `trial_id` above"),
    (
        "PartialFixedSampler",
        "_fixed_params",
        "tuner.backends.feed.FedSampler changes the fixed params from trial to trial",
    ),
)


def missing() -> list[str]:
    """The members of `OVERRIDDEN` the installed Optuna lacks, as `module.Class.member`."""
    import importlib

    gone = []
    for module, cls, member, _ in OVERRIDDEN:
        owner: Any = getattr(importlib.import_module(module), cls, None)
        if owner is None or not hasattr(owner, member):
            gone.append(f"{module}.{cls}.{member}")
    return gone
