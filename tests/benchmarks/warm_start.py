"""Trial start-up on a cold and on a warm worker, for a base model of a chosen size.

    python tests/benchmarks/warm_start.py [--hidden 1024 --layers 16] [--trials 3]

Builds a randomly initialised Llama of that shape (no download), saves it as safetensors, then
runs `--trials` one-step LoRA trials in this one process, as a worker runs them: the first loads
the base (cold), the others reuse it (warm). Start-up is trial start to the first training step:
model load + data + trainer set-up. The demo model of the quickstart is too small for loading
to matter; this shows what the kept base saves as the model grows. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()

    import torch
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

    from trials import sft
    from trials.config import TrialConfig
    from tuner.core.demo import prepare_demo

    root = Path(tempfile.mkdtemp(prefix="tuner-warm-"))
    demo = prepare_demo(root / "demo", pretrain_steps=1)  # its tokenizer and data
    config = LlamaConfig(
        vocab_size=AutoConfig.from_pretrained(demo.model).vocab_size,
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 2.75),
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 256),
        max_position_embeddings=256,
    )
    model_dir = root / "base"
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(model_dir, safe_serialization=True)
    del model
    for path in demo.model.iterdir():  # the demo's tokenizer and chat template
        if path.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            (model_dir / path.name).write_bytes(path.read_bytes())
    torch.set_num_threads(2)
    sft.set_deepspeed_accelerator()
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    startups = []
    for trial in range(args.trials):
        trial_config = TrialConfig(
            model_name_or_path=str(model_dir),
            dataset={"path": str(demo.data), "format": "alpaca"},
            cutoff_len=64,
            val_size=8,
            max_steps=1,
            eval_steps=1,
            per_device_train_batch_size=1,
            gradient_accumulation_steps=1,
            per_device_eval_batch_size=8,
            learning_rate=1e-4 * (trial + 1),
        )
        timings: dict[str, float] = {}
        started = time.perf_counter()
        sft.run(trial_config, output_dir=root / f"trial{trial}", timings=timings)
        startup = timings["load_s"] + timings["data_s"] + timings["setup_s"]
        startups.append(startup)
        print(
            f"trial {trial} ({'cold' if trial == 0 else 'warm'}): start-up {startup:.2f} s "
            f"(load {timings['load_s']:.2f}, data {timings['data_s']:.2f}, "
            f"set-up {timings['setup_s']:.2f}); whole trial {time.perf_counter() - started:.1f} s",
            flush=True,
        )
    cold, warm = startups[0], statistics.median(startups[1:])
    print(f"base of {params / 1e6:.0f}M parameters: warm start-up is {warm / cold:.1%} of cold")
    print(json.dumps({"params": params, "startup_cold_s": cold, "startup_warm_s": warm}))


if __name__ == "__main__":
    main()
