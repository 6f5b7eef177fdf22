"""How fast the read-only commands answer, beside Optuna's own CLI on the same store.

    python tests/benchmarks/startup.py [--runs 10] [--workdir DIR]

For each of `tuner --help`, `spaces`, `study list`, `study show NAME` and `study best NAME`:
the median wall time of `--runs` runs of the installed `tuner` command (a fresh process each
time, as a user types it), beside the median of `optuna studies --storage sqlite:///SAME.db`
on the same store, and their ratio. Goal: under 1 s each on an idle 2-core machine. A busy
machine slows both: the load average is printed with the figures, and so is the median CPU time
(user + system) of each command, which the load moves less than the wall time. Ends with one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = {
    "tuner --help": ["--help"],
    "tuner spaces": ["spaces"],
    "tuner study list": ["study", "list"],
    "tuner study show NAME": ["study", "show", "simulated"],
    "tuner study best NAME": ["study", "best", "simulated"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tuner-startup-"))
    workdir.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{workdir / 'tuner.db'}"
    _make_store(url)
    env = {**os.environ, "TUNER_STORAGE": url}

    optuna_cmd = [*_script("optuna"), "studies", "--storage", url]
    optuna_s, optuna_cpu = _median(optuna_cmd, runs=args.runs, cwd=workdir, env=env)
    rows = []
    for label, argv in COMMANDS.items():
        wall, cpu = _median([*_script("tuner"), *argv], runs=args.runs, cwd=workdir, env=env)
        rows.append({"command": label, "tuner_s": wall, "cpu_s": cpu, "ratio": wall / optuna_s})

    load = os.getloadavg()
    print(f"median of {args.runs} runs; {os.cpu_count()} cores, load average {load[0]:.2f}")
    header = ("command", "tuner", "(cpu)", "optuna studies", "(cpu)", "ratio")
    print("{:<24} {:>8} {:>7} {:>15} {:>7} {:>6}".format(*header))
    for row in rows:
        print(
            f"{row['command']:<24} {row['tuner_s']:>7.2f}s {row['cpu_s']:>6.2f}s "
            f"{optuna_s:>14.2f}s {optuna_cpu:>6.2f}s {row['ratio']:>6.2f}"
        )
    summary = {"runs": args.runs, "load_average": load[0], "optuna_studies_s": optuna_s}
    print(json.dumps({**summary, "optuna_studies_cpu_s": optuna_cpu, "rows": rows}))


def _make_store(url: str) -> None:
    """A store with one tuner study and one finished trial, made once (not timed)."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    import optuna

    from tuner.core.study import create_study

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if "simulated" in optuna.get_all_study_names(url):
        return
    create_study("simulated.yaml", storage=url)
    study = optuna.load_study(study_name="simulated", storage=url)
    lr = optuna.distributions.FloatDistribution(1e-5, 1e-1, log=True)
    study.tell(study.ask({"learning_rate": lr}), 1.0)


def _script(name: str) -> list[str]:
    """The installed command beside this Python (as a user runs it), else `python -m`."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    return [found] if found else [sys.executable, "-m", name]


def _median(cmd: list[str], *, runs: int, cwd: Path, env: dict) -> tuple[float, float]:
    """The median wall time and CPU time (user + system) of `runs` runs of `cmd`."""
    walls, cpus = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
        walls.append(time.perf_counter() - started)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        if done.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return statistics.median(walls), statistics.median(cpus)


if __name__ == "__main__":
    main()
