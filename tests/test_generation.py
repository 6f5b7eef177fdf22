"""The generation objective: sampled answers scored after training, temperature searched."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
from conftest import run_cli, small_space, write_space
from optuna.trial import TrialState

from trials.generate import contains, exact_match
from tuner.core.study import create_study, run_study

SCORER = '''
def overlap(prediction, reference):
    """Share of the reference's characters the answer has: a score that moves with the model."""
    return len(set(prediction) & set(reference)) / max(1, len(set(reference)))
'''


def _generation_space(demo_dir: Path, scorers: Path) -> dict:
    space = small_space(demo_dir, name="gen", pruner="none", budget={"n_trials": 2})
    space["params"] = {
        "learning_rate": {"type": "float", "low": 3e-3, "high": 3e-2, "log": True},
        "temperature": {"type": "float", "low": 0.3, "high": 1.2},
    }
    space["objective"] = {
        "metric": f"{scorers / 'overlap.py'}:overlap",
        "direction": "maximize",
        "generation": {
            "max_new_tokens": 16,
            "max_samples": 8,
            "batch_size": 8,
            "temperature_grid": [0.5, 1.0],
        },
    }
    return space


def test_builtin_scorers_compare_text_as_people_read_it() -> None:
    assert exact_match("  42\n", "42") == 1.0 and exact_match("42.", "42") == 0.0
    assert exact_match("a  b", "a b") == 1.0
    assert contains("so the answer is 42", "42") == 1.0 and contains("41", "42") == 0.0


def test_a_searched_temperature_is_scored_on_sampled_answers(
    sqlite_url: str, demo_dir: Path, tmp_path: Path
) -> None:
    (tmp_path / "overlap.py").write_text(SCORER)
    path = write_space(tmp_path / "gen.yaml", _generation_space(demo_dir, tmp_path))
    name = create_study(path, storage=sqlite_url)
    assert run_study(name, storage=sqlite_url).complete == 2

    study = optuna.load_study(study_name=name, storage=sqlite_url)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    for trial in study.get_trials():
        facts = trial.user_attrs
        assert trial.state == TrialState.COMPLETE and 0 < trial.value <= 1
        assert facts["score"] == trial.value
        assert set(facts["temperature_scores"]) == {"0.5", "1"}
        assert all(0 <= v <= 1 for v in facts["temperature_scores"].values())
        candidates = {
            **facts["temperature_scores"],
            f"{trial.params['temperature']:g}": trial.value,
        }
        assert facts["best_temperature"] == float(max(candidates, key=candidates.__getitem__))
        assert facts["timings"]["generate_s"] > 0
        # The loss still drives pruning, negated so that higher is better, as the study wants.
        assert all(v < 0 for v in trial.intermediate_values.values())
        assert -trial.intermediate_values[30] == pytest.approx(facts["eval_loss"])


def test_in_a_maximised_study_the_pruner_stops_the_worst_trial(
    sqlite_url: str, demo_dir: Path, tmp_path: Path
) -> None:
    """Two good learning rates, then a hopeless one: with the loss negated, the median pruner
    stops the hopeless trial, never the good ones."""
    space = small_space(demo_dir, name="maxprune")
    space["objective"] = {
        "metric": "contains",
        "generation": {"max_new_tokens": 4, "max_samples": 4, "temperature_grid": []},
    }
    space["pruner"] = {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 0}
    name = create_study(write_space(tmp_path / "m.yaml", space), storage=sqlite_url)
    study = optuna.load_study(study_name=name, storage=sqlite_url)
    for lr in (1e-2, 1e-2, 1e-5):
        study.enqueue_trial({"learning_rate": lr, "lora_rank": 4, "lora_alpha/lora_rank": 2})
    run_study(name, storage=sqlite_url, n_trials=3)
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED]
    assert math.isfinite(study.get_trials()[0].value)


def test_a_searched_temperature_needs_a_generation_objective(
    sqlite_url: str, demo_files: Path, tmp_path: Path
) -> None:
    space = _generation_space(demo_files, tmp_path)
    del space["objective"]
    path = write_space(tmp_path / "bad.yaml", space)
    result = run_cli("study", "create", "--space", str(path), "--storage", sqlite_url)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "bad.yaml" in line and "params.temperature" in line and "exact_match" in line
    assert "Traceback" not in result.stderr
    assert optuna.get_all_study_names(sqlite_url) == []


@pytest.mark.parametrize(
    ("objective", "expected"),
    [
        ({"metric": "exact_macth"}, "did you mean"),
        ({"metric": "scorers/none.py:f"}, "does not exist"),
        ({"metric": "trials.generate:no_such"}, "has no function 'no_such'"),
        ({"metric": "eval_loss", "direction": "maximize"}, "eval_loss is minimized"),
    ],
)
def test_a_bad_objective_is_named_at_create(
    objective: dict, expected: str, sqlite_url: str, demo_files: Path, tmp_path: Path
) -> None:
    space = _generation_space(demo_files, tmp_path)
    space["objective"] = objective
    if objective["metric"] == "eval_loss":
        del space["params"]["temperature"]
    path = write_space(tmp_path / "bad.yaml", space)
    result = run_cli("study", "create", "--space", str(path), "--storage", sqlite_url)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "objective" in line and expected in line, line
