"""What a free GPU waits for as a study grows: hand-out and tell latency, tuner beside plain Optuna.

    python tests/benchmarks/store_scale.py          # 1k and 10k trials x 8 and 32 workers
    python tests/benchmarks/store_scale.py --sizes 1000 --workers 8 --stores sqlite  # a quick look

For each store (PostgreSQL from TUNER_STORAGE or the local server; SQLite) and study size, a study
is filled once with that many finished trials of the simulated space (TPE, median pruning; 3
params, a validation curve each) and copied for every run, so each run starts from the same study.
Then P worker processes run trials of `--steps` x `--step-seconds` (a GPU busy training; default
8 x 2 s, pruned from step 5: 10-16 s, so that 32 workers ask for up to 3 trials a second,
a hundred times what 32 GPUs training real models ask) against it, in two systems:

- optuna: each worker is plain Optuna, `study.optimize(n_trials=1)` in a loop, sampling for itself;
- tuner: each worker is tuner's (`open_study` with heartbeats, `FedSampler`), and the driver keeps
  a `TrialFeed`: one asking process with an in-memory view, sampling ahead (tuner/backends/feed.py).

Hand-out = from a worker becoming free (its last `optimize` returned) to its next trial's first
training step (ask, stale-trial check, sampling, params stored). Tell = from the last step to
`optimize` returning (value, state, the sampler's and Optuna's bookkeeping). Each worker loads the
study before the timed part (a long-lived worker has); that first load is reported apart, as
`first_s`. Connections: the peak of open store connections while the run goes (PostgreSQL:
pg_stat_activity; SQLite: open handles on the file). Ratios are tuner/optuna in the same run.
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing as mp
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import optuna
import sqlalchemy

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

SPACE = {
    "name": "scale",
    "params": {
        "learning_rate": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True},
        "lora_rank": {"type": "categorical", "choices": [4, 8, 16, 32, 64]},
        "lora_dropout": {"type": "float", "low": 0.0, "high": 0.1},
    },
    "fixed": {"workload": "simulated", "steps": 8, "step_seconds": 2.0},
    "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 10},
    "pruner": {"name": "median", "n_startup_trials": 5, "n_warmup_steps": 4},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--workers", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--stores", nargs="+", default=["postgresql", "sqlite"])
    parser.add_argument("--systems", nargs="+", default=["optuna", "tuner"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--step-seconds", type=float, default=2.0)
    parser.add_argument("--trials-per-worker", type=int, default=None, help="default: 64/P, >= 4")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    admin = os.environ.get("TUNER_STORAGE") or "postgresql+psycopg2://postgres@127.0.0.1/postgres"
    work = Path(tempfile.mkdtemp(prefix="tuner-scale-"))
    rows = []
    try:
        for store in args.stores:
            for size in args.sizes:
                started = time.perf_counter()
                template = _template(store, size, admin, work)
                print(f"# {store}: {size} finished trials in {time.perf_counter() - started:.0f} s")
                for workers in args.workers:
                    per_worker = args.trials_per_worker or max(4, 64 // workers)
                    for system in args.systems:
                        url = _copy(store, template, admin, work)
                        row = run(system, url, workers, per_worker, args.steps, args.step_seconds)
                        row.update(store=store, size=size, workers=workers)
                        rows.append(row)
                        _print_row(row)
                        _drop(store, url, admin)
                _drop(store, template, admin)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _print_ratios(rows)
    print(json.dumps({"store_scale": rows}))


# ----------------------------------------------------------------------------- one run


def run(system: str, url: str, workers: int, per_worker: int, steps: int, step_s: float) -> dict:
    from tuner.backends.base import RunPlan
    from tuner.backends.feed import TrialFeed

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    gate = ctx.Barrier(workers + 1)
    fed, feed = None, None
    if system == "tuner":
        plan = RunPlan("scale", url, workers * per_worker, None, workers)
        depth = plan.feed_depth(workers)
        fed = ctx.Queue(maxsize=workers)
        feed = TrialFeed(plan, fed, first=workers, depth=depth).start()
    procs = [
        ctx.Process(
            target=_worker,
            args=(system, url, index, per_worker, steps, step_s, fed, gate, results),
        )
        for index in range(workers)
    ]
    for p in procs:
        p.start()
    if feed is not None:
        while fed.qsize() < workers:  # the driver's view is loaded while the workers start
            time.sleep(0.1)
    watch = _Connections(url, [p.pid for p in procs])
    gate.wait()
    started = time.perf_counter()
    watch.start()
    samples = [results.get() for _ in procs]
    wall = time.perf_counter() - started
    watch.stop()
    for p in procs:
        p.join()
    if feed is not None:
        feed.stop()
        fed.cancel_join_thread()
    handout = [s for w in samples for s in w["handout"]]
    tell = [s for w in samples for s in w["tell"]]
    return {
        "system": system,
        "trials": len(handout),
        "fed": sum(w["fed"] for w in samples),
        "wall_s": round(wall, 1),
        "handout_p50_s": _q(handout, 0.5),
        "handout_p95_s": _q(handout, 0.95),
        "tell_p50_s": _q(tell, 0.5),
        "tell_p95_s": _q(tell, 0.95),
        "first_s": _q([w["first"] for w in samples], 0.5),
        "connections_peak": watch.peak,
    }


def _worker(
    system: str,
    url: str,
    index: int,
    n: int,
    steps: int,
    step_s: float,
    fed: object,
    gate: object,
    results: object,
) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if system == "tuner":
        from tuner.backends.feed import FedSampler, take
        from tuner.store import open_study

        study = open_study("scale", url, heartbeat=True, seed_offset=7919 * index).study
        sampler = study.sampler = FedSampler(study.sampler)
    else:
        sampler = optuna.samplers.TPESampler(seed=7919 * index, n_startup_trials=10)
        pruner = optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=4)
        study = optuna.load_study(study_name="scale", storage=url, sampler=sampler, pruner=pruner)
    started = time.perf_counter()
    study.get_trials(deepcopy=False)  # what a long-lived worker already holds
    first = time.perf_counter() - started
    handout: list[float] = []
    tell: list[float] = []
    fed_trials = 0
    gate.wait()

    def objective(trial: optuna.Trial) -> float:
        trial.suggest_float("learning_rate", 1e-5, 1e-1, log=True)
        trial.suggest_categorical("lora_rank", [4, 8, 16, 32, 64])
        trial.suggest_float("lora_dropout", 0.0, 0.1)
        handout.append(time.perf_counter() - free)
        nonlocal fed_trials
        fed_trials += system == "tuner" and sampler.feeding
        loss = 4.0
        for step in range(1, steps + 1):
            time.sleep(step_s)
            loss = _curve(trial.params, step)
            trial.report(loss, step)
            if trial.should_prune():
                break
        nonlocal done
        done = time.perf_counter()
        if trial.should_prune():
            raise optuna.TrialPruned()
        return loss

    for _ in range(n):
        free = time.perf_counter()
        done = 0.0
        if system == "tuner" and sampler.wants():
            sampler.offer(take(fed))
        study.optimize(objective, n_trials=1)
        tell.append(time.perf_counter() - done)
    results.put({"handout": handout, "tell": tell, "first": first, "fed": fed_trials})


def _curve(params: dict, step: int) -> float:
    lr_term = (math.log10(params["learning_rate"]) + 3) ** 2
    rank_term = (math.log2(params["lora_rank"]) - 4) ** 2 / 8
    floor = 1.0 + 0.5 * lr_term + 0.3 * rank_term + abs(params["lora_dropout"] - 0.05)
    return floor + (4.0 - floor) * math.exp(-step / 3)


class _Connections(threading.Thread):
    """The peak number of store connections, sampled every 0.2 s."""

    def __init__(self, url: str, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.url, self.pids, self.peak = url, pids + [os.getpid()], 0
        self.done = threading.Event()
        # One watching connection, to the server's `postgres` database: not counted itself.
        self.engine = None
        if not url.startswith("sqlite"):
            self.engine = sqlalchemy.create_engine(url.rsplit("/", 1)[0] + "/postgres")

    def run(self) -> None:
        while not self.done.wait(0.2):
            self.peak = max(self.peak, self._count())

    def stop(self) -> None:
        self.done.set()
        self.join()
        if self.engine is not None:
            self.engine.dispose()

    def _count(self) -> int:
        if self.url.startswith("sqlite"):
            path = os.path.realpath(self.url.split("///", 1)[1])
            count = 0
            for pid in self.pids:
                try:
                    fds = os.listdir(f"/proc/{pid}/fd")
                except FileNotFoundError:
                    continue
                for fd in fds:
                    with contextlib.suppress(OSError):  # closed since listed
                        count += os.readlink(f"/proc/{pid}/fd/{fd}") == path
            return count
        with self.engine.connect() as conn:
            return conn.execute(
                sqlalchemy.text("select count(*) from pg_stat_activity where datname = :d"),
                {"d": self.url.rsplit("/", 1)[1]},
            ).scalar()


# ----------------------------------------------------------------------------- studies


def _template(store: str, size: int, admin: str, work: Path) -> str:
    """A study of `size` finished trials, as a sweep leaves them: 3 in 4 pruned midway."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.trial import TrialState, create_trial

    from tuner.core.study import create_study

    url = _new_store(store, admin, work)
    space_file = work / "scale.yaml"
    space_file.write_text(json.dumps(SPACE))  # JSON is YAML
    create_study(space_file, storage=url)
    study = optuna.load_study(study_name="scale", storage=url)
    rng = random.Random(0)
    dists = {
        "learning_rate": FloatDistribution(1e-5, 1e-1, log=True),
        "lora_rank": CategoricalDistribution([4, 8, 16, 32, 64]),
        "lora_dropout": FloatDistribution(0.0, 0.1),
    }
    trials = []
    for _ in range(size):
        params = {
            "learning_rate": 10 ** rng.uniform(-5, -1),
            "lora_rank": rng.choice([4, 8, 16, 32, 64]),
            "lora_dropout": rng.uniform(0.0, 0.1),
        }
        pruned = rng.random() < 0.75
        last = rng.randint(2, 7) if pruned else 8
        curve = {step: _curve(params, step) for step in range(1, last + 1)}
        trials.append(
            create_trial(
                state=TrialState.PRUNED if pruned else TrialState.COMPLETE,
                value=curve[last],
                params=params,
                distributions=dists,
                intermediate_values=curve,
            )
        )
    study.add_trials(trials)
    return url


def _new_store(store: str, admin: str, work: Path) -> str:
    name = f"tuner_scale_{uuid.uuid4().hex[:10]}"
    if store == "sqlite":
        return f"sqlite:///{work / name}.db"
    _admin_sql(admin, f'CREATE DATABASE "{name}"')
    return admin.rsplit("/", 1)[0] + f"/{name}"


def _copy(store: str, template: str, admin: str, work: Path) -> str:
    """A copy of the template study (PostgreSQL: CREATE DATABASE ... TEMPLATE; SQLite: the file)."""
    name = f"tuner_scale_{uuid.uuid4().hex[:10]}"
    if store == "sqlite":
        shutil.copy(template.split("///", 1)[1], work / f"{name}.db")
        return f"sqlite:///{work / name}.db"
    source = template.rsplit("/", 1)[1]
    # A template must have no sessions: this process's engines still hold some.
    _admin_sql(
        admin,
        "select pg_terminate_backend(pid) from pg_stat_activity "
        f"where datname = '{source}' and pid <> pg_backend_pid()",
    )
    _admin_sql(admin, f'CREATE DATABASE "{name}" TEMPLATE "{source}"')
    return admin.rsplit("/", 1)[0] + f"/{name}"


def _drop(store: str, url: str, admin: str) -> None:
    if store == "sqlite":
        Path(url.split("///", 1)[1]).unlink(missing_ok=True)
        return
    _admin_sql(admin, f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')


def _admin_sql(admin: str, sql: str) -> None:
    engine = sqlalchemy.create_engine(admin, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text(sql))
    finally:
        engine.dispose()


# ----------------------------------------------------------------------------- printing


def _q(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)], 4)


def _print_row(row: dict) -> None:
    print(
        f"{row['store']:10} {row['size']:>6} trials {row['workers']:>3} workers "
        f"{row['system']:6}  hand-out p50 {row['handout_p50_s']:.3f} s p95 "
        f"{row['handout_p95_s']:.3f} s | tell p50 {row['tell_p50_s']:.3f} s p95 "
        f"{row['tell_p95_s']:.3f} s | first load {row['first_s']:.2f} s | "
        f"connections {row['connections_peak']} | {row['fed']}/{row['trials']} fed | "
        f"{row['wall_s']} s",
        flush=True,
    )


def _print_ratios(rows: list[dict]) -> None:
    print("\nhand-out p95, optuna / tuner (same store, size and workers; higher is better):")
    for row in rows:
        if row["system"] != "tuner":
            continue
        (base,) = [
            r
            for r in rows
            if r["system"] == "optuna"
            and (r["store"], r["size"], r["workers"]) == (row["store"], row["size"], row["workers"])
        ] or [None]
        if base is None:
            continue
        ratio = base["handout_p95_s"] / max(row["handout_p95_s"], 1e-6)
        tell = base["tell_p95_s"] / max(row["tell_p95_s"], 1e-6)
        print(
            f"  {row['store']:10} {row['size']:>6} x {row['workers']:>2}: hand-out {ratio:6.1f}x"
            f"  tell {tell:5.1f}x  (p50 hand-out "
            f"{base['handout_p50_s'] / max(row['handout_p50_s'], 1e-6):.1f}x)"
        )


if __name__ == "__main__":
    main()
