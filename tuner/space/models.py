"""What a space file means: its sections as pydantic models, each field with its description.

- the param kinds under `params` (`FloatParam`, `IntParam`, `CategoricalParam`, `MultipleParam`);
- the sections (`ObjectiveSpec` and its `Generation`, `Budget`, `SweepPolicy`, `Resources`) and
  durations as people write them (`parse_duration`);
- `Space`, the whole file: suggesting its params into an Optuna trial, its baseline, and its
  stored form.

The field descriptions are the one source of the space reference (reference.py). Checks that
need more than one section or the world are in checks.py; reading a file is in reading.py.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from trials.config import TrialConfig
from tuner.common.limits import MAX_JOBS, MAX_TRIALS
from tuner.common.text import shown
from tuner.search import algorithms

Scalar = None | bool | int | float | str


# ----------------------------------------------------------------------------- params


class _Param(BaseModel):
    """One block under `params`: `type` picks the kind."""

    model_config = ConfigDict(extra="forbid")


class FloatParam(_Param):
    """A real number in [low, high], optionally on a log scale or a grid of `step`."""

    type: Literal["float"] = Field(description="Picks this kind.")
    low: float = Field(
        allow_inf_nan=False, description="The lowest value (> 0 on a log scale; finite)."
    )
    high: float = Field(
        allow_inf_nan=False,
        description="The highest value (>= low; finite, and high - low too).",
    )
    log: bool = Field(default=False, description="Sample on a log scale; needs low > 0.")
    step: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="Only low, low + step, ... (not with log).",
    )

    @model_validator(mode="after")
    def _check(self) -> FloatParam:
        _check_range(self.low, self.high, self.log, self.step)
        return self

    def candidates(self) -> list[Any]:
        return [self.low, self.high]

    def contains(self, value: Any) -> bool:
        return _in_range(value, self.low, self.high, self.step)

    def describe(self) -> str:
        return f"in [{self.low:g}, {self.high:g}]" + (" (log scale)" if self.log else "")


class IntParam(_Param):
    """A whole number in [low, high], optionally on a log scale or every `step`."""

    type: Literal["int"] = Field(description="Picks this kind.")
    low: int = Field(description="The lowest value (> 0 on a log scale).")
    high: int = Field(description="The highest value (>= low).")
    log: bool = Field(default=False, description="Sample on a log scale; needs low > 0.")
    step: int = Field(
        default=1, gt=0, description="Only low, low + step, ... (above 1: not with log)."
    )

    @model_validator(mode="after")
    def _check(self) -> IntParam:
        _check_range(self.low, self.high, self.log, None if self.step == 1 else self.step)
        return self

    def candidates(self) -> list[Any]:
        return [self.low, self.high]

    def contains(self, value: Any) -> bool:
        return float(value).is_integer() and _in_range(value, self.low, self.high, self.step)

    def describe(self) -> str:
        return f"in [{self.low}, {self.high}]" + (" (log scale)" if self.log else "")


class CategoricalParam(_Param):
    """One of a list of plain values."""

    type: Literal["categorical"] = Field(description="Picks this kind.")
    choices: list[Scalar] = Field(
        min_length=1, description="Plain values (numbers, strings, booleans), none repeated."
    )

    @field_validator("choices")
    @classmethod
    def _unique(cls, choices: list[Scalar]) -> list[Scalar]:
        for c in choices:
            if isinstance(c, float) and not math.isfinite(c):
                raise ValueError(f"must hold finite numbers (got {c})")
        for i, c in enumerate(choices):
            for earlier in choices[:i]:
                if earlier != c:
                    continue
                if repr(earlier) == repr(c):
                    raise ValueError(f"must not repeat a value (got {shown(c)} twice)")
                # Optuna stores a choice as its index, found by ==: true would come back as 1.
                raise ValueError(
                    f"must not hold both {_yaml(earlier)} and {_yaml(c)}: they are equal "
                    "(true is 1, false is 0, 1.0 is 1), so Optuna stores them as one choice; "
                    "keep one, or quote one to make it a string"
                )
        return choices

    def candidates(self) -> list[Any]:
        return list(self.choices)

    def contains(self, value: Any) -> bool:
        return value in self.choices

    def describe(self) -> str:
        return f"one of {self.choices}"


def _yaml(value: Scalar) -> str:
    """A choice as the space file wrote it (true, not True)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return shown(value)


class MultipleParam(_Param):
    """A param searched as a multiple of another, e.g. LoRA alpha = rank × {1, 2, 4}.

    The trial records the resolved value; Optuna sees the factor, as `<name>/<of>`.
    """

    type: Literal["multiple"] = Field(description="Picks this kind.")
    of: str = Field(
        description="The option this one multiplies (searched or fixed), e.g. lora_rank."
    )
    factors: list[Annotated[float, Field(allow_inf_nan=False)]] = Field(
        min_length=1,
        description="The value is `of` × one of these (each > 0); Optuna sees the factor as "
        "`NAME/OF` (e.g. `lora_alpha/lora_rank`), the trial records the resolved value.",
    )

    @field_validator("factors")
    @classmethod
    def _positive(cls, factors: list[float]) -> list[float]:
        bad = [f for f in factors if not f > 0]
        if bad:
            raise ValueError(f"must all be > 0 (got {bad[0]:g})")
        return [int(f) if float(f).is_integer() else f for f in factors]

    def optuna_name(self, name: str) -> str:
        return f"{name}/{self.of}"

    def describe(self) -> str:
        return f"{self.of} × one of {self.factors}"


Param = Annotated[
    FloatParam | IntParam | CategoricalParam | MultipleParam, Field(discriminator="type")
]
PARAM_TYPES: dict[str, type[_Param]] = {
    "float": FloatParam,
    "int": IntParam,
    "categorical": CategoricalParam,
    "multiple": MultipleParam,
}


def _check_range(low: float, high: float, log: bool, step: float | None) -> None:
    if low > high:
        raise ValueError(f"low must be <= high (got low={low:g}, high={high:g})")
    if not math.isfinite(high - low):
        # Optuna samples within the width: numpy refuses an infinite one (OverflowError: Range
        # exceeds valid bounds), and every trial would fail before it began.
        raise ValueError(
            f"must span a finite width: high - low overflows (got low={low:g}, high={high:g})"
        )
    if log and low <= 0:
        raise ValueError(f"low must be > 0 on a log scale (got {low:g})")
    if log and step is not None:
        raise ValueError("step and log cannot be used together")


def _in_range(value: Any, low: float, high: float, step: float | None) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if not low - 1e-12 <= value <= high + 1e-12:
        return False
    if step is None:
        return True
    k = (value - low) / step
    return math.isclose(k, round(k), abs_tol=1e-8)


# ----------------------------------------------------------------------------- sections


LOSS_METRICS = ("eval_loss", "perplexity")


class Generation(BaseModel):
    """How a generation objective samples and scores (trials/generate.py)."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(default=256, gt=0, description="Tokens sampled per answer at most.")
    max_samples: int | None = Field(
        default=128,
        gt=0,
        description="Validation prompts scored (the first N, the same for every trial, seeded); "
        "null: all.",
    )
    batch_size: int = Field(default=16, gt=0, description="Prompts sampled at once.")
    temperature_grid: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: [0.2, 0.6, 1.0],
        description="Temperatures the same adapter is also scored at, with no retraining; "
        "`temperature_scores` and `best_temperature` in the trial's user attrs are what an "
        "export samples with. [] to skip.",
    )


class ObjectiveSpec(BaseModel):
    """What a trial is judged on: the validation loss, or a score of sampled answers.

    With a generation metric, after training the adapter samples answers to the validation
    prompts at the trial's `temperature`/`top_p` and the scorer compares each with the reference
    answer (the last assistant turn); the mean is the trial's value. Median pruning still
    compares the validation loss at each evaluation (reported negated in a maximised study).
    A space that searches `temperature` or `top_p` with a loss metric is refused at create:
    sampling cannot change a loss.
    """

    model_config = ConfigDict(extra="forbid")

    metric: str = Field(
        default="eval_loss",
        description="`eval_loss` or `perplexity` (the validation value after the last step, "
        "minimized); or a generation metric: `exact_match` (whitespace aside), `contains`, "
        "`trials.scorers:boxed` (the last \\boxed{}, MATH-500 style), or your own "
        "`(prediction, reference) -> float` as `file.py:function` or `module:function`, loaded "
        "once at create.",
    )
    direction: Literal["minimize", "maximize"] | None = Field(
        default=None,
        description="A loss metric is minimized; a generation metric is maximized unless this "
        "says otherwise.",
    )
    generation: Generation | None = Field(
        default=None,
        description="How a generation metric samples and scores (see `objective.generation`); "
        "only with a generation metric.",
    )

    @property
    def samples(self) -> bool:
        """Whether trials generate answers to be scored."""
        return self.metric not in LOSS_METRICS

    @model_validator(mode="after")
    def _consistent(self) -> ObjectiveSpec:
        if not self.samples:
            if self.direction == "maximize":
                raise ValueError(f"direction: {self.metric} is minimized (got 'maximize')")
            if self.generation is not None:
                raise ValueError(
                    f"generation: applies to a generation metric such as exact_match, "
                    f"not {self.metric}"
                )
            self.direction = "minimize"
        else:
            self.direction = self.direction or "maximize"
            self.generation = self.generation or Generation()
        return self


# A number of seconds, or a duration as people write it: 90, "30m", "2h", "1h30m".
Seconds = Annotated[
    float,
    BeforeValidator(lambda v: parse_duration(v) if isinstance(v, str) else v),
    Field(allow_inf_nan=False),
]


class Budget(BaseModel):
    """When a study stops starting trials, and what it keeps on disk."""

    model_config = ConfigDict(extra="forbid")

    n_trials: int | None = Field(
        default=None,
        gt=0,
        le=MAX_TRIALS,
        description="Finished trials the study aims at: `study run` without --n-trials runs the "
        "rest.",
    )
    timeout: Seconds | None = Field(
        default=None, gt=0, description="Seconds (or 30m, 2h, 1h30m) after which no trial starts."
    )
    keep_adapters: int | None = Field(
        default=5, gt=0, description="Adapters of the best N trials kept on disk; null: all."
    )
    gpu_hours: float | None = Field(
        default=None,
        gt=0,
        description="No trial starts once the study's trials have held this many GPU-hours "
        "(wall time × GPUs per trial, running trials included).",
    )


_NUMBER = r"(\d+(?:\.\d+)?)"
_SECONDS = re.compile(rf"{_NUMBER}\s*s?")
_DURATION = re.compile(rf"(?:{_NUMBER}d)?\s*(?:{_NUMBER}h)?\s*(?:{_NUMBER}m)?\s*(?:{_NUMBER}s)?")
_UNITLESS_TAIL = re.compile(rf".*\d[dhm]\s*{_NUMBER}")  # 2h30: minutes or seconds?


def parse_duration(text: str) -> float:
    """`90`, `90s`, `15m`, `2h`, `1h30m`, `1d` → seconds, > 0 and finite. Every number but a
    lone one carries its unit: `2h30` is refused, not read as 2 h 30 s (nor guessed as 2 h 30
    min). Space fields and the CLI's `--timeout` share it."""
    stripped = text.strip()
    match = _SECONDS.fullmatch(stripped) or _DURATION.fullmatch(stripped)
    if not stripped or match is None or not any(match.groups()):
        hint = ""
        if _UNITLESS_TAIL.fullmatch(stripped):
            hint = "; give every number its unit (2h30m, not 2h30)"
        raise ValueError(
            f"must be seconds or a duration such as 30m, 2h, 1h30m (got {shown(text)}){hint}"
        )
    if match.re is _SECONDS:
        seconds = float(match.group(1))
    else:
        days, hours, minutes, secs = (float(g or 0) for g in match.groups())
        seconds = ((days * 24 + hours) * 60 + minutes) * 60 + secs
    if not math.isfinite(seconds):
        raise ValueError(f"must be a finite duration (got {shown(text)})")
    if seconds <= 0:
        raise ValueError(f"must be > 0 (got {shown(text)})")
    return seconds


class SweepPolicy(BaseModel):
    """How a recurring sweep (`tuner sweep run`) starts from the last one and promotes models."""

    model_config = ConfigDict(extra="forbid")

    warm_start: int = Field(
        default=3, ge=0, description="Best trials of the previous sweep enqueued first."
    )
    margin: float = Field(
        default=0.0,
        ge=0,
        description="A new best replaces the champion only when better by more than this "
        "(in the objective's unit).",
    )
    keep_exports: int = Field(
        default=2, ge=1, description="Exported champions kept on disk, the current one included."
    )


class Resources(BaseModel):
    """What one trial asks of a cluster (the Ray backend places trials by these), and how trials
    that die, hang or are preempted are handled: `max_retries`, `lookahead`, `trial_timeout` and
    `checkpoint_every` apply to both backends."""

    model_config = ConfigDict(extra="forbid")

    gpus_per_trial: float = Field(
        default=1,
        ge=0,
        description="GPUs each trial asks for (the Ray backend places trials by it; GPU-hours "
        "count it). A fraction shares a GPU; above 1, a whole number of ranks on one node that "
        "train the trial as one torch-distributed job (DDP or DeepSpeed).",
    )
    cpus_per_trial: float = Field(
        default=1,
        gt=0,
        description="CPUs the Ray backend reserves for each trial, shared among its ranks.",
    )
    max_retries: int = Field(
        default=2, ge=0, description="Retries of a trial whose worker died (not of its own error)."
    )
    max_identical_failures: int | None = Field(
        default=3,
        ge=0,
        description="A run stops when this many trials in a row fail with the same error (type "
        "and message), names it, and exits 1: a broken set-up (a base model or data that does "
        "not load) fails every trial alike. Diverged (NaN) trials do not count; 0 or null: never.",
    )
    trial_timeout: Seconds | None = Field(
        default=None,
        gt=0,
        description="Seconds (or 30m, 2h) after which a running trial is ended: its worker is "
        "killed (a hang does not answer anything gentler) and the trial fails, not retried.",
    )
    checkpoint_every: int | str | None = Field(
        default=None,
        description="A checkpoint of a running trial (adapter, optimizer, scheduler, RNG states, "
        "step) in the study's artifact store every N optimizer steps (a whole number) or every "
        "so long (30m, 1h); a trial whose worker or node died resumes from its last one. "
        "Null: none, a retry starts again at step 0. The packaged lora_sft*.yaml turn it on.",
    )
    placement_timeout: Seconds = Field(
        default=1200,
        gt=0,
        description="Seconds (or 20m, 1h) a Ray run may wait with no trial placed (its "
        "autoscaler adding nodes, from zero at first) before it fails with one line naming what "
        "a trial asks for and the most any node offered. Default 20m.",
    )
    lookahead: int | None = Field(
        default=None,
        ge=0,
        le=MAX_JOBS,
        description="Trials the driver samples ahead, so that a worker that becomes free starts "
        "one at once (tuner/backends/feed.py). Default: one per trial slot; 0: each worker "
        "samples for itself, as plain Optuna does.",
    )

    @field_validator("checkpoint_every", mode="before")
    @classmethod
    def _steps_or_duration(cls, value: Any) -> Any:
        # A whole number counts optimizer steps; a duration (with its unit) counts time.
        if value is None:
            return None
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        if isinstance(value, str) and not value.strip().isdigit():
            parse_duration(value)  # raises with what is allowed
            return value.strip()
        raise ValueError(
            "must be a whole number of steps above 0 or a duration such as 30m, 1h "
            f"(got {shown(value)})"
        )

    @property
    def checkpoint_steps(self) -> int | None:
        return self.checkpoint_every if isinstance(self.checkpoint_every, int) else None

    @property
    def checkpoint_seconds(self) -> float | None:
        every = self.checkpoint_every
        return parse_duration(every) if isinstance(every, str) else None

    @model_validator(mode="after")
    def _whole_ranks(self) -> Resources:
        if self.gpus_per_trial > 1 and self.gpus_per_trial != int(self.gpus_per_trial):
            raise ValueError(
                f"gpus_per_trial above 1 must be a whole number of GPUs (got {self.gpus_per_trial})"
            )
        return self


class Space(BaseModel):
    """A space file's sections; only `params` and `fixed` are required."""

    # Once validated, `fixed` holds plain values and the paths in it are absolute.

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=500, description="The default study name.")
    description: str = Field(default="", description="One line, shown by `tuner spaces`.")
    params: dict[str, Param] = Field(
        description="What the search changes: one block per searchable option (see `params`). "
        "An option is searched or fixed, not both."
    )
    fixed: dict[str, Any] = Field(
        description="Everything else one trial needs: the trial's options (see `fixed`)."
    )
    objective: ObjectiveSpec = Field(
        default=ObjectiveSpec(), description="What a trial is judged on (see `objective`)."
    )
    sampler: dict[str, Any] = Field(
        default_factory=lambda: dict(algorithms.DEFAULT_SAMPLER),
        description="An Optuna sampler by name (`tpe` alone, or `{name: tpe, ...}`) with the "
        "class's own keyword arguments, checked when the space loads; given options replace the "
        "default's one by one. Each worker process offsets `seed`, so workers never draw the "
        "same random trials, nor do runs of one study at once (each run but the first adds a "
        "random offset; a run alone draws as before). `tpe` is Optuna's TPE that also learns "
        "from trials that failed with a constraint (out of memory, NaN), which Optuna's own TPE "
        "skips.",
    )
    pruner: dict[str, Any] = Field(
        default_factory=lambda: dict(algorithms.DEFAULT_PRUNER),
        description="An Optuna pruner by name with its keyword arguments (`patient` takes "
        "`wrapped:`, another pruner). The reported step is the training step (the Trainer's "
        "global_step), so `n_warmup_steps: 100` means not before step 100; the evaluation "
        "after the last step is reported but never prunes. The default, `reported_median`, is the "
        "median rule over every other trial that reported the step (finished, pruned or still "
        "training), not only finished ones as Optuna's `median`: it can stop a trial at its "
        "first evaluation once 3 others have reported it, and keeps pruning when trials run "
        "in parallel.",
    )
    budget: Budget = Field(
        default=Budget(), description="When the study stops starting trials (see `budget`)."
    )
    resources: Resources = Field(
        default=Resources(),
        description="What a trial asks for, and how dead, hung and preempted trials are "
        "handled (see `resources`).",
    )
    sweep: SweepPolicy = Field(
        default=SweepPolicy(), description="For `tuner sweep run` (see `sweep`)."
    )
    baseline: dict[str, Any] | None = Field(
        default=None,
        description="The point a person would have trained without a search, `{param: "
        "value}`: enqueued as trial 0 (in a nightly sweep, right after the warm-start trials); "
        "params it leaves out take the trial's defaults. `study run` and `study best` report "
        "the margin over it.",
    )
    artifacts: str | None = Field(
        default=None,
        description="Where the study keeps adapters, checkpoints, reports and the tokenised data: "
        "a path (relative to the working directory) or s3://BUCKET/PREFIX; `study create "
        "--artifacts` and $TUNER_ARTIFACTS come first. Default: tuner_artifacts/ beside the store.",
    )

    # -- suggesting

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Suggest every param into `trial`; returns the resolved values (multiples multiplied)."""
        values: dict[str, Any] = {}
        for name, p in self.params.items():
            if isinstance(p, FloatParam):
                values[name] = trial.suggest_float(name, p.low, p.high, log=p.log, step=p.step)
            elif isinstance(p, IntParam):
                values[name] = trial.suggest_int(name, p.low, p.high, log=p.log, step=p.step)
            elif isinstance(p, CategoricalParam):
                values[name] = trial.suggest_categorical(name, p.choices)
        for name, p in self.params.items():
            if isinstance(p, MultipleParam):
                factor = trial.suggest_categorical(p.optuna_name(name), p.factors)
                values[name] = multiply(self.value_of(p.of, values), factor)
        return {name: values[name] for name in self.params}

    def trial_config(self, values: Mapping[str, Any]) -> TrialConfig:
        return TrialConfig.model_validate({**self.fixed, **values})

    def value_of(self, name: str, values: Mapping[str, Any]) -> Any:
        """An option's value: among `values`, else fixed, else the trial's default."""
        if name in values:
            return values[name]
        if name in self.fixed:
            return self.fixed[name]
        return TrialConfig.model_fields[name].default

    # -- the baseline

    def baseline_values(self) -> dict[str, Any] | None:
        """The baseline point, resolved: given values, else the trainer defaults."""
        if self.baseline is None:
            return None
        return {
            name: self.baseline.get(name, TrialConfig.model_fields[name].default)
            for name in self.params
        }

    def misfit(self, values: Mapping[str, Any]) -> tuple[str, str] | None:
        """The first searched param whose value lies outside the space, with what is allowed."""
        for name, p in self.params.items():
            if name not in values:
                return name, "a value (it is missing)"
            value = values[name]
            if isinstance(p, MultipleParam):
                base = self.value_of(p.of, values)
                ok = isinstance(value, int | float) and any(
                    math.isclose(value, base * f) for f in p.factors
                )
                if not ok:
                    return name, f"{p.of} ({base}) × one of {p.factors}"
            elif not p.contains(value):
                return name, p.describe()
        return None

    def optuna_params(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Resolved values → the params Optuna stores (the factor for a multiple)."""
        out: dict[str, Any] = {}
        for name, p in self.params.items():
            if isinstance(p, MultipleParam):
                out[p.optuna_name(name)] = _factor(values[name], self.value_of(p.of, values))
            else:
                out[name] = values[name]
        return out

    # -- storing in a study (read back by tuner.space.reading.from_stored)

    def to_stored(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def multiply(base: Any, factor: float) -> Any:
    """`base` × `factor`, an int when whole: options such as lora_alpha take whole numbers."""
    value = base * factor
    return int(value) if float(value).is_integer() else value


def _factor(value: Any, base: Any) -> Any:
    factor = value / base
    return int(factor) if float(factor).is_integer() else factor
