"""Every private member of Optuna that tuner relies on (tuner/store/_optuna_private.py) exists in
the installed Optuna: an upgrade that removes or renames one fails here, naming it."""

from __future__ import annotations

import optuna
import pytest

from tuner.store import optuna_private


def test_every_overridden_member_exists() -> None:
    assert optuna_private.missing() == [], (
        "Optuna no longer has these; see tuner/store/_optuna_private.py for what each served"
    )


def test_a_member_that_is_gone_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    gone = ("optuna.samplers", "TPESampler", "_sample_gone", "for the test")
    monkeypatch.setattr(optuna_private, "OVERRIDDEN", (*optuna_private.OVERRIDDEN, gone))
    assert optuna_private.missing() == ["optuna.samplers.TPESampler._sample_gone"]


def test_every_instance_attribute_exists_on_real_objects() -> None:
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage())
    trial = study.ask()
    study.tell(trial, 1.0)
    objects = {
        "Study": study,
        "Trial": trial,
        "FrozenTrial": study.trials[0],
        "PartialFixedSampler": optuna.samplers.PartialFixedSampler({}, study.sampler),
    }
    missing = [
        f"{owner}.{attribute}"
        for owner, attribute, _ in optuna_private.INSTANCE_ATTRIBUTES
        if not hasattr(objects[owner], attribute)
    ]
    assert missing == []
    assert optuna_private.trial_id(study.trials[0]) == optuna_private.trial_id(trial)
    assert optuna_private.storage(study).get_trial(optuna_private.trial_id(trial)).value == 1.0
    storage = optuna_private.storage(study)
    assert storage.get_study_name_from_id(optuna_private.study_id(study)) == study.study_name
