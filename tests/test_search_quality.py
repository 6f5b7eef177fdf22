"""The defaults `tuner` ships must search better than random: on the simulated workload, over 5
seeds and 40 trials each, TPE with the default pruner reaches random search's final best in
fewer trials than random search itself, within half the budget, and the pruner saves steps
without a worse best. The sweeps are the ones `tests/benchmarks/search_quality.py` prints."""

from __future__ import annotations

import statistics

from benchmarks.search_quality import BASELINE, ROOT, sweep

from tuner import algorithms
from tuner.space import load_space

SEEDS, TRIALS = range(5), 40


def _trials_to_reach(ran: list[tuple[float, int, bool]], target: float) -> int:
    best = float("inf")
    for number, (value, _, pruned) in enumerate(ran, start=1):
        best = best if pruned else min(best, value)
        if best <= target:
            return number
    return TRIALS + 1  # never: worse than any seed that got there


def _best(ran: list[tuple[float, int, bool]]) -> float:
    return min(value for value, _, pruned in ran if not pruned)


def test_the_default_strategy_reaches_random_searchs_best_sooner_and_prunes_steps() -> None:
    space = load_space(ROOT / "search_spaces" / "simulated.yaml")
    assert space.trial_config(BASELINE).steps == 10

    def runs(sampler: dict, pruner: dict) -> list:
        return [sweep(space, sampler, pruner, seed, TRIALS) for seed in SEEDS]

    random_runs = runs({"name": "random"}, {"name": "none"})
    default_runs = runs(algorithms.DEFAULT_SAMPLER, algorithms.DEFAULT_PRUNER)
    unpruned_runs = runs(algorithms.DEFAULT_SAMPLER, {"name": "none"})
    targets = [_best(run) for run in random_runs]

    def needs(strategy: list) -> float:
        return statistics.median(
            _trials_to_reach(run, target) for run, target in zip(strategy, targets, strict=True)
        )

    assert needs(default_runs) < needs(random_runs)
    assert needs(default_runs) <= TRIALS / 2

    steps = sum(s for run in default_runs for _, s, _ in run)
    unpruned_steps = sum(s for run in unpruned_runs for _, s, _ in run)
    assert steps <= 0.6 * unpruned_steps  # pruning saves at least 40 % of the training steps
    spread = statistics.stdev(map(_best, unpruned_runs))
    assert (
        statistics.mean(map(_best, default_runs))
        <= statistics.mean(map(_best, unpruned_runs)) + spread
    )
