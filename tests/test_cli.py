"""The quickstart, as a newcomer types it: demo, packaged space by bare name, run, best, show."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import QUICKSTART_ENV, Quickstart, run_cli


@pytest.mark.slow
def test_quickstart_path(quickstart: Quickstart, tmp_path: Path) -> None:
    """The commands as a newcomer types them (tests/conftest.py `QUICKSTART`, run once per test
    run), then what they look at next, in the quickstart's folder."""
    folder, printed, env = quickstart.folder, quickstart.printed, QUICKSTART_ENV

    assert (folder / "demo" / "model" / "model.safetensors").exists()
    again = run_cli("demo", "prepare", cwd=folder, env=env)
    assert again.returncode == 0 and "already prepared" in again.stderr

    spaces = run_cli("spaces", cwd=tmp_path, env=env)
    assert "quickstart.yaml" in spaces.stdout and "lora_sft.yaml" in spaces.stdout

    # A bare name found the packaged space from the folder; its paths resolved there.
    assert printed["create"]["stdout"].strip() == "quickstart"
    assert (folder / "tuner.db").exists()

    ran = printed["run"]
    assert "3 trials finished" in ran["stdout"]
    assert "best eval_loss" in ran["stdout"]
    assert "watch:   tuner dashboard" in ran["stdout"]  # where to look next
    assert "export:  tuner study export quickstart" in ran["stdout"]
    assert "trial 0 complete" in ran["stderr"]  # one line per finished trial in the log

    best = run_cli("study", "best", "quickstart", "--json", cwd=folder, env=env)
    report = json.loads(best.stdout)
    assert report["study"] == "quickstart" and report["direction"] == "minimize"
    assert set(report["params"]) == {
        "learning_rate",
        "lora_rank",
        "lora_alpha",
        "lora_dropout",
        "weight_decay",
        "warmup_ratio",
    }
    assert report["params"]["lora_alpha"] % report["params"]["lora_rank"] == 0
    assert report["baseline"]["trial"] == 0

    shown = run_cli("study", "show", "quickstart", cwd=folder, env=env)
    assert shown.returncode == 0 and "baseline" in shown.stdout and "lora_alpha=32" in shown.stdout
    with_facts = run_cli("study", "show", "quickstart", "--facts", cwd=folder, env=env)
    assert with_facts.returncode == 0 and "tokens_per_s" in with_facts.stdout
    listed = run_cli("study", "list", cwd=folder, env=env)
    assert "quickstart" in listed.stdout
    assert any((folder / "tuner_artifacts").iterdir())  # the adapters, beside the store
    # `study delete` (what it removes, artifacts included): tests/test_faults.py.


def test_help_and_unknown_study(tmp_path: Path) -> None:
    assert run_cli("--help").returncode == 0
    missing = run_cli("study", "show", "nope", cwd=tmp_path, env={"TUNER_STORAGE": ""})
    assert missing.returncode == 2
    assert missing.stderr.strip().startswith(
        "error: no study 'nope': there is no study store at sqlite:///"
    )
    assert not (tmp_path / "tuner.db").exists()  # a read makes no store
    bad_flag = run_cli("study", "run", "x", "--timeout", "soon", cwd=tmp_path)
    assert bad_flag.returncode == 2 and "--timeout must be seconds" in bad_flag.stderr


def test_a_mistyped_command_or_option_is_one_line_and_exit_2(tmp_path: Path) -> None:
    for args, said in [
        (("stduy", "list"), "No such command 'stduy'. Did you mean 'study'?"),
        (("study", "list", "--bogus"), "No such option: --bogus"),
        (("study", "show"), "Missing argument"),
    ]:
        result = run_cli(*args, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and said in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_run_refuses_a_study_whose_data_is_gone(tmp_path: Path, demo_files: Path) -> None:
    shutil.copytree(demo_files / "model", tmp_path / "model")
    data = tmp_path / "data.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    (tmp_path / "s.yaml").write_text(
        "params: {learning_rate: {type: float, low: 1e-5, high: 1e-3}}\n"
        "fixed: {model_name_or_path: ./model, dataset: data.jsonl}\n"
    )
    env = {"TUNER_STORAGE": ""}
    assert run_cli("study", "create", "--space", "s.yaml", cwd=tmp_path, env=env).returncode == 0
    data.unlink()
    result = run_cli("study", "run", "s", "--n-trials", "1", cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert f"fixed.dataset.path '{data}' does not exist on this machine" in result.stderr
