"""The GPU check: every GPU figure of the product, from one prepared command.

    python tests/gpu/check.py --out DIR              # on the lent GPU machine (tests/gpu/README.md)
    python tests/gpu/check.py --dry-run --out DIR    # anywhere, on the CPU: a tiny model, < 3 min

Each item runs in its own process under its own time limit (a hang or a crash costs that item,
not the lease), prints one JSON line per figure, and the run ends with `DIR/summary.json` and
`DIR/check.log` (every item's output). Items, in the order they run:

- `model`: a randomly initialised model of Qwen2.5-1.5B's shape (config only, no download), bf16,
  saved as safetensors to local disk, with the demo's tokenizer; data of mixed lengths.
- `throughput`: the same LoRA (rank 16, every linear layer, cutoff 2048) trained by plain HF
  Trainer + peft, and by tuner's trial with packing off, on, and on with Liger (when importable).
  tokens/s, peak memory and MFU = tokens/s x 6 N / 989 TFLOP/s (N: the parameters of every matrix
  multiply, trainable and frozen; the convention the README states), beside `mfu_lora` (4 N plus
  attention: what LoRA's backward really computes, tests/benchmarks/throughput.py).
- `sweep`: a 6-trial study of that model on SQLite through the local backend (short trials, median
  pruning): overhead share (time in a trial outside training and evaluation), and the start-up to
  the first step of the worker's first trial (cold: loads the base from safetensors) against the
  later ones (warm: the kept base).
- `zero2`, `zero3`: single-rank DeepSpeed trials of a few steps: ran or not, tokens/s.
- `qlora`: a 4-bit trial, if bitsandbytes is importable.
- `generation`: 64 prompts x 256 new tokens through the trial's generation path
  (trials.generate.generate); vLLM too when it is importable.

Goals (issue 23, checked on the GPU): the trial >= 1.3x HF Trainer + peft tokens/s; MFU >= 45 %
with packing and Liger; warm start <= 10 % of cold for the 1.5B base.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "benchmarks")]

PEAK_TFLOPS = 989.0  # H100/H200 SXM dense bf16: the convention of the goals
MARK = "FIGURE "  # an item's figure line on its stdout
DONE = "ITEM "  # an item's end, with its status

# (item, seconds on the GPU, seconds in a dry run), in order of what matters most. The GPU
# limits add up to 7 minutes (issue 23: the check ends within 8, the lease's start aside); a dry
# run's are loose, for a loaded CI machine: it is there so that the runner cannot rot.
ITEMS = [
    ("env", 40, 60),
    ("model", 50, 60),
    ("throughput:hf_peft", 45, 60),
    ("throughput:tuner", 40, 60),
    ("throughput:tuner_packed", 40, 60),
    ("throughput:tuner_packed_liger", 40, 30),
    ("sweep", 150, 300),
    ("profile", 45, 60),
    ("generation", 60, 60),
    # A dry run's first DeepSpeed start builds its CPU shared-memory op (~2.5 min on 2 cores).
    ("zero2", 45, 300),
    ("zero3", 75, 180),
    ("qlora", 25, 90),
]
# DeepSpeed leaves process-wide state (the process group, transformers' ZeRO config): its items
# get a process of their own in a dry run too.
ALONE = {"zero2", "zero3"}
# Qwen2.5-1.5B's; `tiny` for a dry run, its widths multiples of 64 as real models' are
# (bitsandbytes' AVX512-BF16 CPU path packs 4-bit weights in blocks of 64: 352 failed there).
SHAPES = {
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, vocab_size=151936),
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=4096),
}  # fmt: skip


class Plan:
    """What one item needs to know: the scale of the run and where its files are."""

    def __init__(self, workdir: Path, dry_run: bool) -> None:
        self.workdir = workdir
        self.dry_run = dry_run
        self.size = "tiny" if dry_run else "1.5b"
        self.cutoff = 256 if dry_run else 2048
        self.examples = 200 if dry_run else 1500
        self.steps = 2 if dry_run else 15
        self.batch = 2 if dry_run else 4
        self.trials = 4 if dry_run else 6  # the sweep's
        self.model = workdir / "base"
        self.data = workdir / "data.jsonl"

    @property
    def facts(self) -> dict:
        return json.loads((self.workdir / "model.json").read_text())


def emit(figure: str, value: object, unit: str | None = None, **extra: object) -> None:
    print(MARK + json.dumps({"figure": figure, "value": value, "unit": unit, **extra}), flush=True)


# --- the items: each runs in a fresh process -----------------------------------------------


def item_env(plan: Plan) -> None:
    import importlib.metadata as md

    import torch

    names = ["torch", "transformers", "peft", "trl", "accelerate", "datasets", "optuna",
             "deepspeed", "liger-kernel", "bitsandbytes", "vllm", "ray"]  # fmt: skip
    versions = {}
    for name in names:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    emit("device", device, gpus=torch.cuda.device_count(), python=sys.version.split()[0])
    emit("versions", versions)
    # The product, imported as a GPU user runs it: without Ray.
    import trials.sft  # noqa: F401
    import tuner.backends.local  # noqa: F401
    import tuner.core.study  # noqa: F401

    emit("imports_without_ray", "ray" not in sys.modules)


def item_model(plan: Plan) -> None:
    """The base (random weights: speed does not depend on them) and the data, written once."""
    import throughput
    import torch

    cuda = torch.cuda.is_available()
    started = time.perf_counter()
    with torch.device("cuda" if cuda else "cpu"):  # a 1.5B init on the GPU takes seconds
        model_dir, n_matmul, shape = throughput._build_model(
            plan.workdir, SHAPES[plan.size], bf16=cuda
        )
    model_dir.rename(plan.model)
    throughput._write_data(plan.data, plan.examples, plan.cutoff)
    size = sum(p.stat().st_size for p in plan.model.glob("*.safetensors"))
    facts = {"n_matmul": n_matmul, **shape, "bf16": cuda}
    (plan.workdir / "model.json").write_text(json.dumps(facts))
    emit("model", plan.size, n_matmul_params=n_matmul, safetensors_gb=size / 2**30,
         seconds=time.perf_counter() - started)  # fmt: skip


def item_throughput(plan: Plan, run: str) -> None:
    import importlib.util

    import throughput
    import torch

    facts = plan.facts
    args = argparse.Namespace(
        steps=plan.steps, batch=plan.batch, cutoff=plan.cutoff, gradient_checkpointing=False
    )
    out = plan.workdir / run
    if run == "tuner_packed_liger" and importlib.util.find_spec("liger_kernel") is None:
        emit(run, None, ran=False, reason="liger-kernel is not installed")
        return
    if run == "hf_peft":
        result = throughput._baseline(plan.model, plan.data, out, args, bf16=facts["bf16"])
    else:
        result = throughput._tuner(
            plan.model, plan.data, out, args, bf16=facts["bf16"],
            packing="packed" in run, liger="liger" in run,
        )  # fmt: skip
    tokens_s = result["tokens_per_s"]
    six_n = 6 * facts["n_matmul"]
    lora = 4 * facts["n_matmul"] + 12 * facts["layers"] * facts["hidden"] * result["mean_len"]
    peak = PEAK_TFLOPS * 1e12 if torch.cuda.is_available() else None
    emit(run, tokens_s, "tokens/s", ran=True,
         mfu=tokens_s * six_n / peak if peak else None,
         mfu_lora=tokens_s * lora / peak if peak else None,
         peak_mem_gb=result["peak_mem_gb"], mean_len=result["mean_len"])  # fmt: skip


def item_sweep(plan: Plan) -> None:
    """Six short trials of the base through the product's own path (create, local backend)."""
    import logging

    import trial_overhead
    import yaml
    from optuna.trial import TrialState

    from tuner.core.study import create_study, run_study
    from tuner.store import open_study

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("tuner").setLevel(logging.INFO)  # each trial's line, in the log
    facts = plan.facts
    space = {
        "name": "gpu-check",
        "params": {
            "learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
            "lora_rank": {"type": "categorical", "choices": [8, 16, 32]},
        },
        "fixed": {
            "model_name_or_path": str(plan.model),
            "dataset": {"path": str(plan.data), "format": "alpaca"},
            "cutoff_len": plan.cutoff // 2,
            "val_size": 16 if plan.dry_run else 64,
            "max_steps": 2 * plan.steps,
            "eval_steps": plan.steps,
            "logging_steps": plan.steps,
            "per_device_train_batch_size": plan.batch,
            "per_device_eval_batch_size": 16,
            "packing": True,
            "bf16": facts["bf16"],
            "lora_target": "all",
        },
        "pruner": {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 0},
        "budget": {"n_trials": plan.trials},
    }
    path = plan.workdir / "gpu_check.yaml"
    path.write_text(yaml.safe_dump(space))
    url = f"sqlite:///{plan.workdir / 'gpu_check.db'}"
    name = create_study(path, storage=url)
    started = time.perf_counter()
    progress = run_study(name, storage=url, n_trials=plan.trials, jobs=1)
    wall = time.perf_counter() - started
    study = open_study(name, url).study
    done = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    rows = [trial_overhead._row(t) for t in done]
    summary = trial_overhead._summary(rows, wall=wall, jobs=1)
    emit("sweep_trials", len(done), complete=sum(r["state"] == "complete" for r in rows),
         pruned=sum(r["state"] == "pruned" for r in rows), failed=progress.failed,
         wall_s=wall)  # fmt: skip
    emit("sweep_overhead_share", summary["overhead_share"],
         warm=summary["overhead_share_warm"], cold=summary["overhead_share_cold"])  # fmt: skip
    # The worker's first trial loads the base from safetensors; the later ones keep it.
    ordered = sorted(done, key=lambda t: t.datetime_start)
    startups = [_startup(t) for t in ordered]
    if len(startups) >= 2:
        cold, warm = startups[0], statistics.median(startups[1:])
        emit("warm_start_share", warm / cold if cold else None, cold_s=cold, warm_s=warm,
             load_cold_s=_timing(ordered[0], "load_s"),
             load_warm_s=statistics.median(_timing(t, "load_s") for t in ordered[1:]))  # fmt: skip


def _timing(trial, key: str) -> float:  # noqa: ANN001
    return float(trial.user_attrs.get("timings", {}).get(key, 0.0))


def _startup(trial) -> float:  # noqa: ANN001
    return sum(_timing(trial, k) for k in ("load_s", "data_s", "setup_s"))


def item_profile(plan: Plan) -> None:
    """Where a packed training step's time goes: PyTorch's profiler over a short packed trial,
    its busiest operators by GPU and by CPU time (in the log), and the GPU's busy share."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from trials import sft
    from trials.config import TrialConfig

    cuda = torch.cuda.is_available()
    config = TrialConfig(
        model_name_or_path=str(plan.model),
        dataset={"path": str(plan.data), "format": "alpaca"},
        cutoff_len=plan.cutoff, val_size=8, max_steps=4, eval_steps=10**6, logging_steps=10**6,
        per_device_train_batch_size=plan.batch, gradient_accumulation_steps=1,
        lora_rank=16, lora_alpha=32, bf16=plan.facts["bf16"], packing=True,
    )  # fmt: skip
    sft.run(config, output_dir=plan.workdir / "profile-warm")  # load and compile outside
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        result = sft.run(config, output_dir=plan.workdir / "profile")
    wall = time.perf_counter() - started
    table = prof.key_averages()
    for key in (
        ("self_cuda_time_total", "self_cpu_time_total") if cuda else ("self_cpu_time_total",)
    ):
        print(table.table(sort_by=key, row_limit=15, max_name_column_width=60))
    busy = sum(e.self_device_time_total for e in table) / 1e6 if cuda else None
    emit("profile", result.tokens_per_s, "tokens/s", wall_s=wall, gpu_busy_s=busy)


def item_deepspeed(plan: Plan, stage: str) -> None:
    """One rank of a ZeRO trial: the process group the backend would make, for a world of one."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        emit(stage, None, ran=False, reason="deepspeed is not installed")
        return
    from trials import distributed, sft

    sft.set_deepspeed_accelerator()
    distributed.init_group(rank=0, world=1, address=distributed.rendezvous_address("127.0.0.1"))
    _trial(plan, stage, deepspeed=stage, max_steps=max(2, plan.steps // 2))


def item_qlora(plan: Plan) -> None:
    import importlib.util

    import torch

    if importlib.util.find_spec("bitsandbytes") is None:
        emit("qlora", None, ran=False, reason="bitsandbytes is not installed (its wheel is 41 MiB)")
        return
    if not torch.cuda.is_available() and not plan.dry_run:
        emit("qlora", None, ran=False, reason="no GPU")
        return
    _trial(plan, "qlora", quantization_bit=4, max_steps=max(2, plan.steps // 2))


def _trial(plan: Plan, figure: str, **overrides: object) -> None:
    from trials import sft
    from trials.config import TrialConfig

    facts = plan.facts
    config = TrialConfig(
        model_name_or_path=str(plan.model),
        dataset={"path": str(plan.data), "format": "alpaca"},
        cutoff_len=plan.cutoff,
        val_size=8,
        eval_steps=10**6,
        logging_steps=10**6,
        per_device_train_batch_size=plan.batch,
        lora_rank=16,
        lora_alpha=32,
        bf16=facts["bf16"],
        packing=True,
        gradient_accumulation_steps=1,
        **overrides,
    )
    result = sft.run(config, output_dir=plan.workdir / figure)
    emit(figure, result.tokens_per_s, "tokens/s", ran=True, peak_mem_gb=result.peak_mem_gb)


def item_generation(plan: Plan) -> None:
    """Sampled answers from base + LoRA, in one batch per 64 prompts, as a trial scores them."""
    import importlib.util

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trials.generate import generate

    cuda = torch.cuda.is_available()
    n_prompts, new_tokens = (64, 256) if not plan.dry_run else (8, 16)
    tokenizer = AutoTokenizer.from_pretrained(plan.model)
    model = AutoModelForCausalLM.from_pretrained(
        plan.model, dtype=torch.bfloat16 if cuda else torch.float32
    ).to("cuda" if cuda else "cpu")
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    model = get_peft_model(model, lora)
    # A random base rarely samples an end token, so (nearly) every answer runs its full length.
    model.generation_config.eos_token_id = None
    records = [json.loads(line) for line in plan.data.read_text().splitlines()[:n_prompts]]
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": r["instruction"][:200]}],
            add_generation_prompt=True, tokenize=True,
        )["input_ids"]
        for r in records
    ]  # fmt: skip
    generate(model, tokenizer, prompts[:2], temperature=0.6, top_p=0.95, max_new_tokens=4,
             batch_size=2, seed=0)  # warm-up  # fmt: skip
    # Count what was sampled, not what decodes: the demo tokenizer names few of a random
    # 151,936-token model's ids.
    sampled = []
    plain = model.generate

    def counting(*args: object, **kwargs: object) -> object:
        out = plain(*args, **kwargs)
        width = kwargs["input_ids"].shape[1]
        sampled.append(int((out[:, width:] != kwargs["pad_token_id"]).sum()))
        return out

    model.generate = counting
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    generate(model, tokenizer, prompts, temperature=0.6, top_p=0.95, max_new_tokens=new_tokens,
             batch_size=n_prompts, seed=0)  # fmt: skip
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    emit("generation", sum(sampled) / seconds, "new tokens/s", seconds=seconds,
         prompts=n_prompts, max_new_tokens=new_tokens, new_tokens=sum(sampled))  # fmt: skip
    if importlib.util.find_spec("vllm") is None:
        emit("generation_vllm", None, ran=False, reason="vllm is not installed")


# --- the runner ------------------------------------------------------------------------------


def run_item(plan: Plan, item: str) -> None:
    import torch

    torch.set_num_threads(min(8, os.cpu_count() or 1) if not plan.dry_run else 1)
    kind, _, variant = item.partition(":")
    if kind == "throughput":
        item_throughput(plan, variant)
    elif kind in ("zero2", "zero3"):
        item_deepspeed(plan, kind)
    else:
        globals()[f"item_{kind}"](plan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-check-out"))
    parser.add_argument("--dry-run", action="store_true", help="a tiny model on the CPU")
    parser.add_argument("--workdir", type=Path, default=None, help="local disk for the model")
    parser.add_argument("--only", default=None, help="comma-separated items (model always runs)")
    parser.add_argument("--item", default=None, help=argparse.SUPPRESS)  # a child's own item
    args = parser.parse_args()
    workdir = (args.workdir or Path(os.environ.get("TMPDIR", "/tmp")) / "tuner-gpu-check").resolve()

    if args.item:
        from trials.quiet import quiet_libraries

        quiet_libraries()
        plan = Plan(workdir, args.dry_run)
        for item in args.item.split(","):
            started = time.perf_counter()
            try:
                run_item(plan, item)
                status = "ok"
            except Exception as e:  # noqa: BLE001 - the next item still runs; the log has it all
                import traceback

                traceback.print_exc()
                status = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            seconds = round(time.perf_counter() - started, 1)
            print(
                DONE + json.dumps({"item": item, "status": status, "seconds": seconds}), flush=True
            )
        return

    import shutil

    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    args.out.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(",")) | {"env", "model"} if args.only else None
    figures: list[dict] = []
    items: list[dict] = []
    started = time.perf_counter()
    with (args.out / "check.log").open("w") as log:
        chosen = [
            (item, dry if args.dry_run else gpu)
            for item, gpu, dry in ITEMS
            if only is None or item in only or item.split(":")[0] in only
        ]
        # On the GPU each item has a process and a limit of its own; a dry run shares one
        # process (its imports alone take ~15 s on a loaded 2-core machine), under their sum.
        if args.dry_run:
            groups = [[c for c in chosen if c[0] not in ALONE]] + [
                [c] for c in chosen if c[0] in ALONE
            ]
        else:
            groups = [[c] for c in chosen]
        for group in groups:
            names = [item for item, _ in group]
            limit = sum(seconds for _, seconds in group)
            items += _run_child(names, limit, workdir, args.dry_run, log, figures)
    summary = {
        "dry_run": args.dry_run,
        "wall_s": time.perf_counter() - started,
        "items": items,
        "figures": figures,
        "goals": _goals(figures),
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({"goals": summary["goals"], "wall_s": summary["wall_s"]}))
    shutil.rmtree(workdir, ignore_errors=True)
    sys.exit(0 if all(i["status"] == "ok" for i in items) else 1)


def _run_child(  # noqa: ANN001
    names: list[str], limit: float, workdir: Path, dry_run: bool, log, figures: list[dict]
) -> list[dict]:
    """Run items in one fresh process (its own session, so a limit kills all it started); their
    outcomes in order: ok, failed (with the error's line) or the limit reached."""
    command = [sys.executable, __file__, "--item", ",".join(names), "--workdir", str(workdir)]
    command += ["--dry-run"] * dry_run
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    log.write(f"\n===== {', '.join(names)} (limit {limit:.0f} s)\n")
    log.flush()
    started = time.perf_counter()
    child = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True, cwd=ROOT,
        start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = child.communicate(timeout=limit)
        ended = None if child.returncode == 0 else f"failed (exit {child.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, 9)
        output, _ = child.communicate()
        ended = f"not done within {limit:.0f} s"
    log.write(output)
    log.flush()
    outcomes: dict[str, dict] = {}
    for line in output.splitlines():
        running = next((n for n in names if n not in outcomes), names[-1])  # items run in order
        if line.startswith(MARK):
            figure = {"item": running, **json.loads(line.removeprefix(MARK))}
            figures.append(figure)
            print(json.dumps(figure), flush=True)
        elif line.startswith(DONE):
            done = json.loads(line.removeprefix(DONE))
            outcomes[done["item"]] = done
    results = []
    for name in names:
        outcome = outcomes.get(name) or {"item": name, "status": ended or "not run"}
        if outcome["status"] != "ok" and output.strip():
            outcome["tail"] = output.strip().splitlines()[-1][:300]
        results.append(outcome)
        print(json.dumps(outcome), flush=True)
    log.write(f"===== {time.perf_counter() - started:.1f} s\n")
    return results


def _goals(figures: list[dict]) -> dict:
    by = {f["figure"]: f for f in figures}

    def value(name: str) -> float | None:
        return by.get(name, {}).get("value")

    goals = {}
    base, tuned = value("hf_peft"), value("tuner_packed_liger") or value("tuner_packed")
    if base and tuned:
        goals["trial_vs_hf_peft"] = {
            "value": tuned / base,
            "goal": ">= 1.3",
            "met": tuned / base >= 1.3,
        }
    mfu = by.get("tuner_packed_liger", {}).get("mfu")
    if mfu is not None:
        goals["mfu_packed_liger"] = {"value": mfu, "goal": ">= 0.45", "met": mfu >= 0.45}
    share = value("warm_start_share")
    if share is not None:
        goals["warm_start_share"] = {"value": share, "goal": "<= 0.10", "met": share <= 0.10}
    return goals


if __name__ == "__main__":
    main()
