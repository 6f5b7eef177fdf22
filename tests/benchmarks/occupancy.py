"""GPU occupancy of the standard simulated sweep, side by side in one run.

    python tests/benchmarks/occupancy.py --gpus 8 --trials 64

Starts its own Ray (logical GPUs, token auth) and uses PostgreSQL from TUNER_STORAGE or the local
server (a fresh database per system). The sweep: 64 trials of 10 steps x 0.3 s of the simulated
workload, TPE with Optuna's own defaults in every system (tuner's space names them: 10 random
trials first, each param apart), median pruning: what is pruned, and so how long trials hold
their GPU, then differs by the systems' scheduling, not by their sampler settings. Three systems
on the same machine and store:

- tuner: `run_study(backend="ray")`, one actor per GPU running trials back to back;
- tuner_local (`--only tuner_local ...`): `run_study(backend="local", jobs=GPUs)`, worker
  processes like Optuna's below, under the same driver: tuner without Ray's start-up;
- optuna: 8 plain processes sharing the RDB storage, each `study.optimize` (TPE + median pruner);
- ray_tune: Ray Tune with OptunaSearch on the same storage and Tune's median stopping rule
  (Optuna's pruners do not run under Tune), 1 GPU per trial, 8 at once.

Occupancy = sum of trial busy time / (GPUs x wall time); idle GPU-seconds per trial =
(GPUs x wall - busy) / trials. Wall time counts start-up (workers, actors) too: it is what a GPU
owner pays. Each system's idle GPU-seconds are split into before the first trials, between
trials and after the last; "Ray's own start-up" is what any system of one Ray actor per GPU pays
before its first trial: connecting, and as many actors that do nothing becoming ready. Ends with
one JSON line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import sqlalchemy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the Ray node helper
import ray_nodes  # noqa: E402

RAY = ray_nodes.RAY
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
    head, address = _start_ray(args.gpus)
    results = {}
    try:
        _print_ray_floor(args.gpus, address)
        for system in args.only:
            url = _fresh_database(admin)
            runner = {
                "tuner": run_tuner,
                "tuner_local": run_tuner_local,
                "optuna": run_optuna,
                "ray_tune": run_ray_tune,
            }[system]
            wall, busy, finished = runner(args, url, address)
            results[system] = _figures(args.gpus, wall, busy, finished)
            print(
                f"{system:9} wall {wall:6.1f} s  occupancy {results[system]['occupancy']:.3f}  "
                f"idle GPU-s/trial {results[system]['idle_gpu_s_per_trial']:.2f}  "
                f"trials {finished}",
                flush=True,
            )
    finally:
        head.stop()  # the Ray this benchmark started, and no other
    _print_table(results)
    print(json.dumps(results))


def _figures(gpus: int, wall: float, busy: float, trials: int) -> dict:
    return {
        "occupancy": busy / (gpus * wall),
        "wall_s": wall,
        "busy_gpu_s": busy,  # what the trials held: less when more of them are pruned
        "held_gpu_s": gpus * wall,  # what the sweep cost the GPUs' owner
        "idle_gpu_s_per_trial": (gpus * wall - busy) / max(trials, 1),
        "trials": trials,
    }


def _print_table(results: dict) -> None:
    print()
    print(
        f"{'system':12} {'wall s':>7} {'busy GPU-s':>11} {'held GPU-s':>11} {'occupancy':>10} "
        f"{'idle GPU-s/trial':>17} {'trials':>7}"
    )
    best = max(r["occupancy"] for r in results.values())
    for system, r in results.items():
        mark = "  <- highest occupancy" if r["occupancy"] == best else ""
        print(
            f"{system:12} {r['wall_s']:7.1f} {r['busy_gpu_s']:11.1f} {r['held_gpu_s']:11.1f} "
            f"{r['occupancy']:10.3f} {r['idle_gpu_s_per_trial']:17.2f} {r['trials']:7d}{mark}"
        )
    for ours in ("tuner", "tuner_local"):
        for other in results:
            if ours in results and not other.startswith("tuner"):
                r, o = results[ours], results[other]
                print(
                    f"{ours} / {other}: {r['occupancy'] / o['occupancy']:.2f}x occupancy, "
                    f"{r['idle_gpu_s_per_trial'] / o['idle_gpu_s_per_trial']:.2f}x idle GPU-s a "
                    f"trial, {r['held_gpu_s'] / o['held_gpu_s']:.2f}x GPU-s held"
                )


# ----------------------------------------------------------------------------- the systems


def run_tuner(args, url: str, address: str) -> tuple[float, float, int]:  # noqa: ANN001
    return _tuner("tuner", args, url, backend="ray", address=address)


def run_tuner_local(args, url: str, address: str) -> tuple[float, float, int]:  # noqa: ANN001
    return _tuner("tuner_local", args, url, backend="local", address=None)


def _tuner(system: str, args, url: str, *, backend: str, address: str | None) -> tuple:  # noqa: ANN001
    import yaml

    from tuner.core.study import create_study, run_study
    from tuner.store import open_study

    space = {
        "name": "occupancy",
        "params": PARAMS,
        "fixed": {"workload": "simulated", "steps": args.steps, "step_seconds": args.step_seconds},
        # Optuna's own TPE defaults, as the other systems use.
        "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 10, "multivariate": False},
        "pruner": {"name": "median", **PRUNER},
        "resources": {"gpus_per_trial": 1, "cpus_per_trial": 1},
    }
    path = Path(tempfile.mkdtemp()) / "occupancy.yaml"
    path.write_text(yaml.safe_dump(space))
    name = create_study(path, storage=url)
    started = time.time()
    run_study(
        name, storage=url, n_trials=args.trials, backend=backend, address=address, jobs=args.gpus
    )
    ended = time.time()
    study = open_study(name, url).study
    _print_timeline(system, study, args.gpus, started, ended)
    return ended - started, *_busy(study)


def _print_timeline(system: str, study, gpus: int, started: float, ended: float) -> None:  # noqa: ANN001
    """Where the GPUs idle: before the first trials (a GPU's first trial is one of the `gpus`
    earliest), after the last ones (the `gpus` latest ends), and between trials (the rest)."""
    from optuna.trial import TrialState

    trials = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
    starts = sorted(t.datetime_start.timestamp() for t in trials)[:gpus]
    ends = sorted(t.datetime_complete.timestamp() for t in trials)[-gpus:]
    busy = sum(t.duration.total_seconds() for t in trials)
    first = sum(s - started for s in starts)
    last = sum(ended - e for e in ends)
    between = gpus * (ended - started) - busy - first - last
    print(
        f"  {system} idle GPU-s: before the first trials {first:.1f} ({first / gpus:.2f} a GPU), "
        f"between trials {between:.1f} ({between / max(1, len(trials) - gpus):.3f} a trial), "
        f"after the last {last:.1f} ({last / gpus:.2f} a GPU)",
        flush=True,
    )


def run_optuna(args, url: str, address: str) -> tuple[float, float, int]:  # noqa: ANN001
    import optuna

    name = "occupancy"
    optuna.create_study(study_name=name, storage=url)
    per_process = [
        args.trials // args.gpus + (i < args.trials % args.gpus) for i in range(args.gpus)
    ]
    ctx = mp.get_context("spawn")
    started = time.time()
    workers = [
        ctx.Process(target=_optuna_worker, args=(url, name, n, i, args.steps, args.step_seconds))
        for i, n in enumerate(per_process)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    ended = time.time()
    study = optuna.load_study(study_name=name, storage=url)
    _print_timeline("optuna", study, args.gpus, started, ended)
    return ended - started, *_busy(study)


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


_FLOOR = """
import json, sys, time
import ray

started = time.perf_counter()
ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False)
connected = time.perf_counter() - started


@ray.remote(num_gpus=1, num_cpus=1)
class Empty:
    def ready(self):
        return True


actors = [Empty.remote() for _ in range(int(sys.argv[2]))]
pending, ready = [a.ready.remote() for a in actors], []
while pending:
    _, pending = ray.wait(pending, num_returns=1)
    ready.append(time.perf_counter() - started)
print(json.dumps({"connect_s": connected, "ready_s": ready}))
"""


def _print_ray_floor(gpus: int, address: str) -> None:
    """Ray's own start-up, in a process of its own (this one connects only for the systems)."""
    out = subprocess.run(
        [sys.executable, "-c", _FLOOR, address, str(gpus)], capture_output=True, text=True
    )
    floor = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"Ray's own start-up: connect {floor['connect_s']:.2f} s, {gpus} empty actors ready "
        f"after {sum(floor['ready_s']) / gpus:.2f} s on average: "
        f"{sum(floor['ready_s']):.1f} GPU-s before any trial",
        flush=True,
    )


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


def _start_ray(gpus: int) -> tuple[ray_nodes.RayNode, str]:
    os.environ["RAY_AUTH_MODE"] = "token"
    subprocess.run([RAY, "get-auth-token", "--generate"], check=True, capture_output=True)
    temp = Path(f"/tmp/ray-bench-{os.getpid()}")  # Ray's socket paths must stay short
    return ray_nodes.start_head(
        f"--num-gpus={gpus}",
        f"--num-cpus={gpus}",
        "--include-dashboard=false",
        env=dict(os.environ),
        temp_dir=temp,
        log=Path(tempfile.mkdtemp()) / "ray-head.log",
    )


if __name__ == "__main__":
    main()
