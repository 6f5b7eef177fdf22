"""ZeRO-3 on two CPU ranks: peak resident memory of loading the base, and generation time.

    python tests/benchmarks/zero3_memory.py [--hidden 1024 --layers 8] [--prompts 32 --batch 8]

A Llama of ~100M parameters with random weights (config only, nothing downloaded) is saved as
safetensors to a temp folder; two ranks (one thread each, gloo, DeepSpeed's CPU accelerator)
load it under `fixed.deepspeed: zero3`, in fresh processes for each order, then wrap it in
DeepSpeed as the Trainer does:

- memory, before: the base first, then the training arguments (the trial's old order): every
  rank holds the whole model until DeepSpeed partitions it; after: the arguments first
  (`trials.sft.run`'s order), so `from_pretrained` loads under zero.Init. Peak RSS per rank
  over load and partitioning. In transformers' ZeRO-3 load rank 0 still reads the whole
  checkpoint (the other ranks only their parts), so the saving is on the ranks other than 0.
  glibc keeps much of the freed memory of a partitioned load; `MALLOC_MMAP_THRESHOLD_=1048576`
  before the command shows the figures without that.
- generation, on the partitioned model: before, every rank samples every batch (as each rank's
  own trial did); after, `trials.generate.generate`, each rank its share.

Prints a table, the ratios, and one JSON line. DeepSpeed builds its CPU comm op once (~1 min).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

RANKS = 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()
    os.environ.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")

    with tempfile.TemporaryDirectory(prefix="tuner-zero3-") as tmp:
        root = Path(tmp)
        params = _save_model(root / "model", hidden=args.hidden, layers=args.layers)
        runs = {}
        for order in ("before", "after"):
            _spawn(order, root, vars(args))
            runs[order] = [json.loads((root / f"{order}-{r}.json").read_text()) for r in range(2)]
    _report(runs, params=params, settings=vars(args))


def _save_model(path: Path, *, hidden: int, layers: int) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuner.core.demo import build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)  # safetensors
    tokenizer.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def _spawn(order: str, root: Path, settings: dict) -> None:
    import torch.multiprocessing as mp

    from trials import distributed

    address = distributed.rendezvous_address("127.0.0.1")
    mp.start_processes(
        _rank, args=(order, address, root, settings), nprocs=RANKS, start_method="spawn"
    )


def _rank(rank: int, order: str, address: str, root: Path, settings: dict) -> None:
    import deepspeed
    import torch

    from trials import distributed, sft
    from trials.config import TrialConfig

    torch.set_num_threads(1)
    distributed.init_group(rank=rank, world=RANKS, address=address)
    config = TrialConfig(
        model_name_or_path=str(root / "model"),
        dataset={"path": "unused.jsonl"},
        deepspeed="zero3",
        per_device_train_batch_size=1,
        gradient_accumulation_steps=1,
    )
    started = time.perf_counter()
    if order == "before":
        model = sft._setup_model(config)
        args = sft._training_args(config, root / "out")
    else:
        args = sft._training_args(config, root / "out")
        model = sft._setup_model(config)
    load_s = time.perf_counter() - started
    partitioned = all(hasattr(p, "ds_id") for p in model.parameters())
    # What the Trainer does next: DeepSpeed partitions the model, which in the old order was
    # whole until here (transformers maps the checkpoint lazily: it is read only now).
    args.hf_deepspeed_config.trainer_config_finalize(args, model, 1)  # fills the `auto` values
    deepspeed.initialize(model=model, config=args.hf_deepspeed_config.config)
    facts = {
        "load_s": load_s,
        "partitioned": partitioned,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_mb": _rss_mb(),
    }
    if order == "after":
        facts.update(_time_generation(model, config, settings))
    (root / f"{order}-{rank}.json").write_text(json.dumps(facts))
    distributed.gather(None)  # no rank leaves while another still needs it


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def _time_generation(model: object, config: object, settings: dict) -> dict:
    import random

    import torch

    from trials import distributed, sft
    from trials import generate as gen

    tokenizer = sft._setup_tokenizer(config)
    rng = random.Random(0)
    words = list(range(4, len(tokenizer)))
    prompts = [[rng.choice(words) for _ in range(rng.randint(16, 48))] for _ in range(64)]
    prompts = prompts[: settings["prompts"]]
    sampling = {"temperature": 1.0, "top_p": 0.95, "max_new_tokens": settings["new_tokens"]}
    batch = settings["batch"]
    model.eval()

    # Before: every rank samples every batch (seeded as `generate` seeds them, so the answers
    # can be compared).
    distributed.gather(None)
    started = time.perf_counter()
    stop = gen._stop_ids(model, tokenizer)
    every = {}
    with torch.no_grad():
        for k, start in enumerate(range(0, len(prompts), batch)):
            texts = gen._sample(
                model,
                tokenizer,
                prompts[start : start + batch],
                seed=config.seed + k,
                stop=stop,
                synced=True,
                **sampling,
            )
            every.update(enumerate(texts, start))
    before = time.perf_counter() - started

    distributed.gather(None)
    started = time.perf_counter()
    mine = gen.generate(model, tokenizer, prompts, batch_size=batch, seed=config.seed, **sampling)
    shares = distributed.gather(mine)
    after = time.perf_counter() - started
    split = {i: text for share in shares for i, text in share.items()}
    return {
        "generate_before_s": before,
        "generate_after_s": after,
        "sampled_here": len(mine),
        "same_answers": split == every,
    }


def _report(runs: dict, *, params: int, settings: dict) -> None:
    print(
        f"{params / 1e6:.0f}M-parameter Llama, {RANKS} CPU ranks, ZeRO-3; generation: "
        f"{settings['prompts']} prompts, batch {settings['batch']}, "
        f"{settings['new_tokens']} new tokens"
    )
    print(f"{'rank':>4} {'order':7} {'peak RSS MB':>12} {'RSS after MB':>13} {'load s':>7} "
          f"{'loaded partitioned':>19}")  # fmt: skip
    for order, ranks in runs.items():
        for rank, facts in enumerate(ranks):
            print(
                f"{rank:>4} {order:7} {facts['peak_rss_mb']:>12.0f} {facts['rss_mb']:>13.0f} "
                f"{facts['load_s']:>7.1f} {facts['partitioned']!s:>19}"
            )
    ratios = [
        after["peak_rss_mb"] / before["peak_rss_mb"]
        for before, after in zip(runs["before"], runs["after"], strict=True)
    ]
    print("peak RSS after/before, by rank: " + ", ".join(f"{r:.2f}" for r in ratios))
    after = runs["after"]
    gen_before = max(f["generate_before_s"] for f in after)
    gen_after = max(f["generate_after_s"] for f in after)
    same = all(f["same_answers"] for f in after)
    print(
        f"generation: before {gen_before:.1f} s (every rank all {settings['prompts']} prompts), "
        f"after {gen_after:.1f} s (prompts sampled per rank: "
        f"{[f['sampled_here'] for f in after]}), after/before {gen_after / gen_before:.2f}, "
        f"same answers: {same}"
    )
    summary = {
        "params": params,
        "peak_rss_mb": {o: [f["peak_rss_mb"] for f in ranks] for o, ranks in runs.items()},
        "peak_rss_ratio_by_rank": ratios,
        "generate_s": {"before": gen_before, "after": gen_after},
        "generate_ratio": gen_after / gen_before,
        "same_answers": same,
        **settings,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
