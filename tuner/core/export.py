"""`tuner study export`: the best trial (or trial N) as a checkpoint plain transformers loads.

The adapter comes from the study's artifact store, the base model from the stored space; peft
merges them. Before anything is declared done the merged model is checked against base + adapter
(logits within a dtype tolerance, the same greedy tokens) and against the trial itself (the
validation loss it recorded), so a corrupted or mismatched adapter is refused. Everything is
written into a temporary folder beside the destination and renamed at the end: an error or
Ctrl-C leaves nothing behind. Where an export may go, and what it may replace, is
tuner.core.destination's business: never the working directory, the model or the store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from trials.quiet import quiet_libraries
from tuner.common.errors import ExportError
from tuner.common.extras import DISTRIBUTION
from tuner.core import destination
from tuner.store import (
    attrs,
    best_trial,
    better,
    counts_as_best,
    mask_url,
    open_artifacts,
    open_study,
)
from tuner.trial.objective import ADAPTER_FILES

logger = logging.getLogger(__name__)

PROVENANCE = destination.PROVENANCE
# Largest |merged - unmerged| logit allowed, by the dtype the trial trained in: merging changes
# the order of the additions, which moves half-precision logits by a few ulps of their size.
LOGIT_TOLERANCE = {"torch.float32": 1e-3, "torch.float16": 5e-2, "torch.bfloat16": 2.5e-1}
# How far the merged model's validation loss may be from the trial's own (relative).
LOSS_TOLERANCE = {"torch.float32": 1e-3, "torch.float16": 1e-2, "torch.bfloat16": 2e-2}
VERIFY_PROMPTS = 4
VERIFY_TOKENS = 16


@dataclass
class Verification:
    prompts: int
    max_logit_diff: float
    logit_tolerance: float
    greedy_tokens_equal: bool
    val_loss: float
    trial_val_loss: float | None
    loss_tolerance: float
    # A QLoRA trial (4 or 8): its adapter is checked on the k-bit base it trained on
    # (`kbit_val_loss` against the trial's), and merged into the unquantised base (`val_loss`).
    quantization_bit: int | None = None
    kbit_val_loss: float | None = None
    passed: bool = False
    problems: list[str] = field(default_factory=list)


@dataclass
class ExportReport:
    out: str
    trial: int
    value: float
    adapter_only: bool
    temperature: float
    top_p: float
    verification: Verification
    seconds: float


def export_trial(
    name: str,
    *,
    out: Path,
    storage: str | None = None,
    trial_number: int | None = None,
    adapter_only: bool = False,
    force: bool = False,
) -> ExportReport:
    started = time.perf_counter()
    out = destination.requested(out)
    opened = open_study(name, storage)
    study, space = opened.study, opened.space
    trial = _pick(study, trial_number)
    if not trial.user_attrs.get(attrs.ADAPTER):
        dropped = trial.user_attrs.get(attrs.ADAPTER_DROPPED)
        why = f"{dropped}, budget.keep_adapters" if dropped else "the workload trains none"
        raise ExportError(f"trial {trial.number} has no adapter in the artifact store ({why})")
    config = space.trial_config(trial.user_attrs[attrs.HPARAMS])
    keep, inside = destination.protected(opened, config, space.fixed)
    destination.check(out, keep=keep, inside=inside, force=force)

    quiet_libraries()  # before the training stack is imported: DeepSpeed warns as it is
    tmp = destination.staging(out)
    try:
        adapter_dir = tmp / ".adapter"
        _fetch_adapter(opened.artifacts, trial, adapter_dir)
        temperature, top_p = _sampling(trial, config)
        verification = _build(
            config, adapter_dir, tmp, trial=trial, adapter_only=adapter_only,
            temperature=temperature, top_p=top_p,
        )  # fmt: skip
        provenance = _provenance(
            opened, trial, config, verification, temperature=temperature, top_p=top_p,
            adapter_only=adapter_only,
        )  # fmt: skip
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2, default=str) + "\n")
        (tmp / "README.md").write_text(_model_card(provenance))
        shutil.rmtree(adapter_dir)
        _as_umask_allows(tmp)
        destination.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if destination.failed_writing(e, tmp):  # a full disk says so, and names where
            raise destination.write_error(out, e) from None
        raise
    return ExportReport(
        out=str(out),
        trial=trial.number,
        value=trial.value,
        adapter_only=adapter_only,
        temperature=temperature,
        top_p=top_p,
        verification=verification,
        seconds=time.perf_counter() - started,
    )


def _pick(study: optuna.Study, number: int | None) -> FrozenTrial:
    if number is None:
        best = best_trial(study)
        if best is None:
            raise ExportError(f"study {study.study_name!r} has no completed trial to export")
        return best
    trials = study.get_trials(deepcopy=False)
    if not 0 <= number < len(trials):
        raise ExportError(f"--trial {number}: the study has trials 0..{len(trials) - 1}")
    trial = trials[number]
    if not counts_as_best(trial):
        raise ExportError(
            f"--trial {number} is {trial.state.name}; only a COMPLETE trial with a finite value "
            "can be exported"
        )
    return trial


def _fetch_adapter(artifacts: str, trial: FrozenTrial, dest: Path) -> None:
    store = open_artifacts(artifacts)
    dest.mkdir(parents=True)
    for file_name in ADAPTER_FILES:
        artifact_id = trial.user_attrs[attrs.ADAPTER].get(file_name)
        try:
            optuna.artifacts.download_artifact(
                artifact_store=store, file_path=str(dest / file_name), artifact_id=artifact_id
            )
        except Exception as e:  # noqa: BLE001 - missing file, dropped adapter, bad store
            if destination.out_of_space(e):
                raise  # the export's disk, not the artifact store: export_trial says so
            raise ExportError(
                f"trial {trial.number}'s {file_name} is not in the artifact store at "
                f"{artifacts} ({type(e).__name__}); was it dropped by budget.keep_adapters?"
            ) from None


def _sampling(trial: FrozenTrial, config: Any) -> tuple[float, float]:
    """The temperature the export samples with: the grid's best when the generation objective
    scored one, else the trial's own."""
    best = trial.user_attrs.get(attrs.BEST_TEMPERATURE)
    return float(best if best is not None else config.temperature), float(config.top_p)


def _build(
    config: Any,
    adapter_dir: Path,
    dest: Path,
    *,
    trial: FrozenTrial,
    adapter_only: bool,
    temperature: float,
    top_p: float,
) -> Verification:
    """Merge the trial's adapter into its base, check the merge (ExportError when it is not the
    trial's model), then write the export into `dest`; returns what the check measured."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    dtype = torch.bfloat16 if config.bf16 else torch.float16 if config.fp16 else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(
        config.model_name_or_path, trust_remote_code=config.trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    val = _validation(config, tokenizer)
    bits = config.quantization_bit
    kbit_loss = _kbit_val_loss(config, adapter_dir, val) if bits is not None else None

    base = _unquantised_base(config, dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = PeftModel.from_pretrained(base.to(device), str(adapter_dir)).eval()
    merged, check = _merge_and_measure(
        model, tokenizer, val, config, dtype=dtype, device=device,
        trial_val_loss=trial.user_attrs.get("eval_loss"), kbit_val_loss=kbit_loss,
    )  # fmt: skip
    _judge(check, dtype)
    _save(
        merged, tokenizer, config, adapter_dir, dest,
        adapter_only=adapter_only, temperature=temperature, top_p=top_p,
    )  # fmt: skip
    return check


def _unquantised_base(config: Any, dtype: Any) -> Any:
    """The base as published, unquantised in the training dtype, for a QLoRA adapter too: a
    merge into k-bit weights would round the adapter's delta away."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        config.model_name_or_path,
        dtype=dtype,
        trust_remote_code=config.trust_remote_code,
        use_safetensors=True,
    )


def _merge_and_measure(
    model: Any,
    tokenizer: Any,
    val: list[dict],
    config: Any,
    *,
    dtype: Any,
    device: str,
    trial_val_loss: float | None,
    kbit_val_loss: float | None,
) -> tuple[Any, Verification]:
    """Merge the adapter into `model`'s base; returns the merged model, and how it compares
    with base + adapter (logits, greedy tokens) and with the trial (validation loss), for
    `_judge`."""
    prompts = [row["prompt"] for row in val[:VERIFY_PROMPTS]]
    before = _logits_and_greedy(model, tokenizer, prompts, device)
    merged = model.merge_and_unload()
    after = _logits_and_greedy(merged, tokenizer, prompts, device)
    check = Verification(
        prompts=len(prompts),
        max_logit_diff=max(
            float((a - b).abs().max()) for a, b in zip(before[0], after[0], strict=True)
        ),
        logit_tolerance=LOGIT_TOLERANCE[str(dtype)],
        greedy_tokens_equal=before[1] == after[1],
        val_loss=_val_loss(merged, val, device, config.per_device_eval_batch_size),
        trial_val_loss=trial_val_loss,
        loss_tolerance=LOSS_TOLERANCE[str(dtype)],
        quantization_bit=config.quantization_bit,
        kbit_val_loss=kbit_val_loss,
    )
    return merged, check


def _judge(check: Verification, dtype: Any) -> None:
    """Record what is wrong with the merge in `check.problems` and refuse it (ExportError);
    else mark it passed."""
    if not check.max_logit_diff <= check.logit_tolerance:
        check.problems.append(
            f"merged logits differ from base + adapter by {check.max_logit_diff:.3g} "
            f"(tolerance {check.logit_tolerance:g} for {dtype})"
        )
    if not check.greedy_tokens_equal:
        check.problems.append("merged and base + adapter pick different greedy tokens")
    if check.trial_val_loss is not None:
        # The trial's loss was measured on its k-bit base: the unquantised merge differs by
        # the quantisation's error, so a QLoRA adapter is compared on the k-bit base.
        kbit_loss, bits = check.kbit_val_loss, check.quantization_bit
        loss = check.val_loss if kbit_loss is None else kbit_loss
        on = "" if kbit_loss is None else f" on the {bits}-bit base"
        gap = abs(loss - check.trial_val_loss) / max(abs(check.trial_val_loss), 1e-8)
        if not gap <= check.loss_tolerance:
            check.problems.append(
                f"validation loss{on} {loss:.4f} is not the trial's "
                f"{check.trial_val_loss:.4f} (relative gap {gap:.3g}, tolerance "
                f"{check.loss_tolerance:g}): the adapter is not the one that trained"
            )
    if check.problems:
        raise ExportError("verification failed: " + "; ".join(check.problems))
    check.passed = True


def _save(
    merged: Any,
    tokenizer: Any,
    config: Any,
    adapter_dir: Path,
    dest: Path,
    *,
    adapter_only: bool,
    temperature: float,
    top_p: float,
) -> None:
    """Write the merged model (or the adapter alone), its tokenizer, and a generation config
    that samples as the trial was judged."""
    from transformers import GenerationConfig

    generation = _generation_config(GenerationConfig, config.model_name_or_path, tokenizer)
    generation.update(do_sample=True, temperature=temperature, top_p=top_p)
    if adapter_only:
        for file_name in ADAPTER_FILES:
            shutil.copy2(adapter_dir / file_name, dest / file_name)
    else:
        merged.save_pretrained(dest, safe_serialization=True, max_shard_size="5GB")
    tokenizer.save_pretrained(dest)
    generation.save_pretrained(dest)


def _kbit_val_loss(config: Any, adapter_dir: Path, val: list[dict]) -> float:
    """The adapter's validation loss on the k-bit base its QLoRA trial trained on, loaded as the
    trial loaded it; the model is freed before the unquantised merge is loaded."""
    import importlib.util

    import torch
    from peft import PeftModel

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ExportError(
            f"the trial trained on a {config.quantization_bit}-bit base (quantization_bit), and "
            "checking its adapter there needs bitsandbytes: pip install 'lora-tuner[qlora]'"
        )
    from trials.sft import load_base

    base = load_base(config)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    try:
        return _val_loss(model, val, str(base.device), config.per_device_eval_batch_size)
    finally:
        del model, base
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _validation(config: Any, tokenizer: Any) -> list[dict[str, Any]]:
    """The trial's validation rows (same split, same tokens) with their prompt part."""
    from trials import data as data_mod
    from trials.chat import prompt_ids

    rows = data_mod.prepare(config, tokenizer).val
    return [
        {"input_ids": ids, "labels": labels, "prompt": prompt_ids(ids, labels)}
        for ids, labels in zip(rows["input_ids"], rows["labels"], strict=True)
    ]


def _logits_and_greedy(model: Any, tokenizer: Any, prompts: list, device: str) -> tuple:
    import torch

    logits, tokens = [], []
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt], device=device)
            logits.append(model(input_ids=ids).logits[0].float().cpu())
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=VERIFY_TOKENS,
                pad_token_id=pad,
            )
            tokens.append(out[0, len(prompt) :].tolist())
    return logits, tokens


def _val_loss(model: Any, val: list[dict], device: str, batch_size: int) -> float:
    """The validation loss as the Trainer computes `eval_loss`: each batch's mean token
    cross-entropy, averaged over the examples (a batch of 8 weighs 8). A mean over all tokens
    differs from it by up to a few tenths of a percent, more than the float32 tolerance."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(val), batch_size):
            batch = val[start : start + batch_size]
            width = max(len(r["input_ids"]) for r in batch)
            ids = torch.tensor(
                [r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in batch], device=device
            )
            labels = torch.tensor(
                [r["labels"] + [-100] * (width - len(r["labels"])) for r in batch], device=device
            )
            mask = (torch.arange(width, device=device)[None, :] < torch.tensor(
                [len(r["input_ids"]) for r in batch], device=device
            )[:, None]).long()  # fmt: skip
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            shifted = labels[:, 1:]
            losses = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)),
                shifted.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            tokens = int((shifted != -100).sum())
            total += float(losses) / max(tokens, 1) * len(batch)
            count += len(batch)
    return total / max(count, 1)


def _generation_config(cls: Any, model: str, tokenizer: Any) -> Any:
    try:
        return cls.from_pretrained(model)
    except OSError:  # the base ships none
        return cls(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def _as_umask_allows(folder: Path) -> None:
    """The modes a plain `save_pretrained` gives (0755 folders, 0644 files under umask 022), so
    that a serving account can read the export: `mkdtemp` makes its folder 0700, and the weights
    are written 0600."""
    umask = os.umask(0)  # the only way to read it; set back at once
    os.umask(umask)
    for path in (folder, *folder.rglob("*")):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


# ----------------------------------------------------------------------------- provenance


def _provenance(
    opened: Any,
    trial: FrozenTrial,
    config: Any,
    verification: Verification,
    *,
    temperature: float,
    top_p: float,
    adapter_only: bool,
) -> dict[str, Any]:
    study = opened.study
    finished = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    finished = [t for t in finished if counts_as_best(t)]
    rank = 1 + sum(better(t.value, trial.value, study.direction) for t in finished)
    return {
        "format": "tuner-export/1",
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "kind": "adapter" if adapter_only else "merged",
        "study": {
            "name": study.study_name,
            "storage": mask_url(opened.url),
            "artifacts": mask_url(opened.artifacts),
            "metric": opened.space.objective.metric,
            "direction": study.direction.name.lower(),
            "completed_trials": len(finished),
        },
        "trial": {
            "number": trial.number,
            "value": trial.value,
            "rank": rank,
            "params": trial.user_attrs.get(attrs.HPARAMS, trial.params),
            "eval_loss": trial.user_attrs.get("eval_loss"),
            "steps": trial.user_attrs.get("steps"),
            "temperature_scores": trial.user_attrs.get("temperature_scores"),
        },
        "base_model": config.model_name_or_path,
        "dtype": "bfloat16" if config.bf16 else "float16" if config.fp16 else "float32",
        # QLoRA: the adapter trained on this k-bit form of the base (null: the base as it is).
        "trained_on_quantized_base": _quantization(config.quantization_bit),
        "dataset": {**config.dataset.model_dump(), "sha256": _dataset_hash(config.dataset.path)},
        "generation": {"temperature": temperature, "top_p": top_p},
        "verification": asdict(verification),
        "versions": _versions(),
    }


def _quantization(bits: int | None) -> dict[str, Any] | None:
    """How trials/sft.py quantised the base for a QLoRA trial, as the provenance states it."""
    if bits is None:
        return None
    if bits == 4:
        return {"bits": 4, "method": "bitsandbytes", "type": "nf4", "double_quant": True}
    return {"bits": 8, "method": "bitsandbytes", "type": "llm.int8"}


def _dataset_hash(path: str) -> str | None:
    """sha256 of the data file (or of a folder's files in name order); None for a hub id."""
    target = Path(path)
    if not target.exists():
        return None
    files = [target] if target.is_file() else sorted(p for p in target.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        with file.open("rb") as f:
            for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    out = {}
    for package in (
        DISTRIBUTION, "torch", "transformers", "peft", "trl", "optuna", "deepspeed", "bitsandbytes",
    ):  # fmt: skip
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return out


def _model_card(p: dict[str, Any]) -> str:
    trial, study, check = p["trial"], p["study"], p["verification"]
    params = "\n".join(f"| `{k}` | {v} |" for k, v in trial["params"].items())
    versions = ", ".join(f"{k} {v}" for k, v in p["versions"].items())
    sha = p["dataset"]["sha256"] or "(hub data set: no local file)"
    recorded = check["trial_val_loss"]
    recorded = (
        f" (the trial recorded {recorded:.4f})"
        if recorded is not None and math.isfinite(recorded)
        else ""
    )
    loss = f"{check['val_loss']:.4f}{recorded}"
    precision = f"trained and saved in {p['dtype']}"
    quantized = p["trained_on_quantized_base"]
    if quantized is not None:
        bits = quantized["bits"]
        form = "NF4 with double quantization" if bits == 4 else "LLM.int8"
        precision = f"the adapter was trained on its {bits}-bit form ({form}, QLoRA)"
        if p["kind"] == "merged":
            precision += f", and merged into the unquantised base, saved in {p['dtype']}"
        loss = (
            f"{check['kbit_val_loss']:.4f} on the {bits}-bit base{recorded}, "
            f"{check['val_loss']:.4f} merged into the unquantised base"
        )
    sampling = p["generation"]
    top_p = sampling["top_p"]
    greedy = "identical" if check["greedy_tokens_equal"] else "different"
    how = (
        "a PEFT adapter for the base model below"
        if p["kind"] == "adapter"
        else "the base model with the LoRA adapter merged in: load it with "
        "`AutoModelForCausalLM.from_pretrained`"
    )
    return f"""---
base_model: {p["base_model"]}
library_name: {"peft" if p["kind"] == "adapter" else "transformers"}
tags: [lora, tuner, optuna]
---

# {study["name"]}, trial {trial["number"]}

This is {how}. It is trial {trial["number"]} of the `tuner` study `{study["name"]}`,
ranked {trial["rank"]} of {study["completed_trials"]} completed trials on `{study["metric"]}`
({study["direction"]}d): {trial["value"]:.6g}.

| hyperparameter | value |
|---|---|
{params}

- Base model: `{p["base_model"]}`, {precision}
- Data set: `{p["dataset"]["path"]}` ({p["dataset"]["format"]}), sha256 `{sha}`
- Sampling (generation_config.json): temperature {sampling["temperature"]:g}, top_p {top_p:g}
- Study store: `{study["storage"]}`
- Exported {p["exported_at"]} with {versions}

## Verification

Before export, the merged model was compared with base + adapter on {check["prompts"]}
validation prompts: largest logit difference {check["max_logit_diff"]:.3g} (tolerance
{check["logit_tolerance"]:g}), greedy tokens {greedy};
validation loss {loss}.

Provenance in machine-readable form: `{PROVENANCE}`.
"""
