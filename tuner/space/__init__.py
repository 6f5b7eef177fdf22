"""Search spaces: a YAML file → validated models → values suggested into an Optuna trial.

A space is plain data under a schema. Every error names the file, the key, what was wrong and
what is allowed, in one line, before anything touches a study store.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from trials import files
from trials.config import SEARCHABLE, SIMULATED_FIELDS, TrialConfig
from tuner.common.errors import SpaceError, did_you_mean
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
                values[name] = _multiply(self._value_of(p.of, values), factor)
        return {name: values[name] for name in self.params}

    def trial_config(self, values: Mapping[str, Any]) -> TrialConfig:
        return TrialConfig.model_validate({**self.fixed, **values})

    def _value_of(self, name: str, values: Mapping[str, Any]) -> Any:
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
                base = self._value_of(p.of, values)
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
                out[p.optuna_name(name)] = _factor(values[name], self._value_of(p.of, values))
            else:
                out[name] = values[name]
        return out

    # -- storing in a study

    def to_stored(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_stored(cls, data: Mapping[str, Any]) -> Space:
        return parse_space(dict(data), resolve_paths=False)


def _multiply(base: Any, factor: float) -> Any:
    value = base * factor
    return int(value) if float(value).is_integer() else value


def _factor(value: Any, base: Any) -> Any:
    factor = value / base
    return int(factor) if float(factor).is_integer() else factor


# ----------------------------------------------------------------------------- YAML


class _SpaceLoader(yaml.SafeLoader):
    """Safe YAML that reads `1e-5` as a number (YAML 1.1 wants `1.0e-5`) and refuses
    repeated keys instead of silently keeping the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice", key_node.start_mark
                )
            seen[key] = True
        return super().construct_mapping(node, deep=deep)


_SpaceLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


MAX_SPACE_BYTES = 10_000_000  # a space is a few KB; bigger is a wrong file, not a space


def read_yaml(path: Path, *, display: str) -> Any:
    # Looked at before it is opened: a FIFO would block, /dev/zero would fill the memory.
    try:
        what = files.kind(path)
        if what is None:
            raise SpaceError(f"{display}: no such file")
        if what == "folder":
            raise SpaceError(f"{display}: is a directory, not a YAML file")
        if what != "file":
            raise SpaceError(f"{display}: is {what}; a space must be a regular YAML file")
        raw = files.read_at_most(path, MAX_SPACE_BYTES)
    except OSError as e:
        raise SpaceError(f"{display}: cannot be read ({e.strerror})") from None
    if len(raw) > MAX_SPACE_BYTES:
        raise SpaceError(
            f"{display}: is larger than {MAX_SPACE_BYTES:,} bytes; a space is a few KB of YAML"
        )
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SpaceError(
            f"{display}: is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})"
        ) from None
    try:
        data = yaml.load(text, Loader=_SpaceLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.constructor.ConstructorError as e:
        where = _mark(e.problem_mark)
        if e.problem and "constructor for the tag" in e.problem:
            tag = e.problem.split("tag", 1)[1].strip().strip("'")
            raise SpaceError(
                f"{display}:{where} YAML tag {tag} is not allowed (a space is plain data)"
            ) from None
        raise SpaceError(f"{display}:{where} {e.problem}") from None
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpaceError(
            f"{display}:{_mark(getattr(e, 'problem_mark', None))} invalid YAML: {problem}"
        ) from None
    if _values(data) > MAX_VALUES:
        # Aliases share one object, so loading a "billion laughs" file is cheap; printing it,
        # validating it or storing it in the study is not.
        raise SpaceError(
            f"{display}: expands to more than {MAX_VALUES:,} values (YAML aliases repeated);"
            " a space is a few dozen"
        )
    return data


MAX_VALUES = 100_000


def _values(data: Any) -> int:
    """How many values `data` holds with every alias expanded; stops counting past the limit."""
    count, stack = 0, [data]
    while stack and count <= MAX_VALUES:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


def _mark(mark: Any) -> str:
    return f" line {mark.line + 1}, column {mark.column + 1}:" if mark is not None else ""


# ----------------------------------------------------------------------------- loading


def packaged_spaces_dir() -> Path:
    """The spaces that ship with tuner: inside the wheel, or beside the package in a checkout."""
    bundled = Path(str(resources.files("tuner"))) / "search_spaces"
    if bundled.is_dir():
        return bundled
    return Path(__file__).resolve().parents[2] / "search_spaces"


def packaged_spaces() -> dict[str, Path]:
    folder = packaged_spaces_dir()
    return {p.name: p for p in sorted(folder.glob("*.yaml"))} if folder.is_dir() else {}


def find_space_file(space: str | Path) -> Path:
    """A path as given, else a bare name among the packaged spaces (`.yaml` may be left out)."""
    path = Path(space).expanduser()
    if path.exists() or path.parent != Path("."):
        return path
    packaged = packaged_spaces()
    for name in (path.name, f"{path.name}.yaml"):
        if name in packaged:
            return packaged[name]
    return path


def load_space(space: str | Path, *, base_dir: Path | None = None) -> Space:
    """Read and validate a space file. Relative paths inside it are read from `base_dir`
    (the working directory by default) and stored absolute."""
    path = find_space_file(space)
    display = str(space)
    data = read_yaml(path, display=display)
    if data is None:
        raise SpaceError(f"{display}: is empty; a space needs at least `params` and `fixed`")
    if not isinstance(data, dict):
        raise SpaceError(f"{display}: must be a mapping of sections (got {type(data).__name__})")
    data.setdefault("name", path.stem)
    try:
        return parse_space(data, base_dir=base_dir or Path.cwd())
    except SpaceError as e:
        raise SpaceError(f"{display}: {e}") from None


_SECTIONS = list(Space.model_fields)
_SIMULATED_KEYS = {"simulated", *SIMULATED_FIELDS}

# What people write for the trial's options, from other tools and blog posts.
ALIASES = {
    "lr": "learning_rate",
    "r": "lora_rank",
    "rank": "lora_rank",
    "alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "target_modules": "lora_target",
    "max_seq_length": "cutoff_len",
    "max_length": "cutoff_len",
    "batch_size": "per_device_train_batch_size",
    "grad_accum": "gradient_accumulation_steps",
    "epochs": "num_train_epochs",
    "model": "model_name_or_path",
    "model_name": "model_name_or_path",
    "scheduler": "lr_scheduler_type",
}


def parse_space(
    data: dict[str, Any], *, base_dir: Path | None = None, resolve_paths: bool = True
) -> Space:
    """Validate a space's data; raises SpaceError with `KEY message` (the caller adds the file)."""
    for key in data:
        if key not in _SECTIONS:
            raise SpaceError(
                f"{key} is not a known section{did_you_mean(key, _SECTIONS)} "
                f"(allowed: {', '.join(_SECTIONS)})"
            )
    for section in ("params", "fixed"):
        if not isinstance(data.get(section), dict) or not data[section]:
            if section not in data or data[section] is None:
                raise SpaceError(f"{section} is required")
            raise SpaceError(f"{section} must be a non-empty mapping (got {shown(data[section])})")

    params = {name: _parse_param(name, spec) for name, spec in data["params"].items()}
    fixed = dict(data["fixed"])
    _check_fixed_keys(fixed, params)
    if resolve_paths and isinstance(fixed.get("dataset"), dict):
        fixed["dataset"] = _llama_factory_dataset(fixed["dataset"], base_dir or Path.cwd())
    sampler = algorithms.normalize(
        data.get("sampler"), key="sampler", default=algorithms.DEFAULT_SAMPLER
    )
    pruner = algorithms.normalize(
        data.get("pruner"), key="pruner", default=algorithms.DEFAULT_PRUNER
    )
    algorithms.build_sampler(sampler)
    algorithms.build_pruner(pruner)

    try:
        space = Space.model_validate(
            {**data, "params": params, "fixed": fixed, "sampler": sampler, "pruner": pruner}
        )
    except ValidationError as e:
        raise SpaceError(_explain(e, Space)) from None

    _check_against_trial_config(space)
    if space.baseline is not None:
        _check_baseline(space)
    _check_objective(space)
    if resolve_paths:
        _resolve_paths(space.fixed, base_dir or Path.cwd())
        _resolve_scorer(space.objective, base_dir or Path.cwd())
        if space.artifacts is not None:
            space.artifacts = _artifact_location(space.artifacts, base_dir or Path.cwd())
    return space


def _artifact_location(url: str, base_dir: Path) -> str:
    """The space's `artifacts:`, checked (a path or s3://BUCKET/PREFIX) and made absolute."""
    from tuner.common.locations import ArtifactsError, parse_location

    try:
        return parse_location(url, source="artifacts", base_dir=base_dir).url
    except ArtifactsError as e:
        raise SpaceError(str(e)) from None


_SAMPLING = ("temperature", "top_p")


def _check_objective(space: Space) -> None:
    """Sampling settings only matter to a metric that samples; a loss cannot rank them."""
    from trials.generate import BUILT_IN

    objective = space.objective
    metric = objective.metric
    if not objective.samples:
        for name in _SAMPLING:
            if name in space.params:
                raise SpaceError(
                    f"params.{name}: sampling does not change {metric}, so searching it with "
                    f"objective.metric {metric} finds nothing; use a generation objective, e.g. "
                    "objective: {metric: exact_match, direction: maximize, "
                    "generation: {max_new_tokens: 256}}"
                )
        return
    if metric not in BUILT_IN and ":" not in metric:
        allowed = [*LOSS_METRICS, *BUILT_IN]
        raise SpaceError(
            f"objective.metric: unknown metric {metric!r}{did_you_mean(metric, allowed)} "
            f"(allowed: {', '.join(allowed)}, or a scorer as file.py:function or module:function)"
        )
    if space.fixed.get("workload", "sft") != "sft":
        raise SpaceError(
            f"objective.metric: {metric} scores generated answers; the "
            f"{space.fixed['workload']} workload generates none (use eval_loss)"
        )


def _resolve_scorer(objective: ObjectiveSpec, base_dir: Path) -> None:
    """A scorer file is made absolute (workers read the same file) and loaded once now, so a
    broken one fails at create rather than after the first trial has trained."""
    from trials.generate import BUILT_IN, ScorerError, load_scorer

    metric = objective.metric
    if not objective.samples or metric in BUILT_IN:
        return
    where, _, attr = metric.rpartition(":")
    if where.endswith(".py"):
        where = str((base_dir / Path(where).expanduser()).resolve())
        objective.metric = f"{where}:{attr}"
    try:
        load_scorer(objective.metric)
    except ScorerError as e:
        raise SpaceError(f"objective.metric: {e}") from None


def _parse_param(name: Any, spec: Any) -> Param:
    where = f"params.{name}"
    if not isinstance(name, str) or name not in SEARCHABLE:
        raise SpaceError(
            f"{where} is not a searchable option{did_you_mean(name, SEARCHABLE, ALIASES)} "
            f"(searchable: {', '.join(sorted(SEARCHABLE))})"
        )
    if not isinstance(spec, dict):
        raise SpaceError(f"{where} must be a mapping with a `type` (got {shown(spec)})")
    kind = spec.get("type")
    if kind is None:
        raise SpaceError(f"{where}.type is required (one of {', '.join(PARAM_TYPES)})")
    if kind not in PARAM_TYPES:
        raise SpaceError(
            f"{where}.type: unknown type {kind!r}{did_you_mean(kind, PARAM_TYPES)} "
            f"(allowed: {', '.join(PARAM_TYPES)})"
        )
    cls = PARAM_TYPES[kind]
    try:
        return cls.model_validate(spec)
    except ValidationError as e:
        raise SpaceError(_explain(e, cls, prefix=where)) from None


def _check_fixed_keys(fixed: dict[str, Any], params: Mapping[str, Param]) -> None:
    # Only the options of the space's workload: the simulated one's knobs mean nothing to a LoRA
    # trial, and must be neither suggested nor silently ignored there. They may also stand
    # beside the others (`steps: 4`), as before they were grouped under `simulated:`; stored
    # studies still have them so.
    simulated = fixed.get("workload") == "simulated"
    fields = [f for f in TrialConfig.model_fields if simulated or f != "simulated"]
    fields += sorted(SIMULATED_FIELDS) if simulated else []
    for key in fixed:
        if key not in fields:
            whose = " (a setting of workload: simulated)" * (key in _SIMULATED_KEYS)
            raise SpaceError(
                f"fixed.{key} is not a known option{whose}{did_you_mean(key, fields, ALIASES)}"
            )
        if key in params:
            raise SpaceError(f"fixed.{key} is also searched in params.{key}; keep one of the two")
    if "dataset" in fixed and isinstance(fixed["dataset"], str):
        # `dataset: data.jsonl` is what people write first; it means an alpaca file.
        fixed["dataset"] = {"path": fixed["dataset"]}


def _check_against_trial_config(space: Space) -> None:
    """Every param's range must produce values the trial accepts, and `fixed` must be complete."""
    defaults = {n: TrialConfig.model_fields[n].default for n in space.params}
    try:
        TrialConfig.model_validate({**space.fixed, **defaults})
    except ValidationError as e:
        raise SpaceError(_explain(e, TrialConfig, prefix="fixed")) from None

    for name, p in space.params.items():
        annotation = TrialConfig.model_fields[name].annotation
        if isinstance(p, FloatParam) and annotation is int:
            raise SpaceError(f"params.{name}: {name} takes whole numbers; use type: int")
        if isinstance(p, IntParam | FloatParam) and annotation not in (int, float):
            raise SpaceError(f"params.{name}: {name} is not a number; use type: categorical")
        if isinstance(p, MultipleParam):
            _check_multiple(space, name, p)
            continue
        for value in p.candidates():
            try:
                TrialConfig.model_validate({**space.fixed, **defaults, name: value})
            except ValidationError as e:
                raise SpaceError(_explain(e, TrialConfig, prefix=f"params.{name}")) from None


def _check_multiple(space: Space, name: str, p: MultipleParam) -> None:
    where = f"params.{name}"
    if p.of == name or p.of not in TrialConfig.model_fields:
        raise SpaceError(f"{where}.of must name another option (got {shown(p.of)})")
    of = space.params.get(p.of)
    if isinstance(of, MultipleParam):
        raise SpaceError(f"{where}.of names {p.of}, itself a multiple; chain them through fixed")
    if TrialConfig.model_fields[p.of].annotation not in (int, float):
        raise SpaceError(f"{where}.of names {p.of}, which is not a number")
    bases = of.candidates() if of is not None else [space._value_of(p.of, {})]
    for base in bases:
        for factor in p.factors:
            values = {n: TrialConfig.model_fields[n].default for n in space.params}
            try:
                TrialConfig.model_validate({**space.fixed, **values, name: _multiply(base, factor)})
            except ValidationError as e:
                raise SpaceError(_explain(e, TrialConfig, prefix=where)) from None


def _check_baseline(space: Space) -> None:
    assert space.baseline is not None
    for key in space.baseline:
        if key not in space.params:
            raise SpaceError(
                f"baseline.{key} is not a searched param{did_you_mean(key, space.params)} "
                f"(params: {', '.join(space.params)})"
            )
    values = space.baseline_values()
    assert values is not None
    misfit = space.misfit(values)
    if misfit is not None:
        name, allowed = misfit
        value = values[name]
        origin = "" if name in space.baseline else f" (not given; the default is {value!r})"
        raise SpaceError(f"baseline.{name} must be {allowed} (got {shown(value)}){origin}")


def _llama_factory_dataset(dataset: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """A `dataset_info` reference or LLaMA-Factory's keys → tuner's, stored so: the workers
    then need only the data file, not the dataset_info.json beside it."""
    from trials.dataset_info import DatasetInfoError, translate

    dataset = dict(dataset)
    ref = dataset.get("dataset_info")
    if isinstance(ref, str) and "#" in ref:
        where, _, name = ref.rpartition("#")
        dataset["dataset_info"] = f"{(base_dir / Path(where).expanduser()).resolve()}#{name}"
    try:
        return translate(dataset)
    except DatasetInfoError as e:
        raise SpaceError(f"fixed.dataset.{e}") from None


def _resolve_paths(fixed: dict[str, Any], base_dir: Path) -> None:
    """Make local paths absolute, so that any worker on this machine reads the same files, and
    fail now on a local path that does not exist. Anything else is taken as a hub id."""
    if fixed.get("workload", "sft") != "sft":
        return
    dataset = fixed["dataset"]
    data_path = dataset["path"]
    if _looks_local(data_path, base_dir, data_file=True):
        resolved = (base_dir / Path(data_path).expanduser()).resolve()
        if not resolved.exists():
            raise SpaceError(
                f"fixed.dataset.path: no such file or directory {str(resolved)!r}"
                + _demo_hint(resolved, base_dir)
            )
        dataset["path"] = str(resolved)
    if fixed.get("deepspeed") is not None:
        fixed["deepspeed"] = _resolve_deepspeed(fixed["deepspeed"], base_dir)
    model = fixed["model_name_or_path"]
    if _looks_local(model, base_dir, data_file=False):
        resolved = (base_dir / Path(model).expanduser()).resolve()
        if not resolved.is_dir():
            raise SpaceError(
                f"fixed.model_name_or_path: no such model directory {str(resolved)!r}"
                + _demo_hint(resolved, base_dir)
            )
        fixed["model_name_or_path"] = str(resolved)


def _demo_hint(missing: Path, base_dir: Path) -> str:
    """What makes the demo's files, when a space (quickstart.yaml) names them under demo/ and
    they are not here yet (`tuner demo prepare` writes that folder)."""
    if missing.is_relative_to((base_dir / "demo").resolve()):
        return "; run `tuner demo prepare` first (it writes demo/ here)"
    return ""


def _resolve_deepspeed(value: Any, base_dir: Path) -> str:
    """A shipped preset stays a name; a path is made absolute and read now (a JSON object)."""
    from trials.config import DEEPSPEED_PRESETS, deepspeed_stage

    allowed = f"allowed: {', '.join(DEEPSPEED_PRESETS)}, or a path to a DeepSpeed JSON"
    if not isinstance(value, str) or not value.strip():
        raise SpaceError(
            f"fixed.deepspeed must be a name or a path ({allowed}; got {shown(value)})"
        )
    if value in DEEPSPEED_PRESETS:
        return value
    path = (base_dir / Path(value).expanduser()).resolve()
    if not path.is_file():
        raise SpaceError(f"fixed.deepspeed: {value!r} is not a preset or a file ({allowed})")
    try:
        deepspeed_stage(str(path))
    except (ValueError, AttributeError, TypeError) as e:
        raise SpaceError(
            f"fixed.deepspeed: {path.name} is not a DeepSpeed JSON object ({e})"
        ) from None
    return str(path)


_DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".arrow")


def _looks_local(value: str, base_dir: Path, *, data_file: bool) -> bool:
    if value.startswith(("/", "./", "../", "~")) or (base_dir / value).exists():
        return True
    return data_file and value.lower().endswith(_DATA_SUFFIXES)


# ----------------------------------------------------------------------------- messages


_MESSAGES = {
    "missing": "is required",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "int_parsing": "must be a whole number",
    "int_type": "must be a whole number",
    "int_from_float": "must be a whole number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "too_short": "must not be empty",
    "finite_number": "must be a finite number",
}
_BOUNDS = {
    "greater_than": ">",
    "greater_than_equal": ">=",
    "less_than": "<",
    "less_than_equal": "<=",
}


def _explain(error: ValidationError, model: type[BaseModel], *, prefix: str = "") -> str:
    """The first pydantic error as `key message (got value)`."""
    err = error.errors()[0]
    loc = [part for part in err["loc"] if isinstance(part, int) or not _is_type_tag(part)]
    key = ".".join(
        [prefix] * bool(prefix) + [str(p) if isinstance(p, str) else f"[{p}]" for p in loc]
    ).replace(".[", "[")
    kind = err["type"]
    got = f" (got {shown(err['input'])})" if kind != "missing" else ""
    if kind == "extra_forbidden":
        fields = _fields_at(model, loc[:-1])
        hint = did_you_mean(loc[-1], fields)
        return f"{key} is not a known key{hint} (allowed: {', '.join(fields)})"
    if kind == "literal_error":
        return f"{key} must be {err['ctx']['expected']}{got}"
    if kind in _BOUNDS:
        (bound,) = err["ctx"].values()
        if isinstance(bound, int | float):
            bound = f"{bound:,}" if isinstance(bound, int) else f"{bound:g}"
        return f"{key} must be {_BOUNDS[kind]} {bound}{got}"
    if kind in _MESSAGES:
        return f"{key} {_MESSAGES[kind]}{got}"
    message = err["msg"].removeprefix("Value error, ")
    first = message.split(" ", 1)[0]
    if first == "must":
        return f"{key} {message}"
    if not loc and first in model.model_fields:  # a check across fields names the field first
        return f"{key}.{message}"
    return f"{key}: {message}"


def _is_type_tag(part: str) -> bool:
    # pydantic names the union member it tried (`str`, `list[str]`, `function-after[...]`).
    return part in {"str", "int", "float", "bool", "none", "list", "dict"} or "[" in part


def _fields_at(model: type[BaseModel], loc: list[Any]) -> list[str]:
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        annotation = getattr(field, "annotation", None)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
    return list(model.model_fields)
