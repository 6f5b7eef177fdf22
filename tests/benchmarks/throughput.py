"""Training throughput of one LoRA SFT trial, beside a plain HF Trainer + peft script, in one run.

    python tests/benchmarks/throughput.py --size 0.5b            # on a GPU: bf16, sdpa
    python tests/benchmarks/throughput.py --size tiny --steps 10  # anywhere, CPU included

Builds a Qwen2-architecture model of the chosen size with random weights (no download; speed
does not depend on the weights) and alpaca data of mixed lengths, then trains the same LoRA
(rank 16, every linear layer) three ways: the `tuner` trial (trials/sft.py) with packing off and
on, and the baseline most people write: `get_peft_model` + `Trainer` + a padding collator.

Figures, per run: training tokens per second (non-padding tokens / time inside the training
steps after the first, the trial's own `tokens_per_s`, taken the same way for the baseline),
peak GPU memory, and MFU = tokens/s x FLOPs per token / peak FLOP/s, with

    FLOPs per token = 4 N + 12 L h s   (+ 2 N with gradient checkpointing)

N: parameters of the model's matrix multiplies (the embedding lookup left out, the LM head in);
LoRA's forward is 2N and its backward 2N (input gradients only: the frozen weights get none);
L layers, hidden size h, s the mean length of a training example (attention's scores and
weighted sum, forward and backward); LoRA's own matrices (<1 % of N) are left out. Peak: the
device's dense bf16 FLOP/s (`--peak-tflops`, known for H100/H200/A100). Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

SIZES = {  # Qwen2.5-0.5B and -1.5B shapes; `tiny` for a CPU run
    "tiny": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=8192),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, vocab_size=151936),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, vocab_size=151936),
}  # fmt: skip
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, SXM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="tiny")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4, help="per-device batch (rows)")
    parser.add_argument("--cutoff", type=int, default=1024, help="cutoff_len, tokens")
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()

    import datasets
    import torch
    import transformers

    from trials import sft

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    sft.set_deepspeed_accelerator()
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in device), None)

    root = Path(tempfile.mkdtemp(prefix="tuner-throughput-"))
    model_dir, n_matmul, shape = _build_model(root, SIZES[args.size], bf16=cuda)
    data = _write_data(root / "data.jsonl", args.examples, args.cutoff)

    runs = {}
    for name, packing in (("tuner", False), ("tuner_packed", True)):
        runs[name] = _tuner(model_dir, data, root / name, args, packing=packing, bf16=cuda)
    runs["hf_peft"] = _baseline(model_dir, data, root / "baseline", args, bf16=cuda)

    ckpt = 2 if args.gradient_checkpointing else 0
    for run in runs.values():
        per_token = (4 + ckpt) * n_matmul + 12 * shape["layers"] * shape["hidden"] * run["mean_len"]
        run["flops_per_token"] = per_token
        run["mfu"] = run["tokens_per_s"] * per_token / (peak * 1e12) if peak else None

    base = runs["hf_peft"]["tokens_per_s"]
    print(f"device: {device}; model: Qwen2 {args.size} ({n_matmul / 1e6:.0f}M matmul params)")
    print(f"{'run':<14}{'tokens/s':>11}{'vs hf+peft':>12}{'peak GB':>9}{'MFU':>8}")
    for name, run in runs.items():
        mem = "-" if run["peak_mem_gb"] is None else f"{run['peak_mem_gb']:.1f}"
        mfu = "-" if run["mfu"] is None else f"{run['mfu']:.1%}"
        ratio = run["tokens_per_s"] / base
        print(f"{name:<14}{run['tokens_per_s']:>11.0f}{ratio:>11.2f}x{mem:>9}{mfu:>8}")
    print(json.dumps({"device": device, "size": args.size, **runs}))


def _build_model(root: Path, shape: dict, *, bf16: bool) -> tuple[Path, int, dict]:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tuner.core.demo import build_tokenizer

    tokenizer = build_tokenizer()
    config = Qwen2Config(**shape, max_position_embeddings=32768, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16 if bf16 else torch.float32)
    n_matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    model_dir = root / "model"
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    shape_out = {"layers": config.num_hidden_layers, "hidden": config.hidden_size}
    return model_dir, n_matmul, shape_out


def _write_data(path: Path, n: int, cutoff: int) -> Path:
    """Alpaca records of mixed lengths (the demo tokenizer reads one character as one token):
    most short, some near cutoff_len, as instruction data is."""
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    with path.open("w") as f:
        for _ in range(n):
            length = min(cutoff - 40, int(rng.lognormvariate(5.3, 0.7)))
            words = "".join(rng.choice(letters + " ") for _ in range(length))
            half = len(words) // 3
            record = {"instruction": words[:half], "output": words[half:]}
            f.write(json.dumps(record) + "\n")
    return path


def _tuner(  # noqa: ANN001
    model_dir: Path, data: Path, out: Path, args, *, packing: bool, bf16: bool, liger: bool = False
) -> dict:
    import torch

    from trials import sft
    from trials.config import TrialConfig

    config = TrialConfig(
        model_name_or_path=str(model_dir),
        dataset={"path": str(data), "format": "alpaca"},
        cutoff_len=args.cutoff,
        val_size=8,
        max_steps=args.steps,
        eval_steps=10**6,
        logging_steps=10**6,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        lora_rank=16,
        lora_alpha=32,
        bf16=bf16,
        packing=packing,
        use_liger_kernel=liger,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    sft._BASES.clear()  # each run loads its own base, as the baseline does
    result = sft.run(config, output_dir=out)
    rows = sft.data_mod.prepare(config, sft._setup_tokenizer(config)).train
    return {
        "tokens_per_s": result.tokens_per_s,
        "tokens": result.tokens_seen,
        "peak_mem_gb": result.peak_mem_gb,
        "mean_len": sum(len(ids) for ids in rows["input_ids"]) / len(rows),
    }


def _baseline(model_dir: Path, data: Path, out: Path, args, *, bf16: bool) -> dict:  # noqa: ANN001
    """What a person writes by hand: tokenise, pad per batch, get_peft_model, Trainer."""
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
    )

    from trials.callbacks import trainer_callback
    from trials.speed import StepTimer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token

    def encode(record: dict) -> dict:
        prompt = [{"role": "user", "content": record["instruction"]}]
        full = prompt + [{"role": "assistant", "content": record["output"]}]
        p = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        ids = tokenizer.apply_chat_template(full, tokenize=True)
        p, ids = p["input_ids"], ids["input_ids"]
        ids = ids[: args.cutoff]
        return {"input_ids": ids, "labels": [-100] * len(p) + ids[len(p) :]}

    rows = datasets.load_dataset("json", data_files=str(data), split="train")
    rows = rows.map(encode, remove_columns=rows.column_names)
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
    model = get_peft_model(model, lora)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(out),
            max_steps=args.steps,
            per_device_train_batch_size=args.batch,
            learning_rate=1e-4,
            bf16=bf16,
            use_cpu=not torch.cuda.is_available(),
            gradient_checkpointing=args.gradient_checkpointing,
            logging_steps=10**6,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            include_num_input_tokens_seen="non_padding",
        ),
        train_dataset=rows,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
    )
    # The trial's own measure, for a fair figure.
    trainer.add_callback(timer := trainer_callback(StepTimer))
    trainer.train()
    return {
        "tokens_per_s": timer.tokens_per_s,
        "tokens": int(trainer.state.num_input_tokens_seen),
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30
        if torch.cuda.is_available()
        else None,
        "mean_len": sum(len(ids) for ids in rows["input_ids"]) / len(rows),
    }


if __name__ == "__main__":
    main()
