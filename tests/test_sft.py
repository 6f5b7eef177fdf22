"""One trial on its own: the standalone command, and results that depend only on the inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import small_space

from trials import data as data_mod
from trials import sft
from trials.config import TrialConfig


def _config(demo_dir: Path, **values: object) -> TrialConfig:
    fixed = small_space(demo_dir)["fixed"]
    return TrialConfig.model_validate({**fixed, "learning_rate": 1e-2, **values})


def test_a_warm_worker_gives_the_same_result_as_a_cold_one(demo_dir: Path, tmp_path: Path) -> None:
    """A worker keeps the base model, the tokenizer and the tokenised data between trials, and
    nothing else: the same params and seed give the same validation loss after other trials."""
    data_mod._CACHE.clear()
    sft._TOKENIZERS.clear()
    sft._BASES.clear()
    cold = sft.run(_config(demo_dir), output_dir=tmp_path / "cold")
    (base,) = sft._BASES.values()
    sft.run(_config(demo_dir, learning_rate=3e-3, lora_rank=8), output_dir=tmp_path / "x")
    warm = sft.run(_config(demo_dir), output_dir=tmp_path / "warm")
    assert sft._BASES and next(iter(sft._BASES.values())) is base  # the base was kept
    assert not any("lora" in name for name, _ in base.named_modules())  # and given back clean
    assert not any(p.requires_grad for p in base.parameters())
    assert (cold.data_source, warm.data_source) == ("tokenized", "memory")  # data kept too
    assert warm.eval_loss == cold.eval_loss
    assert warm.train_loss == cold.train_loss


def test_standalone_command_trains_from_a_fixed_params_yaml(demo_dir: Path, tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(_config(demo_dir).model_dump()))
    result = subprocess.run(
        [sys.executable, "-m", "trials.sft", str(params), "--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads((tmp_path / "run" / "result.json").read_text())
    assert out["steps"] == 30 and out["eval_loss"] < 4
    adapter = Path(out["adapter_dir"])
    assert (adapter / "adapter_model.safetensors").exists()
    assert (adapter / "adapter_config.json").exists()


def test_lora_options_reach_the_adapter_and_the_optimizer(demo_dir: Path, tmp_path: Path) -> None:
    """rsLoRA and DoRA are saved in the adapter's config (a plain peft load applies them);
    LoRA+ trains B at `loraplus_lr_ratio` x A's learning rate; packing fills the rows."""
    short = {"max_steps": 4, "eval_steps": 4}
    result = sft.run(
        _config(demo_dir, use_rslora=True, use_dora=True, **short), output_dir=tmp_path / "a"
    )
    saved = json.loads((Path(result.adapter_dir) / "adapter_config.json").read_text())
    assert saved["use_rslora"] is True and saved["use_dora"] is True

    config = _config(demo_dir, loraplus_lr_ratio=4, **short)
    assert config.use_loraplus  # naming the ratio turns LoRA+ on
    tokenizer = sft._setup_tokenizer(config)
    data = data_mod.prepare(config, tokenizer)
    trainer = sft._setup_trainer(
        config, sft._setup_model(config), tokenizer, data, tmp_path / "b", trial=None
    )
    try:
        groups = [g for g in trainer.create_optimizer().param_groups if g["params"]]
        names = {id(p): n for n, p in trainer.model.named_parameters()}
        lrs = {"B" if "lora_B" in names[id(g["params"][0])] else "A": g["lr"] for g in groups}
        assert lrs == {"A": config.learning_rate, "B": 4 * config.learning_rate}
    finally:
        sft._release(trainer)

    plain = sft.run(_config(demo_dir, **short), output_dir=tmp_path / "c")
    packed = sft.run(_config(demo_dir, packing=True, **short), output_dir=tmp_path / "d")
    assert packed.steps == plain.steps and packed.tokens_seen > plain.tokens_seen
