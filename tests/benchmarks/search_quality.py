"""Does a sweep beat the hand-picked defaults and random search, and what does pruning save?

    python tests/benchmarks/search_quality.py                  # 5 seeds x 40 trials
    python tests/benchmarks/search_quality.py --seeds 10 --trials 60 --plot build/quality.html

On the simulated workload (`search_spaces/simulated.yaml`: 10 evaluations per trial on a curve
whose floor is set by learning rate, rank and dropout; `trials/simulated.py`), evaluated in this
process without its sleeps, every strategy gets the same trial budget and the same seeds, side
by side in one run:

- baseline: the hand-picked defaults alone (learning rate 5e-5, rank 16, dropout 0.05);
- random search, no pruning;
- TPE (tuner's, as `sampler: tpe` builds it), no pruning;
- TPE with tuner's default pruner (median), and with Optuna's Hyperband and successive halving.

Printed for each: the best value (mean and spread over seeds), the trial at which it beat the
baseline, the trials it needed to reach random search's final best (per seed), the training
steps spent and the share pruning saved. Ends with one JSON line; `--plot` writes best-so-far
against steps spent for every strategy and seed as one HTML file (plotly, no network needed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import optuna

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from trials import simulated  # noqa: E402
from tuner import algorithms  # noqa: E402
from tuner.space import load_space  # noqa: E402

BASELINE = {"learning_rate": 5e-5, "lora_rank": 16, "lora_dropout": 0.05}
STRATEGIES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # name: (sampler spec, pruner spec), as a space would write them
    "random": ({"name": "random"}, {"name": "none"}),
    "tpe": (algorithms.DEFAULT_SAMPLER, {"name": "none"}),
    "tpe+median (default)": (algorithms.DEFAULT_SAMPLER, algorithms.DEFAULT_PRUNER),
    "tpe+hyperband": (
        algorithms.DEFAULT_SAMPLER,
        {"name": "hyperband", "min_resource": 1, "max_resource": 10},
    ),
    "tpe+successive_halving": (
        algorithms.DEFAULT_SAMPLER,
        {"name": "successive_halving", "min_resource": 1},
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    space = load_space(ROOT / "search_spaces" / "simulated.yaml")
    steps = space.trial_config(BASELINE).steps
    baseline = objective_value(space, BASELINE)
    runs = {
        name: [sweep(space, sampler, pruner, seed, args.trials) for seed in range(args.seeds)]
        for name, (sampler, pruner) in STRATEGIES.items()
    }
    rows = summarise(runs, baseline, steps, args.trials)
    print(f"baseline (hand-picked defaults): {baseline:.4f}\n")
    print(
        f"{'strategy':24} {'best (mean ± sd)':>18} {'beat baseline at':>17} "
        f"{'trials to random best':>22} {'steps':>7} {'saved':>6}"
    )
    for row in rows:
        print(
            f"{row['strategy']:24} {row['best_mean']:>10.4f} ± {row['best_sd']:<6.4f}"
            f"{_fmt(row['beat_baseline_at']):>17} {_fmt(row['trials_to_random_best']):>22} "
            f"{row['steps_mean']:>7.0f} {row['saved_pct']:>5.0f}%"
        )
    if args.plot:
        plot(runs, args.plot)
        print(f"\nplot: {args.plot}")
    print(json.dumps({"search_quality": {"baseline": baseline, "strategies": rows}}))


def objective_value(space: Any, values: dict[str, Any]) -> float:
    config = space.trial_config(values)
    rng = simulated.rng_for(config)
    return [simulated.loss_at(config, step, rng) for step in range(1, config.steps + 1)][-1]


def sweep(space: Any, sampler: dict, pruner: dict, seed: int, n_trials: int) -> list[tuple]:
    """One study; returns (value, steps trained) per trial in the order they ran."""
    study = optuna.create_study(
        sampler=algorithms.build_sampler({**sampler, "seed": seed}),
        pruner=algorithms.build_pruner(pruner),
    )
    spent: list[tuple[float, int, bool]] = []

    def objective(trial: optuna.Trial) -> float:
        config = space.trial_config(space.suggest(trial))
        rng = simulated.rng_for(config)
        loss = float("inf")
        for step in range(1, config.steps + 1):
            loss = simulated.loss_at(config, step, rng)
            trial.report(loss, step)
            if step < config.steps and trial.should_prune():
                spent.append((loss, step, True))
                raise optuna.TrialPruned()
        spent.append((loss, config.steps, False))
        return loss

    study.optimize(objective, n_trials=n_trials)
    return spent


def summarise(runs: dict, baseline: float, steps: int, n_trials: int) -> list[dict]:
    random_best = [min(v for v, _, pruned in run if not pruned) for run in runs["random"]]
    rows = []
    for name, seeds in runs.items():
        bests, beat_at, to_random, used = [], [], [], []
        for seed, run in enumerate(seeds):
            best_so_far = _best_so_far(run)
            bests.append(best_so_far[-1])
            beat_at.append(_first(best_so_far, lambda b: b < baseline))
            to_random.append(_first(best_so_far, lambda b, s=seed: b <= random_best[s]))
            used.append(sum(s for _, s, _ in run))
        rows.append(
            {
                "strategy": name,
                "best_mean": round(statistics.mean(bests), 4),
                "best_sd": round(statistics.stdev(bests), 4) if len(bests) > 1 else 0.0,
                "beat_baseline_at": _median(beat_at),
                "trials_to_random_best": _median(to_random),
                "reached_random_best": sum(t is not None for t in to_random),
                "seeds": len(seeds),
                "steps_mean": statistics.mean(used),
                "saved_pct": round(100 * (1 - statistics.mean(used) / (n_trials * steps)), 1),
                "better_than_baseline_by": round(baseline - statistics.mean(bests), 4),
            }
        )
    return rows


def _best_so_far(run: list[tuple]) -> list[float]:
    """Best finished value after each trial (a pruned trial's value does not count)."""
    out, best = [], float("inf")
    for value, _, pruned in run:
        if not pruned:
            best = min(best, value)
        out.append(best)
    return out


def _first(series: list[float], hit: Any) -> int | None:
    return next((i + 1 for i, value in enumerate(series) if hit(value)), None)


def _median(values: list[int | None]) -> float | None:
    """The median over seeds; a seed that never got there counts as worse than any that did."""
    ranked = sorted(values, key=lambda v: (v is None, v or 0))
    middle = ranked[(len(ranked) - 1) // 2]
    return None if middle is None else float(middle)


def _fmt(value: float | None) -> str:
    return "never" if value is None else f"{value:.0f}"


def plot(runs: dict, path: Path) -> None:
    import plotly.graph_objects as go

    figure = go.Figure()
    colours = ["#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3"]
    for colour, (name, seeds) in zip(colours, runs.items(), strict=False):
        for seed, run in enumerate(seeds):
            spent, x = 0, []
            for _, steps, _ in run:
                spent += steps
                x.append(spent)
            figure.add_trace(
                go.Scatter(
                    x=x,
                    y=_best_so_far(run),
                    mode="lines",
                    line={"color": colour, "shape": "hv"},
                    name=name,
                    legendgroup=name,
                    showlegend=seed == 0,
                    opacity=0.7,
                )
            )
    figure.update_layout(
        title="Best validation loss so far against training steps spent (one line per seed)",
        xaxis_title="training steps spent",
        yaxis_title="best validation loss",
        yaxis_type="log",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.write_html(path, include_plotlyjs=True)


if __name__ == "__main__":
    main()
