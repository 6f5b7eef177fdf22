"""Search-space files: what is accepted, what is refused, and what a refusal says."""

from __future__ import annotations

import re
from pathlib import Path

import optuna
import pytest
from conftest import run_cli, small_space, write_space

from trials.config import SEARCHABLE, SIMULATED_FIELDS
from tuner.common.errors import SpaceError
from tuner.space import load_space, packaged_spaces

GOOD = """\
name: ok
params:
  learning_rate: {type: float, low: 1e-5, high: 1e-2, log: true}
  lora_rank: {type: categorical, choices: [4, 8]}
  lora_alpha: {type: multiple, of: lora_rank, factors: [1, 2, 4]}
fixed:
  model_name_or_path: ./model
  dataset: {path: ./data.jsonl, format: alpaca}
"""


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory with a model folder and an alpaca file, as the spaces below refer to."""
    (tmp_path / "model").mkdir()
    (tmp_path / "data.jsonl").write_text('{"instruction": "hi", "output": "hello"}\n')
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_scientific_notation_is_a_number_and_paths_become_absolute(workdir: Path) -> None:
    space = load_space(write_space(workdir / "s.yaml", GOOD))
    assert space.params["learning_rate"].low == 1e-5
    assert space.fixed["model_name_or_path"] == str(workdir / "model")
    assert space.fixed["dataset"]["path"] == str(workdir / "data.jsonl")
    assert space.sampler["name"] == "tpe" and space.pruner["name"] == "reported_median"


def test_alpha_is_suggested_as_a_multiple_of_rank_and_recorded_resolved(workdir: Path) -> None:
    space = load_space(write_space(workdir / "s.yaml", GOOD))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(12):
        trial = study.ask()
        values = space.suggest(trial)
        factor = trial.params["lora_alpha/lora_rank"]
        assert values["lora_alpha"] == values["lora_rank"] * factor
        assert isinstance(values["lora_alpha"], int)
        assert space.trial_config(values).lora_alpha == values["lora_alpha"]
        study.tell(trial, 1.0)


def test_baseline_defaults_fill_what_it_leaves_out(workdir: Path) -> None:
    text = (
        GOOD.replace("choices: [4, 8]", "choices: [4, 8, 16]") + "baseline: {learning_rate: 5e-5}\n"
    )
    space = load_space(write_space(workdir / "s.yaml", text))
    assert space.baseline_values() == {"learning_rate": 5e-5, "lora_rank": 16, "lora_alpha": 32}
    assert space.optuna_params(space.baseline_values()) == {
        "learning_rate": 5e-5,
        "lora_rank": 16,
        "lora_alpha/lora_rank": 2,
    }


def test_timeout_reads_durations(workdir: Path) -> None:
    space = load_space(write_space(workdir / "s.yaml", GOOD + "budget: {timeout: 1h30m}\n"))
    assert space.budget.timeout == 5400


def test_packaged_spaces_validate(workdir: Path) -> None:
    """The shipped spaces validate: quickstart against demo-shaped files, lora_sft against a
    local data file (its model is a hub id, which is not fetched at validation)."""
    assert {"quickstart.yaml", "lora_sft.yaml", "lora_sft_small.yaml"} <= set(packaged_spaces())
    (workdir / "demo" / "model").mkdir(parents=True)
    (workdir / "demo" / "data.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    (workdir / "data").mkdir()
    (workdir / "data" / "train.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    quick = load_space("quickstart.yaml")
    real = load_space("lora_sft")
    assert quick.budget.n_trials and quick.baseline is not None
    assert real.fixed["model_name_or_path"] == "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"
    assert real.params["lora_alpha"].of == "lora_rank"
    assert real.fixed["bf16"] is True
    # 8 GPUs per trial with ZeRO-3; temperature searched, so the objective scores answers.
    assert real.resources.gpus_per_trial == 8 and real.fixed["deepspeed"] == "zero3"
    assert "temperature" in real.params and real.objective.samples
    assert real.objective.direction == "maximize"
    small = load_space("lora_sft_small.yaml")
    assert small.resources.gpus_per_trial == 1 and small.objective.metric == "eval_loss"


# Each bad file, and the words its one-line error must contain.
BAD = [
    ("", "is empty"),
    (
        GOOD + "  report_to: neptune\n",
        "fixed.report_to must be tensorboard, mlflow, wandb or none, or a list of them "
        "(got 'neptune')",
    ),
    (GOOD + "  report_to: [mlflow, tensorbord]\n", "fixed.report_to must be tensorboard, mlflow"),
    ("- a\n- b\n", "must be a mapping of sections"),
    ("params: [\n", "invalid YAML"),
    ("!!python/object/apply:os.system ['echo hi']\n", "YAML tag"),
    (GOOD + "fixed: {}\n", "key 'fixed' appears twice"),
    (GOOD + "samplr: tpe\n", "samplr is not a known section; did you mean 'sampler'?"),
    (
        GOOD.replace("log: true", "log: true, lowx: 1"),
        "params.learning_rate.lowx is not a known key",
    ),
    (
        GOOD.replace("low: 1e-5, high: 1e-2", "low: 1e-2, high: 1e-5"),
        "params.learning_rate.low must be <= high (got low=0.01, high=1e-05)",
    ),
    (
        GOOD.replace("low: 1e-5", "low: 0"),
        "params.learning_rate.low must be > 0 on a log scale (got 0)",
    ),
    (
        GOOD.replace("low: 1e-5", "low: abc"),
        "params.learning_rate.low must be a number (got 'abc')",
    ),
    (GOOD.replace("choices: [4, 8]", "choices: []"), "params.lora_rank.choices must not be empty"),
    (
        GOOD.replace("choices: [4, 8]", "choices: [4, 4]"),
        "params.lora_rank.choices must not repeat a value (got 4 twice)",
    ),
    (GOOD.replace("{type: float,", "{type: floot,"), "unknown type 'floot'; did you mean 'float'?"),
    (GOOD.replace("{type: float, ", "{"), "params.learning_rate.type is required"),
    (GOOD.replace("learning_rate:", "learning_rat:"), "did you mean 'learning_rate'?"),
    (
        GOOD.replace("learning_rate:", "lr:"),
        "params.lr is not a searchable option; did you mean 'learning_rate'?",
    ),
    (
        GOOD + "  max_seq_length: 512\n",
        "fixed.max_seq_length is not a known option; did you mean 'cutoff_len'?",
    ),
    (
        GOOD.replace(
            "lora_rank: {type: categorical, choices: [4, 8]}",
            "lora_rank: {type: float, low: 4, high: 8}",
        ),
        "takes whole numbers; use type: int",
    ),
    (
        GOOD.replace("of: lora_rank", "of: lora_rnk"),
        "params.lora_alpha.of must name another option",
    ),
    (
        GOOD.replace("factors: [1, 2, 4]", "factors: [0, 2]"),
        "params.lora_alpha.factors must all be > 0 (got 0)",
    ),
    (GOOD + "  cutoff_len: -5\n", "fixed.cutoff_len must be > 0 (got -5)"),
    (
        GOOD + "  cutof_len: 512\n",
        "fixed.cutof_len is not a known option; did you mean 'cutoff_len'?",
    ),
    (GOOD + "  learning_rate: 1e-4\n", "fixed.learning_rate is also searched"),
    (
        GOOD.replace("format: alpaca", "format: alpacca"),
        "fixed.dataset.format must be 'alpaca', 'sharegpt' or 'messages' (got 'alpacca')",
    ),
    (GOOD.replace("./data.jsonl", "./missing.jsonl"), "fixed.dataset.path: no such file"),
    (GOOD.replace("./model", "./no-model"), "fixed.model_name_or_path: no such model directory"),
    (GOOD.replace("  model_name_or_path: ./model\n", ""), "fixed.model_name_or_path is required"),
    (GOOD + "  lora_dropout: 1.5\n", "fixed.lora_dropout must be < 1 (got 1.5)"),
    (GOOD + "sampler: {name: tpee}\n", "unknown sampler 'tpee'; did you mean 'tpe'?"),
    (
        GOOD + "sampler: {name: tpe, n_startup: 3}\n",
        "sampler.n_startup is not an option of the tpe",
    ),
    (GOOD + "pruner: medain\n", "unknown pruner 'medain'; did you mean 'median'?"),
    (GOOD + "pruner: {name: median, warmup: 3}\n", "pruner.warmup is not an option of the median"),
    (GOOD + "objective: {metric: accuracy}\n", "objective.metric: unknown metric 'accuracy'"),
    (GOOD + "objective: {direction: down}\n", "objective.direction must be 'minimize' or"),
    (GOOD + "budget: {n_trials: 0}\n", "budget.n_trials must be > 0"),
    (GOOD + "budget: {timeout: soon}\n", "budget.timeout must be seconds or a duration"),
    (
        GOOD + "baseline: {learning_rate: 1.0}\n",
        "baseline.learning_rate must be in [1e-05, 0.01] (log scale) (got 1.0)",
    ),
    (
        GOOD + "baseline: {lora_rank: 4, lora_alpha: 3}\n",
        "baseline.lora_alpha must be lora_rank (4) × one of [1, 2, 4] (got 3)",
    ),
    (GOOD + "baseline: {lora_rank: 16}\n", "baseline.lora_rank must be one of [4, 8] (got 16)"),
    (GOOD + "baseline: {warmup_ratio: 0.1}\n", "baseline.warmup_ratio is not a searched param"),
    (
        GOOD + "  deepspeed: zero4\n",
        "fixed.deepspeed: 'zero4' is not a preset or a file (allowed: zero2, zero3, "
        "zero3_offload, or a path to a DeepSpeed JSON)",
    ),
    (
        GOOD + "resources: {gpus_per_trial: 1.5}\n",
        "gpus_per_trial above 1 must be a whole number of GPUs (got 1.5)",
    ),
]


# The simulated workload's settings are not a LoRA trial's (issue 21).
BAD += [
    (GOOD + "  steps: 4\n", "fixed.steps is not a known option (a setting of workload: simulated)"),
    (
        GOOD + "  simulated: {steps: 4}\n",
        "fixed.simulated is not a known option (a setting of workload: simulated)",
    ),
]


@pytest.mark.parametrize(("text", "expected"), BAD, ids=[e for _, e in BAD])
def test_bad_space_is_one_clear_line(workdir: Path, text: str, expected: str) -> None:
    path = write_space(workdir / "bad.yaml", text)
    with pytest.raises(SpaceError) as error:
        load_space(path)
    message = str(error.value)
    assert message.startswith(f"{path}:")
    assert expected in message
    assert "\n" not in message


SIMULATED = """
params:
  learning_rate: {type: float, low: 1e-4, high: 1e-2, log: true}
fixed:
  workload: simulated
"""


def test_the_simulated_settings_are_a_group_and_the_flat_spelling_still_reads(
    workdir: Path,
) -> None:
    """`fixed.simulated: {steps: 4}`, and `fixed.steps: 4` as spaces (and stored studies)
    wrote it before the group: the same trial. Both at once is refused."""
    grouped = load_space(write_space(workdir / "g.yaml", SIMULATED + "  simulated: {steps: 4}\n"))
    flat = load_space(write_space(workdir / "f.yaml", SIMULATED + "  steps: 4\n"))
    for space in (grouped, flat):
        config = space.trial_config({"learning_rate": 1e-3})
        assert config.simulated.steps == 4 and config.simulated.step_seconds == 0.3
    assert "steps" not in space.params and "simulated" not in SEARCHABLE
    both = write_space(workdir / "b.yaml", SIMULATED + "  steps: 4\n  simulated: {steps: 5}\n")
    with pytest.raises(SpaceError, match="give steps or simulated.steps, not both"):
        load_space(both)
    bad = write_space(workdir / "x.yaml", SIMULATED + "  simulated: {steps: 0}\n")
    with pytest.raises(SpaceError, match=r"fixed.simulated.steps must be > 0 \(got 0\)"):
        load_space(bad)


def test_unknown_options_offer_only_what_the_workload_reads(workdir: Path) -> None:
    """A LoRA space's errors never list or suggest the simulated workload's knobs (they once
    listed diverge_above_lr, hang_above_lr, step_seconds and steps as searchable); a simulated
    space's do."""
    knobs = re.compile(rf"\b({'|'.join(SIMULATED_FIELDS)}|simulated)\b")
    for i, text in enumerate(
        [
            GOOD.replace("learning_rate:", "diverge_above:"),
            GOOD + "  step_second: 1\n",
            GOOD + "  hang_above: 1\n",
            GOOD + "  step: 4\n",
        ]
    ):
        with pytest.raises(SpaceError) as error:
            load_space(write_space(workdir / f"lora{i}.yaml", text))
        assert "not a" in str(error.value) and not knobs.search(str(error.value)), error.value
    with pytest.raises(SpaceError, match="fixed.step_second is .*did you mean 'step_seconds'"):
        load_space(write_space(workdir / "sim.yaml", SIMULATED + "  step_second: 1\n"))


def test_baseline_default_outside_the_range_says_so(workdir: Path) -> None:
    text = GOOD.replace("low: 1e-5, high: 1e-2", "low: 1e-3, high: 1e-2") + "baseline: {}\n"
    with pytest.raises(SpaceError, match=r"not given; the default is 5e-05"):
        load_space(write_space(workdir / "s.yaml", text))


def test_not_utf8(workdir: Path) -> None:
    (workdir / "latin.yaml").write_bytes(GOOD.encode() + "# caf\xe9\n".encode("latin-1"))
    with pytest.raises(SpaceError, match="is not UTF-8 text"):
        load_space(workdir / "latin.yaml")


def test_cli_refuses_a_bad_space_with_status_2_and_writes_nothing(workdir: Path) -> None:
    write_space(workdir / "bad.yaml", GOOD.replace("low: 1e-5", "low: -1"))
    result = run_cli("study", "create", "--space", "bad.yaml", cwd=workdir)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: bad.yaml: params.learning_rate.low must be > 0 on a log scale (got -1)"
    ]
    assert "Traceback" not in result.stderr
    assert (
        not (workdir / "tuner.db").exists()
        or optuna.get_all_study_names(f"sqlite:///{workdir / 'tuner.db'}") == []
    )


def test_cli_refuses_a_bad_data_file_before_creating_the_study(
    workdir: Path, demo_files: Path
) -> None:
    (workdir / "chat.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    space = small_space(demo_files)
    space["fixed"]["dataset"] = {"path": "chat.jsonl", "format": "alpaca"}
    write_space(workdir / "s.yaml", space)
    result = run_cli("study", "create", "--space", "s.yaml", cwd=workdir)
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert "s.yaml: fixed.dataset: chat.jsonl: line 1: has no 'instruction' field" in line
    assert "fixed.dataset.columns.instruction" in line
    assert optuna.get_all_study_names(f"sqlite:///{workdir / 'tuner.db'}") == []


def test_deepspeed_presets_stay_names_and_own_configs_become_absolute(workdir: Path) -> None:
    assert (
        load_space(write_space(workdir / "a.yaml", GOOD + "  deepspeed: zero3\n")).fixed[
            "deepspeed"
        ]
        == "zero3"
    )
    (workdir / "ds.json").write_text('{"zero_optimization": {"stage": 2}}')
    space = load_space(write_space(workdir / "b.yaml", GOOD + "  deepspeed: ds.json\n"))
    assert space.fixed["deepspeed"] == str(workdir / "ds.json")
    (workdir / "list.json").write_text("[2]")
    with pytest.raises(SpaceError, match="fixed.deepspeed: list.json is not a DeepSpeed JSON"):
        load_space(write_space(workdir / "c.yaml", GOOD + "  deepspeed: list.json\n"))
