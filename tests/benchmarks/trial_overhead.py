"""How much of a trial is spent outside training, on the quickstart sweep.

    python tests/benchmarks/trial_overhead.py [--trials 16] [--jobs 2] [--workdir DIR]

Per trial: its wall time in the store (Optuna's start to finish) against the time the Trainer
spent training and evaluating; the rest is overhead: model load, tokenisation, trainer setup,
store round trips (suggest, reports, user attrs, artifact upload, ask/tell). Side by side in the
same run: the first trial of each worker (cold: it tokenises the data) against the later ones
(warm: tokenised data reused). Goal: overhead under 10 % of a trial. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None, help="reuses a demo/ found there")
    args = parser.parse_args()

    import logging

    logging.basicConfig(level=logging.WARNING)
    from optuna.trial import TrialState

    from tuner.core.demo import prepare_demo
    from tuner.core.study import create_study, run_study
    from tuner.store import open_study

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tuner-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    import os

    os.chdir(workdir)
    prepare_demo(Path("demo"))
    url = f"sqlite:///{workdir / f'bench-{int(time.time())}.db'}"
    name = create_study("quickstart.yaml", storage=url)
    started = time.perf_counter()
    run_study(name, storage=url, n_trials=args.trials, jobs=args.jobs)
    wall = time.perf_counter() - started

    trials = open_study(name, url).study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    rows = [_row(t) for t in trials]
    _print_table(rows)
    summary = _summary(rows, wall=wall, jobs=args.jobs)
    _print_summary(summary)
    print(json.dumps(summary))


def _row(trial) -> dict:  # noqa: ANN001
    timings = trial.user_attrs.get("timings", {})
    total = trial.duration.total_seconds()
    training = timings.get("train_s", 0.0) - timings.get("store_s", 0.0)
    return {
        "trial": trial.number,
        "state": trial.state.name.lower(),
        "total_s": total,
        "training_s": training,
        "load_s": timings.get("load_s", 0.0),
        "data_s": timings.get("data_s", 0.0),
        "setup_s": timings.get("setup_s", 0.0),
        "store_s": timings.get("store_s", 0.0) + timings.get("upload_s", 0.0),
        "overhead": (total - training) / total,
        "cold": timings.get("data_s", 0.0) > 0.2,  # this worker tokenised the data here
    }


def _print_table(rows: list[dict]) -> None:
    head = f"{'trial':>5} {'state':9} {'total s':>8} {'train s':>8} {'load':>6} {'data':>6} "
    head += f"{'setup':>6} {'store':>6} {'other':>6} {'overhead':>9}"
    print(head)
    for r in rows:
        other = r["total_s"] - r["training_s"] - r["load_s"] - r["data_s"] - r["setup_s"]
        other -= r["store_s"]
        print(
            f"{r['trial']:>5} {r['state']:9} {r['total_s']:8.2f} {r['training_s']:8.2f} "
            f"{r['load_s']:6.2f} {r['data_s']:6.2f} {r['setup_s']:6.2f} {r['store_s']:6.2f} "
            f"{other:6.2f} {100 * r['overhead']:8.1f}%" + ("  cold" if r["cold"] else "")
        )


def _summary(rows: list[dict], *, wall: float, jobs: int) -> dict:
    def share(subset: list[dict]) -> float | None:
        total = sum(r["total_s"] for r in subset)
        return (total - sum(r["training_s"] for r in subset)) / total if total else None

    cold = [r for r in rows if r["cold"]]
    warm = [r for r in rows if not r["cold"]]

    def startup(subset: list[dict]) -> float | None:  # trial start to its first training step
        return (
            statistics.mean(r["load_s"] + r["data_s"] + r["setup_s"] for r in subset)
            if (subset)
            else None
        )

    complete = [r for r in rows if r["state"] == "complete"]
    busy = sum(r["total_s"] for r in rows)
    return {
        "trials": len(rows),
        "jobs": jobs,
        "overhead_share": share(rows),
        "overhead_share_complete": share(complete),
        "overhead_share_cold": share(cold),
        "overhead_share_warm": share(warm),
        "overhead_median_per_trial": statistics.median(r["overhead"] for r in rows),
        "overhead_max_per_trial": max(r["overhead"] for r in rows),
        "startup_cold_s": startup(cold),
        "startup_warm_s": startup(warm),
        "worker_busy_share": busy / (jobs * wall),  # time in trials vs workers' wall time
        "wall_s": wall,
    }


def _print_summary(s: dict) -> None:
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    print()
    print(f"overhead, all {s['trials']} trials (time-weighted): {pct(s['overhead_share'])}")
    print(f"  completed trials only:                  {pct(s['overhead_share_complete'])}")
    print(f"  cold (first trial of a worker):         {pct(s['overhead_share_cold'])}")
    print(f"  warm (data already tokenised):          {pct(s['overhead_share_warm'])}")
    print(
        f"  per trial: median {pct(s['overhead_median_per_trial'])}, "
        f"max {pct(s['overhead_max_per_trial'])}"
    )
    if s["startup_cold_s"] and s["startup_warm_s"] is not None:
        ratio = pct(s["startup_warm_s"] / s["startup_cold_s"])
        print(
            f"start-up to the first step: cold {s['startup_cold_s']:.2f} s, "
            f"warm {s['startup_warm_s']:.2f} s ({ratio} of cold)"
        )
    print(
        f"workers busy in trials: {pct(s['worker_busy_share'])} of {s['jobs']} x "
        f"{s['wall_s']:.0f} s (the rest: process start-up and imports)"
    )
    print(
        "goal: overhead under 10.0%",
        "MET" if s["overhead_share"] < 0.10 else "NOT MET",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
