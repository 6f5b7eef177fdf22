"""One trial: the standalone command, results that depend only on the inputs, its ranks."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
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
    args = sft._training_args(config, tmp_path / "b")
    trainer = sft._setup_trainer(
        config, sft._setup_model(config), tokenizer, data, args, trial=None
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


# A scorer that notes which rank scored which answer (the rank's environment says), so the test
# sees how the prompts were shared out.
NOTING_SCORER = """
import json, os

def noted(prediction, reference):
    value = sum(map(ord, prediction)) % 97 / 97
    with open({log!r}, "a") as f:
        f.write(json.dumps([int(os.environ["RANK"]), reference, prediction, value]) + "\\n")
    return value
"""


def _run_ranks(rank_main: Callable[..., None], args: tuple, *, timeout: float = 300) -> None:
    """Two fresh processes, ranks 0 and 1, each `rank_main(rank, *args)`; fails on the first
    rank that fails, or when they outlast `timeout` (a collective left waiting)."""
    import torch.multiprocessing as mp

    ranks = mp.start_processes(rank_main, args=args, nprocs=2, start_method="spawn", join=False)
    deadline = time.monotonic() + timeout
    while not ranks.join(timeout=2):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            raise AssertionError(f"the ranks did not finish within {timeout} s")


def _zero3_rank(rank: int, address: str, config: dict, objective: dict, out: Path) -> None:
    """One rank of a two-rank ZeRO-3 trial on the CPU, noting what each load of the base held."""
    import torch
    import transformers

    from trials import distributed
    from tuner.space import ObjectiveSpec

    sft.set_deepspeed_accelerator()
    torch.set_num_threads(1)
    distributed.init_group(rank=rank, world=2, address=address)
    loads = []
    load = transformers.AutoModelForCausalLM.from_pretrained

    def noting(*args: object, **kwargs: object) -> object:
        model = load(*args, **kwargs)
        params = list(model.parameters())
        loads.append(
            {
                "partitioned": all(hasattr(p, "ds_id") for p in params),
                "held": sum(
                    p.ds_tensor.numel() if hasattr(p, "ds_id") else p.numel() for p in params
                ),
                "total": sum(getattr(p, "ds_numel", p.numel()) for p in params),
            }
        )
        return model

    transformers.AutoModelForCausalLM.from_pretrained = noting
    result = sft.run(
        TrialConfig.model_validate(config),
        output_dir=out / f"rank{rank}",
        generation=ObjectiveSpec.model_validate(objective),
    )
    facts = {"loads": loads, "score": result.score, "adapter": result.adapter_dir}
    (out / f"rank{rank}.json").write_text(json.dumps(facts))


def test_a_zero3_trial_loads_the_base_partitioned_and_shares_out_the_prompts(
    demo_dir: Path, tmp_path: Path
) -> None:
    """Two ranks under ZeRO-3 (DeepSpeed on the CPU): each rank loads only its part of the base,
    and samples and scores only its share of the prompts (batch k on rank k % 2; a rank out of
    batches keeps in step), yet both score all of them, and the answers are the ones one process
    samples from the same adapter."""
    from trials import distributed
    from trials.chat import prompt_ids
    from trials.generate import generate

    log = tmp_path / "scored.jsonl"
    (tmp_path / "noted.py").write_text(NOTING_SCORER.format(log=str(log)))
    config = _config(demo_dir, deepspeed="zero3", max_steps=2, eval_steps=2).model_dump()
    sampling = {"max_new_tokens": 6, "max_samples": 6, "batch_size": 2, "temperature_grid": []}
    objective = {"metric": f"{tmp_path / 'noted.py'}:noted", "generation": sampling}
    address = distributed.rendezvous_address("127.0.0.1")
    _run_ranks(_zero3_rank, (address, config, objective, tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    for facts in ranks:
        (loaded,) = facts["loads"]
        assert loaded["partitioned"]  # zero.Init was on while the base loaded
        assert loaded["held"] < 0.6 * loaded["total"]

    scored = [json.loads(line) for line in log.read_text().splitlines()]
    trial = TrialConfig.model_validate(config)
    tokenizer = sft._setup_tokenizer(trial)
    data = data_mod.prepare(trial, tokenizer)
    # Three batches of two: rank 0 samples batches 0 and 2, rank 1 batch 1 (and batch 0 again,
    # unscored, to keep in step with rank 0's second).
    shares = {0: [0, 1, 4, 5], 1: [2, 3]}
    by_index = {}
    for rank, indices in shares.items():
        mine = [s for s in scored if s[0] == rank]
        assert [s[1] for s in mine] == [data.val_answers[i] for i in indices]
        by_index.update(zip(indices, mine, strict=True))
    assert ranks[0]["score"] == ranks[1]["score"] == math.fsum(s[3] for s in scored) / 6

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(trial.model_name_or_path)
    model = PeftModel.from_pretrained(base, ranks[0]["adapter"])
    rows = data.val.select(range(6))
    prompts = [prompt_ids(*row) for row in zip(rows["input_ids"], rows["labels"], strict=True)]
    alone = generate(
        model,
        tokenizer,
        prompts,
        temperature=trial.temperature,
        top_p=trial.top_p,
        max_new_tokens=6,
        batch_size=2,
        seed=trial.seed,
    )
    assert alone == {i: by_index[i][2] for i in range(6)}
