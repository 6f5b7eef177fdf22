"""QLoRA (`quantization_bit`): bitsandbytes' CPU backend trains LoRA on a 4- and 8-bit demo base
here for real, and the export merges the adapter into the unquantised base."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import optuna
import pytest
import torch
from conftest import run_cli, small_space, write_space
from optuna.trial import TrialState
from safetensors.torch import load_file

from trials import sft
from trials.config import TrialConfig
from tuner.common.errors import SpaceError
from tuner.core import export as export_mod
from tuner.core.study import create_study
from tuner.store import attrs
from tuner.store._artifacts import open_artifacts

SHORT = {"max_steps": 4, "eval_steps": 4, "logging_steps": 4, "val_size": 16}


def _qlora_space(demo: Path, name: str, **fixed: object) -> dict:
    space = small_space(demo, name=name, pruner="none", budget={"n_trials": 1})
    space["params"] = {"learning_rate": {"type": "categorical", "choices": [3e-3]}}
    space["fixed"] = {
        **space["fixed"],
        **SHORT,
        "per_device_eval_batch_size": 16,
        "lora_rank": 4,
        "lora_alpha": 8,
        **fixed,
    }
    return space


def test_a_4bit_trial_runs_and_exports_merged_into_the_unquantised_base(
    demo_dir: Path, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    fixed = {"quantization_bit": 4, "per_device_train_batch_size": 4}
    space = write_space(tmp_path / "q4.yaml", _qlora_space(demo_dir, "q4", **fixed))
    created = run_cli("study", "create", "--space", str(space), "--storage", url)
    assert created.returncode == 0, created.stderr
    ran = run_cli("study", "run", "q4", "--storage", url, "--jobs", "1")
    assert ran.returncode == 0, ran.stderr

    (trial,) = optuna.load_study(study_name="q4", storage=url).get_trials()
    assert trial.state == TrialState.COMPLETE, trial.user_attrs.get("fail_reason")
    assert trial.user_attrs["quantization_bit"] == 4 and math.isfinite(trial.value)
    # peft's count: 4-bit weights stored two to a byte still count as parameters of the model.
    base = load_file(demo_dir / "model" / "model.safetensors")
    frozen = sum(t.numel() for k, t in base.items() if k != "lm_head.weight")
    assert trial.user_attrs["total_params"] == frozen + trial.user_attrs["trainable_params"]

    out = tmp_path / "merged"
    exported = run_cli("study", "export", "q4", "--out", str(out), "--storage", url)
    assert exported.returncode == 0, exported.stderr

    # Merged = the unquantised base + the adapter's delta B·A·alpha/r, weight by weight.
    adapter = _adapter(trial, url, tmp_path / "adapter")
    merged = load_file(out / "model.safetensors")
    changed = 0
    for key, weight in base.items():
        if key not in merged:
            assert key == "lm_head.weight"  # tied to the embeddings
            continue
        a_key = "base_model.model." + key.replace(".weight", ".lora_A.weight")
        expected = weight
        if a_key in adapter:
            delta = adapter[a_key.replace("lora_A", "lora_B")].float() @ adapter[a_key].float()
            expected = weight + delta * (8 / 4)
            changed += 1
        assert merged[key].dtype == torch.float32
        torch.testing.assert_close(merged[key], expected, rtol=0, atol=1e-6, msg=key)
    assert changed == 4 * 7  # every linear layer of the 4 blocks: q k v o gate up down

    provenance = json.loads((out / export_mod.PROVENANCE).read_text())
    assert provenance["trained_on_quantized_base"]["bits"] == 4
    assert provenance["trained_on_quantized_base"]["type"] == "nf4"
    check = provenance["verification"]
    assert check["passed"] and check["quantization_bit"] == 4
    # The adapter replayed on the 4-bit base gives the trial's own loss; merged into the
    # unquantised base, a loss of its own (the quantisation's error), recorded beside it.
    assert abs(check["kbit_val_loss"] - trial.user_attrs["eval_loss"]) < 1e-3
    assert check["val_loss"] != check["kbit_val_loss"]
    card = (out / "README.md").read_text()
    assert "trained on its 4-bit form (NF4 with double quantization, QLoRA)" in card
    assert "merged into the unquantised base, saved in float32" in card


def test_an_8bit_trial_retries_out_of_memory_on_the_kept_base(
    demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LLM.int8 trains, with gradient checkpointing, and evaluates; the real
    torch.cuda.OutOfMemoryError raised from the training step above a batch of 4 (there is no
    GPU here to fill) retries at batch 4 on the same quantised base, which the trial then leaves
    clean for the next one."""
    from bitsandbytes.nn import Linear8bitLt

    fixed = {"quantization_bit": 8, "gradient_checkpointing": True, "learning_rate": 3e-3}
    config = TrialConfig.model_validate({**_qlora_space(demo_dir, "q8")["fixed"], **fixed})
    base = sft._setup_model(config)
    assert isinstance(base.model.layers[0].mlp.up_proj, Linear8bitLt)
    full = config.model_copy(update={"quantization_bit": None})

    trainer_class = sft._trainer_class()
    train_step = trainer_class.training_step

    def short_of_memory(trainer: object, *args: object, **kwargs: object) -> object:
        if trainer.args.per_device_train_batch_size > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return train_step(trainer, *args, **kwargs)

    monkeypatch.setattr(trainer_class, "training_step", short_of_memory)
    result = sft.run(config, output_dir=tmp_path / "q8")
    assert result.quantization_bit == 8 and result.oom_retries == 1
    assert (result.per_device_train_batch_size, result.steps) == (4, 4)
    assert math.isfinite(result.eval_loss)
    adapter = load_file(Path(result.adapter_dir) / "adapter_model.safetensors")
    trained = [bool(w.abs().sum() > 0) for k, w in adapter.items() if "lora_B" in k]
    assert len(trained) == 28 and all(trained)  # B starts at zero: every layer got gradients
    assert list(sft._BASES.values()) == [base]  # kept through the retry and after it
    assert not [n for n, _ in base.named_modules() if "lora" in n]
    assert sft._setup_model(full) is not base  # the key holds the quantisation


def test_create_refuses_what_cannot_train(demo_files: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'studies.db'}"

    def refused(name: str, **fixed: object) -> str:
        path = write_space(tmp_path / f"{name}.yaml", _qlora_space(demo_files, name, **fixed))
        with pytest.raises(SpaceError) as caught:
            create_study(path, storage=url)
        return str(caught.value)

    assert refused("bits", quantization_bit=3).endswith(
        "bits.yaml: fixed.quantization_bit must be 4 or 8 (got 3)"
    )
    space = _qlora_space(demo_files, "searched")
    space["params"]["quantization_bit"] = {"type": "categorical", "choices": [4, 8]}
    cli = run_cli(
        "study", "create", "--space", str(write_space(tmp_path / "s.yaml", space)), "--storage", url
    )
    assert cli.returncode == 2 and "params.quantization_bit is not a searchable" in cli.stderr
    assert len(cli.stderr.strip().splitlines()) == 1

    zero3 = refused("z3", quantization_bit=4, deepspeed="zero3")
    assert "fixed.quantization_bit cannot be used with ZeRO-3 (deepspeed: zero3)" in zero3
    assert "zero2" in zero3

    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "bitsandbytes", None)  # as when it is not installed
        missing = refused("nobnb", quantization_bit=8)
    assert missing.endswith(
        "nobnb.yaml: fixed.quantization_bit: 8 needs bitsandbytes, which is not installed here; "
        "pip install 'lora-tuner[qlora]' (on the workers too)"
    )
    assert optuna.get_all_study_names(url) == []  # nothing was created


def _adapter(trial: optuna.trial.FrozenTrial, url: str, dest: Path) -> dict[str, torch.Tensor]:
    study = optuna.load_study(study_name="q4", storage=url)
    store = open_artifacts(study.user_attrs[attrs.ARTIFACTS])
    dest.mkdir()
    path = dest / "adapter_model.safetensors"
    optuna.artifacts.download_artifact(
        artifact_store=store,
        file_path=str(path),
        artifact_id=trial.user_attrs[attrs.ADAPTER][path.name],
    )
    return load_file(path)
