"""What a worker killed mid-trial costs, with and without checkpoints, side by side in one run.

    python tests/benchmarks/preemption.py [--steps 60] [--every 10] [--kill-at 45] [--workdir DIR]

One LoRA trial of the demo (fixed params, `--steps` optimizer steps, evaluated every 5) runs on
the local backend; once it has evaluated step `--kill-at`, its worker gets SIGKILL, as a
preempted node's would, and the driver retries the trial. The same, once without checkpoints
(`resources.checkpoint_every: null`: the retry starts at step 0) and once with one every
`--every` steps. Per mode: the step the retry resumed at, the training steps redone (trained by
the dead attempt and again by the retry), and the retry's wall time. Runs one training at a
time. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

PARAMS = {"learning_rate": 3e-3, "lora_rank": 8, "lora_alpha": 16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--kill-at", type=int, default=45)
    parser.add_argument("--workdir", type=Path, default=None, help="reuses a demo/ found there")
    args = parser.parse_args()
    if args.kill_at % 5 or not 0 < args.kill_at < args.steps:
        parser.error("--kill-at must be a multiple of 5 below --steps")

    from tuner.core.demo import prepare_demo

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tuner-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    prepare_demo(workdir / "demo")
    url = f"sqlite:///{workdir / f'preempt-{int(time.time())}.db'}"

    rows = [
        _killed_once(workdir, url, args, every=None),
        _killed_once(workdir, url, args, every=args.every),
    ]
    print(f"{'checkpoints':>12} {'killed at':>10} {'resumed at':>11} {'redone':>7} {'retry s':>8}")
    for row in rows:
        print(
            f"{row['checkpoint_every'] or 'none':>12} {row['killed_at_step']:>10} "
            f"{row['resumed_from_step']:>11} {row['steps_redone']:>7} {row['retry_s']:>8.1f}"
        )
    without, with_ = rows
    summary = {
        "rows": rows,
        "steps_redone_ratio": with_["steps_redone"] / max(without["steps_redone"], 1),
        "retry_time_ratio": with_["retry_s"] / without["retry_s"],
    }
    print(
        f"with checkpoints every {args.every} steps: {with_['steps_redone']} steps redone against "
        f"{without['steps_redone']} ({summary['steps_redone_ratio']:.2f}x); the retry took "
        f"{summary['retry_time_ratio']:.2f}x the time"
    )
    print(json.dumps(summary))


def _killed_once(workdir: Path, url: str, args: argparse.Namespace, *, every: int | None) -> dict:
    import optuna
    from optuna.trial import TrialState

    from tuner.core.study import create_study

    name = f"preempt-{'none' if every is None else every}-{int(time.time())}"
    space = {
        "name": name,
        "params": {
            "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
            "lora_rank": {"type": "categorical", "choices": [4, 8]},
            "lora_alpha": {"type": "multiple", "of": "lora_rank", "factors": [1, 2]},
        },
        "fixed": {
            "model_name_or_path": str(workdir / "demo/model"),
            "dataset": {"path": str(workdir / "demo/data.jsonl"), "format": "alpaca"},
            "cutoff_len": 96,
            "val_size": 48,
            "max_steps": args.steps,
            "eval_steps": 5,
            "logging_steps": 5,
            "per_device_train_batch_size": 8,
            "per_device_eval_batch_size": 48,
            "seed": 0,
        },
        "baseline": PARAMS,
        "pruner": "none",
        "budget": {"n_trials": 1},
        "resources": {"checkpoint_every": every, "max_retries": 1},
    }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    create_study(path, storage=url)
    study = optuna.load_study(study_name=name, storage=url)
    tuner = str(Path(sys.executable).with_name("tuner"))
    run = subprocess.Popen(
        [tuner, "study", "run", name, "--storage", url, "--jobs", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    killed_at = None
    while killed_at is None:
        for trial in study.get_trials(states=(TrialState.RUNNING,)):
            if args.kill_at in trial.intermediate_values:
                os.kill(trial.user_attrs["worker_pid"], signal.SIGKILL)
                killed_at = max(study.trials[trial.number].intermediate_values)
        if run.poll() is not None:
            raise SystemExit(f"the run ended before the kill: {run.stderr.read()}")
        time.sleep(0.05)
    _, stderr = run.communicate(timeout=600)
    if run.returncode != 0:
        raise SystemExit(stderr)
    (retry,) = [t for t in study.get_trials() if t.system_attrs.get("failed_trial") is not None]
    resumed = retry.user_attrs.get("resumed_from_step", 0)
    return {
        "checkpoint_every": every,
        "killed_at_step": killed_at,
        "resumed_from_step": resumed,
        "steps_redone": killed_at - resumed,
        "retry_s": (retry.datetime_complete - retry.datetime_start).total_seconds(),
        "value": retry.value,
    }


if __name__ == "__main__":
    main()
