"""The checks a space goes through once its parts are read (reading.parse_space runs them):

- across its sections: `fixed` names only the workload's options, each range gives values the
  trial accepts, the baseline lies in the space, the objective fits the params and workload;
- against the world: the sampler and pruner by name, the scorer (loaded once), DeepSpeed
  configs, data files and model folders (made absolute), the artifacts location.

Each raises SpaceError with `KEY message`, the caller adds the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from trials.config import SIMULATED_FIELDS, TrialConfig
from tuner.common.errors import SpaceError, did_you_mean
from tuner.common.text import shown
from tuner.search import algorithms
from tuner.space.messages import explain
from tuner.space.models import (
    LOSS_METRICS,
    FloatParam,
    IntParam,
    MultipleParam,
    ObjectiveSpec,
    Param,
    Space,
    multiply,
)

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

# ----------------------------------------------------------------------------- across sections


def check_fixed_keys(fixed: dict[str, Any], params: Mapping[str, Param]) -> None:
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


def check_against_trial_config(space: Space) -> None:
    """Every param's range must produce values the trial accepts, and `fixed` must be complete."""
    defaults = {n: TrialConfig.model_fields[n].default for n in space.params}
    try:
        TrialConfig.model_validate({**space.fixed, **defaults})
    except ValidationError as e:
        raise SpaceError(explain(e, TrialConfig, prefix="fixed")) from None

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
                raise SpaceError(explain(e, TrialConfig, prefix=f"params.{name}")) from None


def _check_multiple(space: Space, name: str, p: MultipleParam) -> None:
    where = f"params.{name}"
    if p.of == name or p.of not in TrialConfig.model_fields:
        raise SpaceError(f"{where}.of must name another option (got {shown(p.of)})")
    of = space.params.get(p.of)
    if isinstance(of, MultipleParam):
        raise SpaceError(f"{where}.of names {p.of}, itself a multiple; chain them through fixed")
    if TrialConfig.model_fields[p.of].annotation not in (int, float):
        raise SpaceError(f"{where}.of names {p.of}, which is not a number")
    bases = of.candidates() if of is not None else [space.value_of(p.of, {})]
    for base in bases:
        for factor in p.factors:
            values = {n: TrialConfig.model_fields[n].default for n in space.params}
            try:
                TrialConfig.model_validate({**space.fixed, **values, name: multiply(base, factor)})
            except ValidationError as e:
                raise SpaceError(explain(e, TrialConfig, prefix=where)) from None


def check_baseline(space: Space) -> None:
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


_SAMPLING = ("temperature", "top_p")


def check_objective(space: Space) -> None:
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


# ----------------------------------------------------------------------------- against the world


def sampler_and_pruner(data: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The space's sampler and pruner in full, each built once now: a bad name or argument
    fails at create rather than in every worker."""
    sampler = algorithms.normalize(
        data.get("sampler"), key="sampler", default=algorithms.DEFAULT_SAMPLER
    )
    pruner = algorithms.normalize(
        data.get("pruner"), key="pruner", default=algorithms.DEFAULT_PRUNER
    )
    algorithms.build_sampler(sampler)
    algorithms.build_pruner(pruner)
    return sampler, pruner


def resolve_scorer(objective: ObjectiveSpec, base_dir: Path) -> None:
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


def artifact_location(url: str, base_dir: Path) -> str:
    """The space's `artifacts:`, checked (a path or s3://BUCKET/PREFIX) and made absolute."""
    from tuner.common.locations import ArtifactsError, parse_location

    try:
        return parse_location(url, source="artifacts", base_dir=base_dir).url
    except ArtifactsError as e:
        raise SpaceError(str(e)) from None


def llama_factory_dataset(dataset: dict[str, Any], base_dir: Path) -> dict[str, Any]:
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


def resolve_local_paths(fixed: dict[str, Any], base_dir: Path) -> None:
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
