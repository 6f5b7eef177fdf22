"""GPU occupancy of the standard simulated sweep, side by side in one run.

    python tests/benchmarks/occupancy.py --gpus 8 --trials 64

Starts its own Ray (logical GPUs, token auth) and uses PostgreSQL from TUNER_STORAGE or the local
server (a fresh database per system). The sweep: 64 trials of 10 steps x 0.3 s of the simulated
workload, TPE, median pruning. Three systems on the same machine and store:

- tuner: `run_study(backend="ray")`, one actor per GPU running trials back to back;
- optuna: 8 plain processes sharing the RDB storage, each `study.optimize` (TPE + median pruner);
- ray_tune: Ray Tune with OptunaSearch on the same storage and Tune's median stopping rule
  (Optuna's pruners do not run under Tune), 1 GPU per trial, 8 at once.

Occupancy = sum of trial busy time / (GPUs x wall time); idle GPU-seconds per trial =
(GPUs x wall - busy) / trials. Wall time counts start-up (workers, actors) too: it is what a GPU
owner pays. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import sqlalchemy

RAY = str(Path(sys.executable).with_name("ray"))
PARAMS = {
    "learning_rate": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True},
    "lora_rank": {"type": "categorical", "choices": [4, 8, 16, 32, 64]},
    "lora_dropout": {"type": "float", "low": 0.0, "high": 0.1},
}
PRUNER = {"n_startup_trials": 5, "n_warmup_steps": 3, "interval_steps": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--trials", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--step-seconds", type=float, default=0.3)
    parser.add_argument("--only", nargs="*", default=["tuner", "optuna", "ray_tune"])
    args = parser.parse_args()

    admin = os.environ.get("TUNER_STORAGE") or "postgresql+psycopg2://postgres@127.0.0.1/postgres"
    address = _start_ray(args.gpus)
    results = {}
    try:
        for system in args.only:
            url = _fresh_database(admin)
            runner = {"tuner": run_tuner, "optuna": run_optuna, "ray_tune": run_ray_tune}[system]
            wall, busy, finished = runner(args, url, address)
            results[system] = _figures(args.gpus, wall, busy, finished)
            print(
                f"{system:9} wall {wall:6.1f} s  occupancy {results[system]['occupancy']:.3f}  "
                f"idle GPU-s/trial {results[system]['idle_gpu_s_per_trial']:.2f}  "
                f"trials {finished}",
                flush=True,
            )
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True)
    _print_table(results)
    print(json.dumps(results))


def _figures(gpus: int, wall: float, busy: float, trials: int) -> dict:
    return {
        "occupancy": busy / (gpus * wall),
        "wall_s": wall,
        "idle_gpu_s_per_trial": (gpus * wall - busy) / max(trials, 1),
        "trials": trials,
    }


def _print_table(results: dict) -> None:
    print()
    print(f"{'system':10} {'wall s':>8} {'occupancy':>10} {'idle GPU-s/trial':>17} {'trials':>7}")
    best = max(r["occupancy"] for r in results.values())
    for system, r in results.items():
        mark = "  <- highest" if r["occupancy"] == best else ""
        print(
            f"{system:10} {r['wall_s']:8.1f} {r['occupancy']:10.3f} "
            f"{r['idle_gpu_s_per_trial']:17.2f} {r['trials']:7d}{mark}"
        )
    if "tuner" in results:
        for other in results:
            if other != "tuner":
                ratio = results["tuner"]["occupancy"] / results[other]["occupancy"]
                print(f"tuner / {other}: {ratio:.2f}x occupancy")


# ----------------------------------------------------------------------------- the systems


def run_tuner(args, url: str, address: str) -> tuple[float, float, int]:  # noqa: ANN001
    import yaml

    from tuner.study import create_study, open_study, run_study

    space = {
        "name": "occupancy",
        "params": PARAMS,
        "fixed": {"workload": "simulated", "steps": args.steps, "step_seconds": args.step_seconds},
        "sampler": {"name": "tpe", "seed": 0},
        "pruner": {"name": "median", **PRUNER},
        "resources": {"gpus_per_trial": 1, "cpus_per_trial": 1},
    }
    path = Path(tempfile.mkdtemp()) / "occupancy.yaml"
    path.write_text(yaml.safe_dump(space))
    name = create_study(path, storage=url)
    started = time.time()
    run_study(name, storage=url, n_trials=args.trials, backend="ray", address=address)
    ended = time.time()
    study = open_study(name, url).study
    _print_timeline(study, started, ended)
    return ended - started, *_busy(study)


def _print_timeline(study, started: float, ended: float) -> None:  # noqa: ANN001
    """Where a GPU idles: before its first trial, between trials, after its last."""
    by_worker: dict[str, list] = {}
    for t in study.get_trials():
        by_worker.setdefault(t.user_attrs.get("worker", "?"), []).append(t)
    first, gaps, last = [], [], []
    for trials in by_worker.values():
        trials.sort(key=lambda t: t.datetime_start)
        first.append(trials[0].datetime_start.timestamp() - started)
        last.append(ended - trials[-1].datetime_complete.timestamp())
        gaps += [
            b.datetime_start.timestamp() - a.datetime_complete.timestamp()
            for a, b in itertools.pairwise(trials)
        ]
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    print(
        f"  tuner idle: before first trial {mean(first):.2f} s (max {max(first):.2f}), "
        f"between trials {mean(gaps):.3f} s x {len(gaps)}, after last {mean(last):.2f} s"
    )


def run_optuna(args, url: str, address: str) -> tuple[float, float, int]:  # noqa: ANN001
    import optuna

    name = "occupancy"
    optuna.create_study(study_name=name, storage=url)
    per_process = [
        args.trials // args.gpus + (i < args.trials % args.gpus) for i in range(args.gpus)
    ]
    ctx = mp.get_context("spawn")
    started = time.perf_counter()
    workers = [
        ctx.Process(target=_optuna_worker, args=(url, name, n, i, args.steps, args.step_seconds))
        for i, n in enumerate(per_process)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - started
    return wall, *_busy(optuna.load_study(study_name=name, storage=url))


def _optuna_worker(url: str, name: str, n: int, seed: int, steps: int, step_s: float) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(
        study_name=name,
        storage=url,
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.MedianPruner(**PRUNER),
    )

    def objective(trial: optuna.Trial) -> float:
        from trials import simulated
        from trials.config import TrialConfig

        config = TrialConfig(
            workload="simulated",
            steps=steps,
            step_seconds=step_s,
            learning_rate=trial.suggest_float("learning_rate", 1e-5, 1e-1, log=True),
            lora_rank=trial.suggest_categorical("lora_rank", [4, 8, 16, 32, 64]),
            lora_dropout=trial.suggest_float("lora_dropout", 0.0, 0.1),
        )
        return simulated.run(config, trial=trial).eval_loss

    study.optimize(objective, n_trials=n)


def run_ray_tune(args, url: str, address: str) -> tuple[float, float, int]:  # noqa: ANN001
    import optuna
    import ray
    from ray import tune
    from ray.tune.schedulers import MedianStoppingRule
    from ray.tune.search.optuna import OptunaSearch

    started = time.perf_counter()  # connecting is part of the sweep, as for tuner
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    space = {
        "learning_rate": optuna.distributions.FloatDistribution(1e-5, 1e-1, log=True),
        "lora_rank": optuna.distributions.CategoricalDistribution([4, 8, 16, 32, 64]),
        "lora_dropout": optuna.distributions.FloatDistribution(0.0, 0.1),
    }
    search = OptunaSearch(
        space,
        metric="eval_loss",
        mode="min",
        study_name="occupancy",
        storage=optuna.storages.RDBStorage(url),
        sampler=optuna.samplers.TPESampler(seed=0),
    )
    steps, step_s = args.steps, args.step_seconds

    def trainable(config: dict) -> None:
        import random

        from trials import simulated
        from trials.config import TrialConfig

        cfg = TrialConfig(workload="simulated", steps=steps, step_seconds=step_s, **config)
        rng = random.Random(str(config))
        for step in range(1, steps + 1):
            time.sleep(step_s)
            tune.report({"eval_loss": simulated.loss_at(cfg, step, rng)})

    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1, "gpu": 1}),
        tune_config=tune.TuneConfig(
            search_alg=search,
            num_samples=args.trials,
            max_concurrent_trials=args.gpus,
            scheduler=MedianStoppingRule(
                time_attr="training_iteration",
                metric="eval_loss",
                mode="min",
                grace_period=PRUNER["n_warmup_steps"],
                min_samples_required=PRUNER["n_startup_trials"],
            ),
        ),
        run_config=tune.RunConfig(storage_path=tempfile.mkdtemp(), verbose=0),
    )
    results = tuner.fit()
    wall = time.perf_counter() - started
    busy = sum(r.metrics.get("time_total_s", 0.0) for r in results if r.metrics)
    ray.shutdown()
    return wall, busy, len(results)


# ----------------------------------------------------------------------------- helpers


def _busy(study) -> tuple[float, int]:  # noqa: ANN001
    from optuna.trial import TrialState

    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
    return sum(t.duration.total_seconds() for t in finished), len(finished)


def _fresh_database(admin_url: str) -> str:
    name = f"tuner_bench_{uuid.uuid4().hex[:8]}"
    engine = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


def _start_ray(gpus: int) -> str:
    os.environ["RAY_AUTH_MODE"] = "token"
    subprocess.run([RAY, "get-auth-token", "--generate"], check=True, capture_output=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run(
        [
            RAY,
            "start",
            "--head",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            f"--num-gpus={gpus}",
            f"--num-cpus={gpus}",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir=/tmp/ray-bench-{os.getpid()}",
        ],
        check=True,
        capture_output=True,
    )
    return f"127.0.0.1:{port}"


if __name__ == "__main__":
    main()
