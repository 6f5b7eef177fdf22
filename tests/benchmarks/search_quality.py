"""Does a sweep beat the hand-picked defaults and random search, and what does pruning save?

    python tests/benchmarks/search_quality.py --out docs/search-quality  # both, 5 seeds × 40 trials
    python tests/benchmarks/search_quality.py --workload simulated --seeds 10 --trials 60
    python tests/benchmarks/search_quality.py --resume      # keep the sweeps OUT/runs.jsonl holds
    python tests/benchmarks/search_quality.py --sampler-grid --resume     # TPE settings, unpruned
    python tests/benchmarks/search_quality.py --workload lora --eval-steps 15 --strategies tpe

The first takes about 50 minutes on 2 cores (the LoRA sweeps; the simulated ones take seconds).

Two workloads, each with every strategy on the same seeds and trial budget, side by side in one
run:

- `lora`: the quickstart's real LoRA fine-tune (`search_spaces/quickstart.yaml`: a tiny local
  Llama learns word games, 60 training steps, a validation loss every 5), trained by the
  objective `tuner study run` uses, on in-memory studies, `--jobs` sweeps at a time;
- `simulated`: `search_spaces/simulated.yaml`'s synthetic curves, evaluated without their sleeps.

Strategies: the space's baseline alone (the hand-picked defaults: learning rate 5e-5, rank 16,
alpha 32, dropout 0.05, ...); random search, no pruning; TPE as tuner builds it by default, no
pruning; TPE with the default pruner (median); TPE with Optuna's Hyperband and with successive
halving. The seed is the sampler's; a trial's training seed stays the space's, so a
configuration trains the same way whichever strategy proposed it.

Printed for each: the best validation loss (mean and spread over seeds) and its margin over the
baseline, the trial at which it beat the baseline, the trials it needed to reach random search's
final best of the same seed, the training steps and the seconds spent, and the share of steps
saved against a full run of every trial. Then the pruner settings replayed on the unpruned
sweeps' real curves (what each would have saved, and whether it would have kept the best
trial), which is what tuner's default pruner settings are chosen from. Writes report.txt,
search_quality.json and search_quality.png (best-so-far against training steps) to `--out`, and
ends with one JSON line.

`--sampler-grid` runs, instead of the strategies, TPE with 5 or 10 random trials first,
multivariate or independent, unpruned, beside random search (sampler_grid_WORKLOAD_TRIALS.txt):
what tuner's TPE defaults are chosen from. `--eval-steps N` evaluates the LoRA workload every N
training steps instead of the quickstart's 5 (docs/search-quality/report.txt was measured with
15, the quickstart's cadence then: `make quality` passes it).

Two strategies run only when `--strategies` names them: Optuna's GP sampler with the default
pruner, and the default pruner first deciding at the third evaluation. `--parallel` with
`--lookahead N` sets the space's `resources.lookahead` (how many suggestions the driver keeps
ready; 0: each worker samples for itself).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import redirect_stdout
from dataclasses import asdict, dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from trials import simulated  # noqa: E402
from tuner.search import algorithms  # noqa: E402
from tuner.space import Space, load_space, parse_space, read_yaml  # noqa: E402

# simulated.yaml names no baseline (its tests count its trials); these are the blog-post values.
SIMULATED_BASELINE = {"learning_rate": 5e-5, "lora_rank": 16, "lora_dropout": 0.05}


@dataclass
class Ran:
    """One trial of a sweep, as the benchmark counts it."""

    params: dict[str, Any]
    value: float | None  # None: pruned or failed (it does not count as a result)
    steps: int  # training steps it ran
    state: str  # COMPLETE, PRUNED or FAIL
    curve: dict[int, float] = field(default_factory=dict)  # reported step → validation loss
    seconds: float = 0.0

    @property
    def pruned(self) -> bool:
        return self.state == "PRUNED"


@dataclass
class Workload:
    name: str
    space: Space
    baseline: dict[str, Any]
    report_steps: list[int]  # the steps a trial reports at; the last is the end of training
    # (space, sampler, pruner, seed, n) → the sweep's trials; None: run by LoraRunner
    run: Callable[[Space, dict, dict, int, int], list[Ran]] | None

    @property
    def steps(self) -> int:
        return self.report_steps[-1]


# Strategies run only when `--strategies` names them.
ON_REQUEST = {"gp+reported_median", "tpe+reported_median warm-up 2 evaluations"}


def strategies(workload: Workload) -> dict[str, tuple[dict, dict]]:
    """name → (sampler spec, pruner spec), as a space would write them."""
    first, last = workload.report_steps[0], workload.steps
    last_eval = len(workload.report_steps) - 1
    return {
        "random": ({"name": "random"}, {"name": "none"}),
        "tpe": (algorithms.DEFAULT_SAMPLER, {"name": "none"}),
        # The space's own pruner, and Optuna's MedianPruner with the same options: the one
        # compares with every trial that reached the step, the other with finished ones only.
        "tpe+median (Optuna's, finished trials)": (
            algorithms.DEFAULT_SAMPLER,
            {**workload.space.pruner, "name": "median"},
        ),
        "tpe+reported_median (default)": (algorithms.DEFAULT_SAMPLER, workload.space.pruner),
        # On request: Optuna's Gaussian-process sampler, often better than TPE with few trials,
        # but it learns nothing from pruned ones.
        "gp+reported_median": (
            {"name": "gp", "seed": 0, "n_startup_trials": 5},
            workload.space.pruner,
        ),
        # On request: the same rule, first deciding at the third evaluation (LoRA: step 15, past
        # the learning-rate warm-up of every quickstart trial, warmup_ratio ≤ 0.2 of 60 steps).
        "tpe+reported_median warm-up 2 evaluations": (
            algorithms.DEFAULT_SAMPLER,
            {**workload.space.pruner, "n_warmup_steps": workload.report_steps[min(2, last_eval)]},
        ),
        "tpe+hyperband": (
            algorithms.DEFAULT_SAMPLER,
            {"name": "hyperband", "min_resource": first, "max_resource": last},
        ),
        "tpe+successive_halving": (
            algorithms.DEFAULT_SAMPLER,
            {"name": "successive_halving", "min_resource": first},
        ),
    }


def pick(chosen: dict[str, Any], named: str | None, *, always: set[str]) -> dict[str, Any]:
    """The strategies `--strategies` names (names without their '(…)'), with `always`; all but
    the ON_REQUEST ones when it names none."""
    if not named:
        return {k: v for k, v in chosen.items() if k not in ON_REQUEST}
    wanted = always | {w.strip() for w in named.split(",")}
    return {k: v for k, v in chosen.items() if k.split(" (")[0] in wanted}


def resolve_pruner(spec: dict[str, Any], report_steps: list[int]) -> dict[str, Any]:
    """A pruner spec whose warm-up and interval are counted in evaluations
    (`n_warmup_evaluations`, `interval_evaluations`) → Optuna's, in reported steps."""
    spec = dict(spec)
    warmup = spec.pop("n_warmup_evaluations", None)
    interval = spec.pop("interval_evaluations", None)
    if warmup is not None:
        # Optuna checks from the step that reaches n_warmup_steps: the (warmup + 1)-th report.
        spec["n_warmup_steps"] = report_steps[warmup] if warmup else 0
    if interval is not None:
        spacing = report_steps[1] - report_steps[0] if len(report_steps) > 1 else 1
        spec["interval_steps"] = interval * spacing
    return spec


# ----------------------------------------------------------------------------- simulated


def simulated_workload() -> Workload:
    space = load_space(ROOT / "search_spaces" / "simulated.yaml")
    steps = space.trial_config(SIMULATED_BASELINE).simulated.steps
    return Workload("simulated", space, SIMULATED_BASELINE, list(range(1, steps + 1)), sweep)


def sweep(space: Space, sampler: dict, pruner: dict, seed: int, n_trials: int) -> list[Ran]:
    """The simulated workload: one in-memory study, each trial's curve computed without sleeps."""
    study = optuna.create_study(
        sampler=algorithms.build_sampler({**sampler, "seed": seed}),
        pruner=algorithms.build_pruner(pruner),
    )
    ran: list[Ran] = []

    def objective(trial: optuna.Trial) -> float:
        values = space.suggest(trial)
        config = space.trial_config(values)
        rng = simulated.rng_for(config)
        curve: dict[int, float] = {}
        for step in range(1, config.simulated.steps + 1):
            curve[step] = loss = simulated.loss_at(config, step, rng)
            trial.report(loss, step)
            if step < config.simulated.steps and trial.should_prune():
                ran.append(Ran(values, None, step, "PRUNED", curve))
                raise optuna.TrialPruned()
        ran.append(Ran(values, loss, config.simulated.steps, "COMPLETE", curve))
        return loss

    study.optimize(objective, n_trials=n_trials)
    return ran


def simulated_value(space: Space, values: dict[str, Any]) -> float:
    config = space.trial_config(values)
    rng = simulated.rng_for(config)
    steps = range(1, config.simulated.steps + 1)
    return [simulated.loss_at(config, step, rng) for step in steps][-1]


# ----------------------------------------------------------------------------- LoRA


def quickstart(eval_steps: int | None = None) -> dict[str, Any]:
    """quickstart.yaml's data; `eval_steps` replaces how often it evaluates (and so how often
    the pruner can act)."""
    path = ROOT / "search_spaces" / "quickstart.yaml"
    data = read_yaml(path, display=path.name)
    if eval_steps:
        data["fixed"]["eval_steps"] = data["fixed"]["logging_steps"] = eval_steps
    return data


def lora_workload(eval_steps: int | None = None) -> Workload:
    """The quickstart's evaluation steps and baseline, read without the demo's files (they are
    built only when something is to be trained). LoraRunner trains its sweeps."""
    space = parse_space(quickstart(eval_steps), resolve_paths=False)
    baseline = space.baseline_values() or {}
    config = space.trial_config(baseline)
    every, last = config.eval_steps, config.max_steps
    name = f"lora, evaluated every {every} steps" if eval_steps else "lora"
    return Workload(name, space, baseline, [*range(every, last, every), last], run=None)


class LoraRunner:
    """The quickstart's fine-tune, through tuner's own objective, one in-memory study a sweep.

    The demo model and data are built once under `workdir` (`tuner demo prepare`); the base model
    stays loaded between trials as in a warm worker, and the data is tokenised once.
    """

    def __init__(self, workdir: Path, threads: int, eval_steps: int | None = None) -> None:
        from tuner.core.demo import prepare_demo
        from tuner.trial.objective import Objective, quiet_worker_logs

        prepare_demo(workdir / "demo")
        self.space = parse_space(quickstart(eval_steps), base_dir=workdir)
        self.objective = Objective(self.space, artifacts=str(workdir / "artifacts"))
        self.objective.warm_up(threads=threads)
        quiet_worker_logs(40)

    def __call__(self, space: Space, sampler: dict, pruner: dict, seed: int, n: int) -> list[Ran]:
        study = optuna.create_study(
            sampler=algorithms.build_sampler({**sampler, "seed": seed}),
            pruner=algorithms.build_pruner(pruner),
        )
        return self.trials(study, n)

    def value(self, values: dict[str, Any]) -> float:
        study = optuna.create_study(pruner=optuna.pruners.NopPruner())
        study.enqueue_trial(self.space.optuna_params(values))
        (ran,) = self.trials(study, 1)
        if ran.value is None:
            raise RuntimeError(f"the baseline trial ended {ran.state}")
        return ran.value

    def trials(self, study: optuna.Study, n: int) -> list[Ran]:
        seconds: list[float] = []

        def timed(trial: optuna.Trial) -> float:
            started = time.perf_counter()
            try:
                return self.objective(trial)
            finally:
                seconds.append(time.perf_counter() - started)

        # A diverged trial (NaN at a high learning rate) fails; the sweep goes on, as tuner's does.
        study.optimize(timed, n_trials=n, catch=(Exception,))
        ran = []
        for trial, took in zip(study.trials, seconds, strict=True):
            curve = dict(sorted(trial.intermediate_values.items()))
            if trial.state == TrialState.COMPLETE:
                steps = int(trial.user_attrs.get("steps", max(curve)))
            else:
                stopped = trial.user_attrs.get("timings", {}).get("stopped_at_step")
                steps = int(stopped or (max(curve) if curve else 0))
            ran.append(
                Ran(
                    trial.user_attrs.get("hparams", trial.params),
                    trial.value if trial.state == TrialState.COMPLETE else None,
                    steps,
                    trial.state.name,
                    curve,
                    took,
                )
            )
        return ran


# ----------------------------------------------------------------------------- in parallel


def space_data(
    workload: Workload, eval_steps: int | None = None, demo: Path | None = None
) -> dict[str, Any]:
    """The workload's space as a user's YAML holds it: what `run_sweep` writes for a study. The
    LoRA one trains the demo under `demo` (`tuner demo prepare` wrote it)."""
    if workload.run is not None:
        return read_yaml(ROOT / "search_spaces" / "simulated.yaml", display="simulated.yaml")
    data = quickstart(eval_steps)
    assert demo is not None, "the LoRA workload trains the demo: say where it is"
    fixed = data["fixed"] = dict(data["fixed"])
    fixed["model_name_or_path"] = str(demo / "model")
    fixed["dataset"] = {**fixed["dataset"], "path": str(demo / "data.jsonl")}
    return data


def run_sweep(
    data: dict[str, Any],
    sampler: dict,
    pruner: dict,
    seed: int,
    n_trials: int,
    *,
    jobs: int,
    workdir: Path,
    step_seconds: float | None = None,
) -> list[Ran]:
    """One sweep through tuner's own run machinery, as `tuner study run NAME --n-trials N --jobs
    J` runs it: a study in its own SQLite file, `jobs` local workers trained in parallel and fed
    by the driver (TPE's constant liar for the running trials included), the pruner deciding in
    the workers. Its trials in the order they finished. `step_seconds` replaces the simulated
    workload's sleep per step (the pace of the curves, not their values)."""
    import yaml

    from tuner.core.study import create_study, run_study

    folder = Path(tempfile.mkdtemp(prefix="sweep-", dir=workdir))
    space = {k: v for k, v in data.items() if k not in ("baseline", "budget")}
    space.update(name=folder.name, sampler={**sampler, "seed": seed}, pruner=pruner)
    if step_seconds is not None and "simulated" in space.get("fixed", {}):
        space["fixed"] = {**space["fixed"]}
        space["fixed"]["simulated"] = {**space["fixed"]["simulated"], "step_seconds": step_seconds}
    path = workdir / f"{folder.name}.yaml"  # beside the demo: its relative paths resolve there
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    url = f"sqlite:///{folder / 'tuner.db'}"
    name = create_study(path, storage=url, artifacts=str(folder / "artifacts"))
    run_study(name, storage=url, n_trials=n_trials, jobs=jobs)
    trials = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    ran = []
    for trial in sorted(trials, key=lambda t: (t.datetime_complete, t.number)):
        curve = dict(sorted(trial.intermediate_values.items()))
        complete = trial.state == TrialState.COMPLETE
        steps = trial.user_attrs.get("steps") if complete else None
        ran.append(
            Ran(
                trial.user_attrs.get("hparams", trial.params),
                trial.value if complete else None,
                int(steps or (max(curve) if curve else 0)),
                trial.state.name,
                curve,
                trial.duration.total_seconds() if trial.duration else 0.0,
            )
        )
    return ran


# ----------------------------------------------------------------------------- figures


def summarise(
    runs: dict[str, list[list[Ran]]], baseline: float, steps: int, n_trials: int
) -> list[dict]:
    random_best = [_best(run) for run in runs["random"]]
    rows = []
    for name, seeds in runs.items():
        bests, beat_at, to_random, steps_to_random, used, seconds = [], [], [], [], [], []
        for seed, run in enumerate(seeds):
            best_so_far = _best_so_far(run)
            bests.append(best_so_far[-1])
            beat_at.append(_first(best_so_far, lambda b: b < baseline))
            to_random.append(_first(best_so_far, lambda b, s=seed: b <= random_best[s]))
            spent = list(accumulate(r.steps for r in run))
            steps_to_random.append(spent[to_random[-1] - 1] if to_random[-1] else None)
            used.append(sum(r.steps for r in run))
            seconds.append(sum(r.seconds for r in run))
        best_mean = statistics.mean(bests)
        rows.append(
            {
                "strategy": name,
                "best_mean": round(best_mean, 4),
                "best_sd": round(statistics.stdev(bests), 4) if len(bests) > 1 else 0.0,
                "better_than_baseline_by": round(baseline - best_mean, 4),
                "better_than_baseline_pct": round(100 * (baseline - best_mean) / baseline, 1),
                "seeds_beating_baseline": sum(b < baseline for b in bests),
                "beat_baseline_at": _median(beat_at),
                "trials_to_random_best": _median(to_random),
                "reached_random_best": sum(t is not None for t in to_random),
                "steps_to_random_best": _median(steps_to_random),
                "seeds": len(seeds),
                "steps_mean": statistics.mean(used),
                "seconds_mean": round(statistics.mean(seconds), 1),
                "saved_pct": round(100 * (1 - statistics.mean(used) / (n_trials * steps)), 1),
                "failed": sum(r.state == "FAIL" for run in seeds for r in run),
            }
        )
    return rows


def _best(run: list[Ran]) -> float:
    return min((r.value for r in run if r.value is not None), default=float("inf"))


def _best_so_far(run: list[Ran]) -> list[float]:
    """Best finished value after each trial (a pruned or failed trial's value does not count)."""
    out, best = [], float("inf")
    for r in run:
        if r.value is not None:
            best = min(best, r.value)
        out.append(best)
    return out


def _first(series: list[float], hit: Any) -> int | None:
    return next((i + 1 for i, value in enumerate(series) if hit(value)), None)


def _median(values: list[int | None]) -> float | None:
    """The median over seeds; a seed that never got there counts as worse than any that did."""
    ranked = sorted(values, key=lambda v: (v is None, v or 0))
    middle = ranked[(len(ranked) - 1) // 2]
    return None if middle is None else float(middle)


# ----------------------------------------------------------------------------- pruner replay


def pruner_candidates(workload: Workload) -> dict[str, dict[str, Any]]:
    """Median-pruner settings worth comparing, in evaluations (tuner resolves them to steps)."""
    out: dict[str, dict[str, Any]] = {}
    n_reports = len(workload.report_steps)
    for startup in (3, 5, 10):
        for warmup in sorted({0, 1, n_reports // 2}):
            for interval in (1, 2):
                if warmup >= n_reports - 1 or (interval > 1 and n_reports < 4):
                    continue
                spec = {
                    "name": "median",
                    "n_startup_trials": startup,
                    "n_warmup_evaluations": warmup,
                    "interval_evaluations": interval,
                }
                out[f"median startup {startup}, warm-up {warmup} eval, every {interval}"] = spec
    for keep in (33.0, 25.0):  # stricter than the median: keep the best third, quarter
        out[f"percentile {keep:.0f} startup 3, warm-up 0 eval"] = {
            "name": "percentile",
            "percentile": keep,
            "n_startup_trials": 3,
            "n_warmup_steps": 0,
        }
    return out


def replay(runs: list[list[Ran]], pruner_spec: dict[str, Any], report_steps: list[int]) -> dict:
    """Each unpruned sweep's trials again, in order, with the same curves, under `pruner_spec`:
    the steps it would have trained and the best it would have kept. Optuna's own pruner decides,
    on a study that holds what it would have held."""
    spent, kept, regrets = 0, 0, []
    full = 0
    for run in runs:
        study = optuna.create_study(
            pruner=algorithms.build_pruner(resolve_pruner(pruner_spec, report_steps))
        )
        best = float("inf")
        for r in run:
            full += r.steps
            if r.state != "COMPLETE":
                spent += r.steps
                continue
            trial = study.ask()
            stopped = None
            for step, loss in r.curve.items():
                trial.report(loss, step)
                if step < report_steps[-1] and trial.should_prune():
                    stopped = step
                    break
            if stopped is None:
                study.tell(trial, r.value)
                best = min(best, r.value)
                spent += r.steps
            else:
                study.tell(trial, state=TrialState.PRUNED)
                spent += stopped
        kept += best <= _best(run)
        regrets.append(best - _best(run))
    return {
        "saved_pct": round(100 * (1 - spent / full), 1),
        "kept_best": kept,
        "regret_mean": round(statistics.mean(regrets), 4),
        "seeds": len(runs),
    }


def sampler_settings() -> dict[str, tuple[dict, dict]]:
    """TPE's start-up length and multivariate modelling, unpruned, beside random search. The
    default keeps the name `tpe` (and random `random`), so a `--resume` reuses the main run's."""
    settings = {"random": ({"name": "random"}, {"name": "none"})}
    for startup, multivariate in [(5, True), (10, True), (5, False), (10, False)]:
        spec = {**algorithms.DEFAULT_SAMPLER, "n_startup_trials": startup}
        spec["multivariate"] = multivariate
        label = f"tpe startup {startup} {'multivariate' if multivariate else 'independent'}"
        settings["tpe" if spec == algorithms.DEFAULT_SAMPLER else label] = (spec, {"name": "none"})
    return settings


# ----------------------------------------------------------------------------- output


def table(workload: Workload, baseline: float, rows: list[dict], replays: dict) -> str:
    out = io.StringIO()
    with redirect_stdout(out):
        print(f"== {workload.name}: {rows[0]['seeds']} seeds")
        print(f"baseline (the space's hand-picked defaults): {baseline:.4f}\n")
        print(
            f"{'strategy':38} {'best (mean ± sd)':>18} {'vs baseline':>12} {'beat it at':>10} "
            f"{'to random best':>15} {'(steps)':>8} {'steps':>7} {'saved':>6} {'seconds':>8}"
        )
        for row in rows:
            print(
                f"{row['strategy']:38} {row['best_mean']:>10.4f} ± {row['best_sd']:<6.4f}"
                f"{-row['better_than_baseline_pct']:>+11.1f}% {_fmt(row['beat_baseline_at']):>10}"
                f" {_fmt(row['trials_to_random_best']):>15}"
                f" {_fmt(row['steps_to_random_best']):>8} {row['steps_mean']:>7.0f}"
                f" {row['saved_pct']:>5.0f}% {_seconds(row['seconds_mean']):>8}"
            )
        if replays:
            print(
                "\nmedian-pruner settings replayed on the unpruned sweeps' curves "
                "(random and TPE; saved: share of their steps; kept: seeds whose best survived)"
            )
        for name, result in replays.items():
            print(
                f"  {name:44} saved {result['saved_pct']:>5.1f}%  kept "
                f"{result['kept_best']}/{result['seeds']}  regret {result['regret_mean']:.4f}"
            )
        print()
    return out.getvalue()


def _seconds(value: float) -> str:
    return f"{value:.0f}" if value else "-"  # the simulated workload runs without its sleeps


def _fmt(value: float | None) -> str:
    return "never" if value is None else f"{value:.0f}"


def plot(results: dict[str, dict], path: Path) -> None:
    """Best-so-far against training steps spent: per workload, one panel of the whole run and
    one zoomed on the last stretch, where the strategies part; per strategy the mean over seeds
    (the spread is in the table), the baseline dashed. matplotlib, no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = ["#7f7f7f", "#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    figure, axes = plt.subplots(
        2, len(results), figsize=(7 * len(results), 9), squeeze=False, sharex="col"
    )
    for column, (name, result) in enumerate(results.items()):
        rows = result["strategies"]
        lowest = min(r["best_mean"] - r["best_sd"] for r in rows)
        spread = max(r["best_sd"] for r in rows)
        for row, ax in enumerate(axes[:, column]):
            for colour, (strategy, seeds) in zip(colours, result["runs"].items(), strict=False):
                x, curves = _on_common_steps(seeds)
                mean = [statistics.mean(values) for values in curves]
                ax.step(x, mean, where="post", color=colour, lw=1.8, label=strategy)
            ax.axhline(result["baseline"], color="black", ls="--", lw=1, label="baseline")
            ax.set_xscale("log")
            ax.grid(alpha=0.3, which="both")
            ax.set_ylabel("best validation loss")
            if row == 0:
                ax.set_title(f"{name}: best validation loss so far, mean of {len(seeds)} seeds")
                ax.set_ylim(lowest * 0.97, result["baseline"] * 1.08)
                ax.legend(fontsize=8)
            else:
                ax.set_title(f"{name}: zoomed on the best (the sd over seeds is ~{spread:.3f})")
                ax.set_ylim(lowest - spread / 2, lowest + 6 * spread)
                ax.set_xlabel("training steps spent")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def _on_common_steps(seeds: list[list[Ran]]) -> tuple[list[int], list[list[float]]]:
    """Each seed's best-so-far at every step count where any seed finished a trial, from the
    first point at which every seed has a result."""
    series = []
    for run in seeds:
        spent, points = 0, []
        for r, best in zip(run, _best_so_far(run), strict=True):
            spent += r.steps
            points.append((spent, best))
        series.append(points)
    xs = sorted({x for points in series for x, _ in points})
    curves = []
    for x in xs:
        values = [min((b for s, b in points if s <= x), default=float("inf")) for points in series]
        if all(v < float("inf") for v in values):
            curves.append((x, values))
    return [x for x, _ in curves], [values for _, values in curves]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=["lora", "simulated", "both"], default="both")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--trials", type=int, default=40, help="trials per sweep")
    parser.add_argument(
        "--strategies",
        default=None,
        help="comma-separated names without their '(…)', e.g. tpe,tpe+median (random always runs)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="lora sweeps run side by side")
    parser.add_argument(
        "--parallel",
        default=None,
        help="comma-separated trial parallelism levels, e.g. 1,4,8: each sweep then runs through "
        "tuner's run machinery (`study run --jobs J`: local workers, the feed, the pruner in the "
        "workers), one sweep at a time; writes parallel_WORKLOAD.txt",
    )
    parser.add_argument(
        "--step-seconds",
        type=float,
        default=0.1,
        help="--parallel, simulated workload: each step's sleep (simulated.yaml's is 0.3 s)",
    )
    parser.add_argument(
        "--lookahead",
        type=int,
        default=None,
        help="--parallel: the space's resources.lookahead (suggestions the driver samples ahead; "
        "default one per trial slot, 0: each worker samples for itself)",
    )
    parser.add_argument(
        "--eval-steps",
        type=int,
        default=None,
        help="lora: evaluate every N training steps instead of quickstart.yaml's 5",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "search_quality")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the sweeps already in OUT/runs.jsonl (same workload, strategy, seed, budget)",
    )
    parser.add_argument(
        "--sampler-grid",
        action="store_true",
        help="instead of the strategies, compare TPE settings (random trials first, "
        "multivariate), unpruned, beside random search; writes sampler_grid_WORKLOAD_TRIALS.txt",
    )
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    done = _load_runs(args.out / "runs.jsonl") if args.resume else {}
    if not args.resume:
        (args.out / "runs.jsonl").unlink(missing_ok=True)

    kinds = ["lora", "simulated"] if args.workload == "both" else [args.workload]
    if args.parallel:
        levels = [int(level) for level in args.parallel.split(",")]
        for kind in kinds:
            parallel_main(kind, levels, args, done)
        return
    results: dict[str, dict] = {}
    text = ""
    with tempfile.TemporaryDirectory(prefix="tuner-search-quality-") as tmp:
        for kind in kinds:
            workload = lora_workload(args.eval_steps) if kind == "lora" else simulated_workload()
            name = workload.name
            n_trials = args.trials
            chosen = sampler_settings() if args.sampler_grid else strategies(workload)
            chosen = pick(chosen, args.strategies, always={"random"})
            plan = {
                (strategy, seed): (sampler, pruner)
                for strategy, (sampler, pruner) in chosen.items()
                for seed in range(args.seeds)
            }
            keys = {task: _key(name, *task, *plan[task], n_trials) for task in plan}
            todo = [task for task in plan if keys[task] not in done]
            if workload.run is None:  # LoRA: trained by LoraRunner
                baseline = done.get(_key(name, "baseline", 0, {}, {}, 1))
                runner = None
                if todo:  # built here once: the sweep processes would race to build it
                    from tuner.core.demo import prepare_demo

                    prepare_demo(Path(tmp) / "demo")
                if baseline is None or (todo and args.jobs <= 1):
                    runner = LoraRunner(Path(tmp), max(1, 2 // args.jobs), args.eval_steps)
                if baseline is None:
                    baseline = runner.value(workload.baseline)
                    _save_run(args.out, _key(name, "baseline", 0, {}, {}, 1), baseline)
                finished = _run_lora(
                    Path(tmp), args.jobs, todo, plan, n_trials, runner, args.eval_steps
                )
            else:
                baseline = simulated_value(workload.space, workload.baseline)
                finished = (
                    (task, workload.run(workload.space, *plan[task], task[1], n_trials))
                    for task in todo
                )
            for task, run in finished:
                done[keys[task]] = run
                _save_run(args.out, keys[task], run)
                print(
                    f"{name} {task[0]} seed {task[1]}: best {_best(run):.4f}, "
                    f"{sum(r.steps for r in run)} steps, {sum(r.seconds for r in run):.0f} s",
                    file=sys.stderr,
                )
            runs: dict[str, list[list[Ran]]] = {}
            for strategy, seed in plan:
                runs.setdefault(strategy, []).append(done[keys[strategy, seed]])
            rows = summarise(runs, baseline, workload.steps, n_trials)
            if args.sampler_grid:
                default = algorithms.DEFAULT_SAMPLER
                for row in rows:
                    if row["strategy"] == "tpe":
                        row["strategy"] = (
                            f"tpe startup {default['n_startup_trials']} "
                            f"{'multivariate' if default['multivariate'] else 'independent'} "
                            "(default)"
                        )
            unpruned = runs["random"] + runs.get("tpe", [])
            replays = (
                {}
                if args.sampler_grid
                else {
                    label: replay(unpruned, spec, workload.report_steps)
                    for label, spec in pruner_candidates(workload).items()
                }
            )
            block = table(workload, baseline, rows, replays)
            print(block, end="")
            text += block
            if args.sampler_grid:
                slug = re.sub(r"\W+", "_", name)
                (args.out / f"sampler_grid_{slug}_{n_trials}.txt").write_text(block)
            results[name] = {
                "baseline": baseline,
                "trials": n_trials,
                "steps_per_trial": workload.steps,
                "sampler": algorithms.DEFAULT_SAMPLER,
                "default_pruner": algorithms.DEFAULT_PRUNER,
                "strategies": rows,
                "pruner_replay": replays,
                "runs": runs,
            }

    figures = {
        name: {k: v for k, v in result.items() if k != "runs"} for name, result in results.items()
    }
    if args.sampler_grid:
        print(json.dumps({"sampler_grid": figures}))
        return
    (args.out / "report.txt").write_text(text)
    (args.out / "search_quality.json").write_text(json.dumps(figures, indent=1) + "\n")
    try:
        plot(results, args.out / "search_quality.png")
        print(f"plot: {args.out / 'search_quality.png'}")
    except ImportError:
        print("no plot: matplotlib is not installed (pip install -e '.[bench]')", file=sys.stderr)
    print(json.dumps({"search_quality": figures}))


def parallel_main(kind: str, levels: list[int], args: argparse.Namespace, done: dict) -> None:
    """Every strategy at each parallelism level, on the same seeds and budget, through the run
    machinery; one table per workload, the levels side by side."""
    workload = lora_workload(args.eval_steps) if kind == "lora" else simulated_workload()
    chosen = pick(strategies(workload), args.strategies, always={"random", "tpe"})
    pace = args.step_seconds if kind == "simulated" else None
    by_level: dict[int, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="tuner-search-quality-") as tmp:
        workdir = Path(tmp)
        if kind == "lora":
            from tuner.core.demo import prepare_demo

            prepare_demo(workdir / "demo")
            baseline = LoraRunner(workdir, 2, args.eval_steps).value(workload.baseline)
        else:
            baseline = simulated_value(workload.space, workload.baseline)
        data = space_data(workload, args.eval_steps, workdir / "demo")
        ahead = ""
        if args.lookahead is not None:
            data["resources"] = {**data.get("resources", {}), "lookahead": args.lookahead}
            ahead = f" lookahead {args.lookahead}"
        for jobs in levels:
            runs: dict[str, list[list[Ran]]] = {}
            for strategy, (sampler, pruner) in chosen.items():
                for seed in range(args.seeds):
                    # Random search draws alike whatever it knows: its sweeps serve every lookahead.
                    label = f"{workload.name} jobs {jobs} pace {pace}"
                    label += "" if strategy == "random" else ahead
                    key = _key(label, strategy, seed,
                               sampler, pruner, args.trials)  # fmt: skip
                    if key not in done:
                        done[key] = run_sweep(
                            data, sampler, pruner, seed, args.trials,
                            jobs=jobs, workdir=workdir, step_seconds=pace,
                        )  # fmt: skip
                        _save_run(args.out, key, done[key])
                    run = done[key]
                    runs.setdefault(strategy, []).append(run)
                    print(
                        f"{workload.name} --jobs {jobs} {strategy} seed {seed}: best "
                        f"{_best(run):.4f}, {sum(r.steps for r in run)} steps",
                        file=sys.stderr,
                    )
            rows = summarise(runs, baseline, workload.steps, args.trials)
            unpruned = next(r for r in rows if r["strategy"] == "tpe")
            for row in rows:
                row["jobs"] = jobs
                row["vs_unpruned_tpe"] = round(row["best_mean"] - unpruned["best_mean"], 4)
                row["within_tpe_spread"] = row["vs_unpruned_tpe"] <= unpruned["best_sd"]
            by_level[jobs] = rows
    text = parallel_table(workload, args, by_level)
    print(text, end="")
    slug = re.sub(r"\W+", "_", workload.name)
    (args.out / f"parallel_{slug}.txt").write_text(text)
    (args.out / f"parallel_{slug}.json").write_text(
        json.dumps({"workload": workload.name, "baseline": baseline, "levels": by_level}, indent=1)
        + "\n"
    )
    print(json.dumps({"search_quality_parallel": {workload.name: by_level}}))


def parallel_table(workload: Workload, args: argparse.Namespace, by_level: dict) -> str:
    out = io.StringIO()
    with redirect_stdout(out):
        pace = f", {args.step_seconds:g} s a step" if workload.run is not None else ""
        print(
            f"== {workload.name}: {args.seeds} seeds x {args.trials} trials at each --jobs, "
            f"through `study run`{pace}"
        )
        print(
            f"{'strategy':42} {'jobs':>4} {'saved':>6} {'to random best':>15} {'(steps)':>8} "
            f"{'best (mean ± sd)':>18} {'vs unpruned TPE':>16}"
        )
        for jobs, rows in by_level.items():
            for row in rows:
                print(
                    f"{row['strategy']:42} {jobs:>4} {row['saved_pct']:>5.0f}% "
                    f"{_fmt(row['trials_to_random_best']):>15} "
                    f"{_fmt(row['steps_to_random_best']):>8} "
                    f"{row['best_mean']:>10.4f} ± {row['best_sd']:<6.4f} "
                    f"{row['vs_unpruned_tpe']:>+9.4f} "
                    f"{'(in sd)' if row['within_tpe_spread'] else ''}"
                )
            print()
    return out.getvalue()


def _key(workload: str, strategy: str, seed: int, sampler: dict, pruner: dict, n: int) -> str:
    return json.dumps([workload, strategy, seed, sampler, pruner, n], sort_keys=True)


def _save_run(out: Path, key: str, run: list[Ran] | float) -> None:
    record = run if isinstance(run, float) else [asdict(r) for r in run]
    with (out / "runs.jsonl").open("a") as f:
        f.write(json.dumps({"key": key, "run": record}) + "\n")


def _load_runs(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    done: dict[str, Any] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        run = record["run"]
        if isinstance(run, list):
            run = [Ran(**{**r, "curve": {int(k): v for k, v in r["curve"].items()}}) for r in run]
        done[record["key"]] = run
    return done


# Each LoRA sweep process keeps its own warm objective (the base model stays loaded).
_RUNNER: LoraRunner | None = None


def _start_worker(workdir: Path, threads: int, eval_steps: int | None) -> None:
    global _RUNNER
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _RUNNER = LoraRunner(workdir, threads, eval_steps)


def _lora_sweep(task: tuple, sampler: dict, pruner: dict, n: int) -> tuple[tuple, list[Ran]]:
    assert _RUNNER is not None
    return task, _RUNNER(_RUNNER.space, sampler, pruner, task[1], n)


def _run_lora(
    workdir: Path,
    jobs: int,
    todo: list,
    plan: dict,
    n: int,
    runner: LoraRunner | None,
    eval_steps: int | None,
):
    """The sweeps, `jobs` at a time in fresh processes (torch does not survive a fork)."""
    if not todo:
        return
    if jobs <= 1:
        assert runner is not None
        for task in todo:
            yield task, runner(runner.space, *plan[task], task[1], n)
        return
    context = multiprocessing.get_context("spawn")
    threads = max(1, 2 // jobs)
    with ProcessPoolExecutor(
        jobs,
        mp_context=context,
        initializer=_start_worker,
        initargs=(workdir, threads, eval_steps),
    ) as pool:
        futures = [pool.submit(_lora_sweep, task, *plan[task], n) for task in todo]
        for future in as_completed(futures):
            yield future.result()


if __name__ == "__main__":
    main()
