"""Optuna samplers and pruners by the names a space uses.

A space names one (`sampler: {name: tpe, n_startup_trials: 10}`); the options are the Optuna
class's own keyword arguments, checked against its signature so a typo is caught when the space
is loaded rather than when the first trial starts.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner.common.errors import SpaceError, did_you_mean
from tuner.search.pruning import ReportedMedianPruner


class TPESampler(optuna.samplers.TPESampler):
    """Optuna's TPE, also learning from trials that FAILED with a violated constraint.

    A trial that ran out of memory (or diverged) ends FAIL with a constraint set
    (tuner.trial.objective). TPE already ranks infeasible trials below every feasible one, but it
    reads
    only COMPLETE and PRUNED trials, so on its own it would never see them and would keep
    proposing rank 64 at batch 16. Here its model of the space is built with those failed trials
    added as infeasible, so their region lands in the "bad" density.
    """

    def _sample(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, Any]
    ) -> dict[str, Any]:
        return super()._sample(_WithInfeasibleFailures(study), trial, search_space)


class _WithInfeasibleFailures:
    """A study whose `_get_trials` for finished states also returns the FAIL trials that have a
    positive constraint; everything else is the study's own."""

    def __init__(self, study: optuna.Study) -> None:
        self._study = study

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _get_trials(self, deepcopy: bool = True, states: Any = None, use_cache: bool = False):
        trials = self._study._get_trials(deepcopy=deepcopy, states=states, use_cache=use_cache)
        if states is None or TrialState.COMPLETE not in states:
            return trials
        failed = self._study._get_trials(
            deepcopy=deepcopy, states=(TrialState.FAIL,), use_cache=use_cache
        )
        infeasible = [t for t in failed if any(v > 0 for v in t.constraints.values())]
        return sorted(trials + infeasible, key=lambda t: t.number)


SAMPLERS: dict[str, Callable[..., optuna.samplers.BaseSampler]] = {
    "tpe": TPESampler,
    "random": optuna.samplers.RandomSampler,
    "qmc": optuna.samplers.QMCSampler,
    "gp": optuna.samplers.GPSampler,
    "cmaes": optuna.samplers.CmaEsSampler,
    "bruteforce": optuna.samplers.BruteForceSampler,
}

PRUNERS: dict[str, Callable[..., optuna.pruners.BasePruner]] = {
    "median": optuna.pruners.MedianPruner,
    # The median of every trial that reached the step, not only the finished (tuner.search.pruning).
    "reported_median": ReportedMedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "patient": optuna.pruners.PatientPruner,
    "threshold": optuna.pruners.ThresholdPruner,
    "wilcoxon": optuna.pruners.WilcoxonPruner,
    "none": optuna.pruners.NopPruner,
}

# What a space gets when it names only the algorithm, or nothing at all. Chosen from
# tests/benchmarks/search_quality.py (README, "Search quality"): on the simulated workload
# multivariate TPE models the params jointly (learning rate and rank interact) and reached random
# search's best in half the trials of independent TPE; 5 random trials before it leave most of a
# 16-40 trial budget to the model (10 did no better on the demo LoRA workload, whose plateau no
# setting searched better than random). `group` is left off: every param is suggested in every
# trial, so there is one group.
DEFAULT_SAMPLER: dict[str, Any] = {
    "name": "tpe",
    "seed": 0,
    "n_startup_trials": 5,
    "multivariate": True,
}

# The median rule, compared with every trial that reached the step (finished, pruned or still
# training: tuner.search.pruning), from the first evaluation on once 3 others have reported it.
# Optuna's
# MedianPruner waits for finished trials, which trials running in parallel are not: on the
# simulated space it saved 49 % of the steps one trial at a time but 40-42 % at --jobs 4 and 8,
# this rule 46 %, 46 % and 55 % (docs/search-quality.md#in-parallel, issue 24). Serially the
# same rule with 3 finished trials first was chosen on the LoRA sweeps' real curves: waiting for
# more, or for an evaluation or two, pruned less without a better best. `n_warmup_steps` counts
# reported steps (the Trainer's global step), so 0 needs no knowledge of a space's `eval_steps`.
DEFAULT_PRUNER: dict[str, Any] = {
    "name": "reported_median",
    "n_startup_trials": 3,
    "n_warmup_steps": 0,
    "interval_steps": 1,
}


def normalize(spec: Any, *, key: str, default: Mapping[str, Any]) -> dict[str, Any]:
    """`tpe` or `{name: tpe, ...}` or nothing → a mapping with a name; defaults fill the rest
    only when the same algorithm is named."""
    if spec is None:
        return dict(default)
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping):
        raise SpaceError(f"{key} must be a name or a mapping with `name` (got {spec!r})")
    spec = dict(spec)
    name = spec.get("name", default["name"])
    if not isinstance(name, str):
        raise SpaceError(f"{key}.name must be a string (got {name!r})")
    spec["name"] = name.lower()
    if spec["name"] == default["name"]:
        spec = {**default, **spec}
    return spec


SEEDS = 2**32  # numpy's seeds, which Optuna's samplers take: 0 to 2**32 - 1


def build_sampler(spec: Mapping[str, Any], *, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    """Make the sampler; workers and runs pass distinct `seed_offset`s so their random draws
    differ (tuner/store/_runs.py). The seed wraps within numpy's range, which a run's random offset
    would otherwise leave."""
    options = dict(spec)
    name = options.pop("name")
    seed = options.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEEDS:
            raise SpaceError(
                f"sampler.seed must be a whole number from 0 to {SEEDS - 1} (got {seed!r})"
            )
        # Around numpy's range, not past it: a seed near the top plus a worker's offset would
        # otherwise fail that worker's sampler (and the driver's feed).
        options["seed"] = (seed + seed_offset) % SEEDS
    return _build("sampler", SAMPLERS, name, options)


def build_pruner(spec: Mapping[str, Any]) -> optuna.pruners.BasePruner:
    options = dict(spec)
    name = options.pop("name")
    if name == "patient":
        wrapped = options.pop("wrapped", None)
        inner = normalize(wrapped, key="pruner.wrapped", default=DEFAULT_PRUNER)
        options["wrapped_pruner"] = build_pruner(inner)
        options.setdefault("patience", 1)
    return _build("pruner", PRUNERS, name, options)


def _build(kind: str, registry: Mapping[str, Callable[..., Any]], name: str, options: dict) -> Any:
    if name not in registry:
        raise SpaceError(
            f"{kind}.name: unknown {kind} {name!r}{did_you_mean(name, registry)} "
            f"(allowed: {', '.join(registry)})"
        )
    cls = registry[name]
    allowed = [p for p in inspect.signature(cls).parameters if p != "wrapped_pruner"]
    if name == "patient":
        allowed.append("wrapped")  # the wrapped pruner, itself a pruner spec
    for option in options:
        if option not in allowed and option != "wrapped_pruner":
            raise SpaceError(
                f"{kind}.{option} is not an option of the {name} {kind}"
                f"{did_you_mean(option, allowed)} (allowed: {', '.join(allowed) or 'none'})"
            )
    try:
        return cls(**options)
    except ImportError as e:
        raise SpaceError(f"{kind}.name: the {name} {kind} needs a package: {e}") from None
    except (TypeError, ValueError) as e:
        raise SpaceError(f"{kind}: {name} rejected its options: {e}") from None
