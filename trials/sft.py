"""One trial: a LoRA fine-tune of a causal language model with TRL's SFTTrainer.

`tuner` runs it once per trial with the values Optuna suggested. It also runs by hand, with
fixed values, from a YAML of TrialConfig fields (the `fixed` section of a space plus values):

    python -m trials.sft params.yaml --out runs/one     # adapter/ and result.json in runs/one

Steps, in order: tokenizer (the data needs it) → base model → data → LoRA trainer → train,
reporting each validation loss → final validation → adapter saved as safetensors.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from trials import data as data_mod
from trials.callbacks import trainer_callback
from trials.checkpoint import CheckpointCallback, Keeper
from trials.config import TrialConfig, deepspeed_config, deepspeed_stage
from trials.evaluate import best_eval_step, final_metrics, last_train_loss
from trials.generate import score_adapter
from trials.pruning import PruningCallback
from trials.reporter import NonFiniteLoss, TrialResult
from trials.speed import Clock, StepTimer
from trials.tracking import Tracking, tracking_callbacks, trainer_args

logger = logging.getLogger(__name__)


def run(
    config: TrialConfig,
    *,
    output_dir: Path,
    trial: Any | None = None,
    timings: dict[str, float] | None = None,
    data_cache: Path | None = None,
    shared_cache: Any | None = None,
    generation: Any | None = None,
    checkpoints: Keeper | None = None,
    tracking: Tracking | None = None,
) -> TrialResult:
    """Train one LoRA adapter. With an Optuna `trial`, each evaluation is reported to it and the
    run stops at once (raising `optuna.TrialPruned`) when the pruner says so.

    `timings` (seconds per phase) fills in as the run goes, so a caller still has them when the
    run is pruned or fails midway. `data_cache` is a folder shared by the study's workers where
    the tokenised data is saved once and loaded by the others; without it each process tokenises.
    On nodes that share no folder, `data_cache` is the node's own and `shared_cache` (see
    `trials.data.SharedCache`) carries the entries between nodes.
    With `generation` (a space's objective whose metric scores sampled answers), the trained
    adapter then answers the validation prompts and `score` holds their mean score. With
    `checkpoints` (trials/checkpoint.py), the run resumes from the keeper's checkpoint, if it has
    one, and keeps one as often as the keeper asks. With `tracking`, the Trainer reports the run
    there too (MLflow, TensorBoard, W&B).
    """
    # The meters first: the GPU-hours count the whole trial, and the peak memory this trial's
    # alone (a worker runs one trial after another).
    timings = {} if timings is None else timings
    clock = Clock(timings)
    started = _start_usage()

    # The tokenizer before the data, which is tokenised with it.
    tokenizer = _setup_tokenizer(config)
    # The training arguments before the base: under ZeRO-3 they make `from_pretrained` load it
    # already partitioned over the ranks (they hold the HfDeepSpeedConfig it reads), instead of
    # whole on every rank first. They stay referenced (the attempt) for as long as the model.
    args = _training_args(config, output_dir, tracking)
    base = _Base(model=_setup_model(config))  # not a local: a retry must be able to free it
    clock.lap("load_s")

    # The data once the base has loaded: it needs only the tokenizer, and a base that cannot
    # load (a wrong name, too little memory) fails the trial before any tokenising.
    data = data_mod.prepare(config, tokenizer, cache_dir=data_cache, shared=shared_cache)
    clock.lap("data_s")

    # The checkpoint last, just before training: its restore is timed apart (restore_s), and a
    # trial whose set-up failed never fetches one.
    resume = _setup_resume(checkpoints, output_dir=output_dir, clock=clock)

    # Train: one attempt, a second with half the batch when the first runs out of GPU memory.
    attempt = _Attempt(
        config=config,
        args=args,
        resume=resume,
        tokenizer=tokenizer,
        data=data,
        output_dir=output_dir,
        trial=trial,
        timings=timings,
        clock=clock,
        generation=generation,
        checkpoints=checkpoints,
        tracking=tracking,
    )
    attempt, trained, oom_retries = _train_retrying_oom(attempt, base)
    # The result after training, from the final attempt: its batch is the one that fitted.
    return _result(attempt, trained, oom_retries=oom_retries, started=started)


@dataclass(frozen=True, kw_only=True)
class _Attempt:
    """What an attempt at the trial trains with; an out-of-memory retry is a second attempt
    with a smaller per-device batch."""

    # What changes between attempts.
    config: TrialConfig
    args: Any  # the SFTConfig of `config`; made before the base is loaded (see `run`)
    resume: Path | None  # the checkpoint this attempt resumes from
    # What every attempt of the trial shares.
    tokenizer: Any
    data: data_mod.Tokenized
    output_dir: Path
    trial: Any | None  # the Optuna trial to report to; None: a run by hand
    timings: dict[str, float]
    clock: Clock
    generation: Any | None  # the generation objective's settings, when it scores answers
    checkpoints: Keeper | None  # where checkpoints are kept, when the trial keeps them
    tracking: Tracking | None  # where the run is reported, besides the Optuna trial


@dataclass
class _Base:
    """The base model the attempts train on, held here alone (and in `_BASES` when the worker
    keeps it): an out-of-memory retry drops it before loading it again, so that a base which
    cannot serve twice (ZeRO-3's, or one whose adapter stayed on) leaves memory first."""

    model: Any


@dataclass(frozen=True, kw_only=True)
class _Trained:
    """What one attempt left."""

    trainer: Any
    metrics: dict[str, float]
    adapter_dir: Path
    trainable_params: int
    total_params: int
    scores: tuple[float, dict[str, float]] | None  # mean score, and by temperature


def _start_usage() -> float:
    """When the trial started, for its GPU-hours; the GPU's peak-memory count starts again."""
    import torch

    started = time.perf_counter()
    if _has_cuda():
        torch.cuda.reset_peak_memory_stats()
    return started


def _setup_resume(checkpoints: Keeper | None, *, output_dir: Path, clock: Clock) -> Path | None:
    """The checkpoint the keeper has for this trial, fetched; None: it starts at step 0."""
    if checkpoints is None:
        return None
    resume = checkpoints.restore(output_dir / "resume")
    clock.lap("restore_s")
    return resume


def _train_retrying_oom(attempt: _Attempt, base: _Base) -> tuple[_Attempt, _Trained, int]:
    """Train `attempt` on the base; out of GPU memory, once more with half the per-device batch
    (`_can_retry_oom` says when). Returns the attempt that trained, what it left and how many
    times the batch was halved."""
    import torch

    oom_retries = 0
    while True:
        try:
            return attempt, _train(attempt, base.model), oom_retries
        except torch.OutOfMemoryError as e:  # torch.cuda's is this class
            reason = _first_line(e)
            if oom_retries:
                raise torch.OutOfMemoryError(
                    f"{reason} (at per-device batch {attempt.config.per_device_train_batch_size}, "
                    "already halved once)"
                ) from None
            if not _can_retry_oom(attempt.config):
                raise
        # Outside the except block: the traceback held the failed step's tensors until here.
        base.model = None
        _release_memory()
        attempt = _smaller_attempt(attempt, reason)
        oom_retries += 1
        base.model = _setup_model(attempt.config)  # the kept base when it survived, else loaded


def _smaller_attempt(attempt: _Attempt, reason: str) -> _Attempt:
    """The attempt after one that ran out of memory, with half its per-device batch. The
    checkpoint was of the larger batch: the smaller one starts again at step 0."""
    smaller = _halved_batch(attempt.config, reason)
    return dataclasses.replace(
        attempt,
        config=smaller,
        args=_training_args(smaller, attempt.output_dir, attempt.tracking),
        resume=None,
    )


def _halved_batch(config: TrialConfig, reason: str) -> TrialConfig:
    smaller = {
        "per_device_train_batch_size": config.per_device_train_batch_size // 2,
        "gradient_accumulation_steps": config.gradient_accumulation_steps * 2,
    }
    logger.warning(
        "out of memory at per-device batch %d (%s); retrying with batch %d x accumulation %d",
        config.per_device_train_batch_size,
        reason,
        smaller["per_device_train_batch_size"],
        smaller["gradient_accumulation_steps"],
    )
    return config.model_copy(update=smaller)


def _result(
    attempt: _Attempt, trained: _Trained, *, oom_retries: int, started: float
) -> TrialResult:
    """The trial's result: what the final attempt trained, on which data, at what cost."""
    config, data, trainer = attempt.config, attempt.data, trained.trainer
    return TrialResult(
        score=trained.scores[0] if trained.scores else None,
        temperature_scores=trained.scores[1] if trained.scores else {},
        eval_loss=trained.metrics["eval_loss"],
        perplexity=trained.metrics["perplexity"],
        train_loss=last_train_loss(trainer),
        steps=trainer.state.global_step,
        tokens_seen=int(trainer.state.num_input_tokens_seen),
        trainable_params=trained.trainable_params,
        total_params=trained.total_params,
        truncation_ratio=data.truncation_ratio,
        data_source=data.source,
        deepspeed_stage=deepspeed_stage(config.deepspeed) if trainer.is_deepspeed_enabled else 0,
        best_eval_step=best_eval_step(trainer),
        per_device_train_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        oom_retries=oom_retries,
        quantization_bit=config.quantization_bit,
        **_usage(trainer, attempt.timings, started),
        adapter_dir=str(trained.adapter_dir),
        timings=attempt.timings,
    )


def _train(attempt: _Attempt, model: Any) -> _Trained:
    """One attempt: a fresh adapter on `model`, trained, evaluated and saved; the adapter is
    taken off the base again whatever happens."""
    import transformers

    config, timings, clock = attempt.config, attempt.timings, attempt.clock
    # Seed after loading and before the adapter is created: LoRA's initial weights and the data
    # order then depend on the seed alone, not on what this process ran before.
    transformers.set_seed(config.seed)
    trainer = _setup_trainer(
        config,
        model,
        attempt.tokenizer,
        attempt.data,
        attempt.args,
        trial=attempt.trial,
        checkpoints=attempt.checkpoints,
        tracking=attempt.tracking,
    )
    clock.lap("setup_s")
    try:
        try:
            trainer.train(resume_from_checkpoint=str(attempt.resume) if attempt.resume else None)
            metrics = final_metrics(trainer)
        finally:
            clock.lap("train_s")
            timings["store_s"] = timings.get("store_s", 0.0) + trainer.pruning.store_seconds

        adapter_dir = attempt.output_dir / "adapter"
        # The Trainer's own save: under ZeRO-3 it gathers the sharded LoRA weights first (a
        # plain save_pretrained would write empty tensors); safetensors, tokenizer included.
        trainer.save_model(str(adapter_dir))
        clock.lap("save_s")
        trainable, total = _count_params(trainer.model)
        # Scored while the adapter is still on the base (`_release` below takes it off).
        scores = _score(attempt, trainer.model)
    finally:
        timings["stopped_at_step"] = trainer.state.global_step
        _release(trainer)
    return _Trained(
        trainer=trainer,
        metrics=metrics,
        adapter_dir=adapter_dir,
        trainable_params=trainable,
        total_params=total,
        scores=scores,
    )


def _score(attempt: _Attempt, model: Any) -> tuple[float, dict[str, float]] | None:
    """With a generation objective, the trained adapter's answers to the validation prompts,
    scored: the mean and by temperature; None without one."""
    if attempt.generation is None:
        return None
    config = attempt.config
    scores = score_adapter(
        model,
        attempt.tokenizer,
        attempt.data.val,
        attempt.data.val_answers,
        metric=attempt.generation.metric,
        settings=attempt.generation.generation,
        temperature=config.temperature,
        top_p=config.top_p,
        seed=config.seed,
    )
    attempt.clock.lap("generate_s")
    return scores


def _can_retry_oom(config: TrialConfig) -> bool:
    """Retry once, with half the per-device batch and twice the accumulation (the same effective
    batch), and only in a one-process trial: the ranks of a distributed one would each decide alone.
    """
    import os

    return config.per_device_train_batch_size > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else type(error).__name__


def _release_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _usage(trainer: Any, timings: dict[str, float], started: float) -> dict[str, Any]:
    """Throughput and what the trial cost: tokens per second, peak GPU memory, GPU-hours."""
    import torch

    tokens = int(trainer.state.num_input_tokens_seen)
    gpus = trainer.args.world_size if _has_cuda() else 0
    overall = tokens / timings["train_s"] if timings.get("train_s") else 0.0
    return {
        # In the training steps after the first; a run of one step: over its whole training.
        "tokens_per_s": trainer.step_timer.tokens_per_s or overall,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if _has_cuda() else None,
        "gpu_hours": (time.perf_counter() - started) * gpus / 3600,
    }


_TOKENIZERS: dict[str, Any] = {}


def _setup_tokenizer(config: TrialConfig) -> Any:
    # The tokenizer is read-only during training, so a worker keeps it between trials.
    from transformers import AutoTokenizer

    key = config.model_name_or_path
    if key not in _TOKENIZERS:
        tokenizer = AutoTokenizer.from_pretrained(key, trust_remote_code=config.trust_remote_code)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        _TOKENIZERS.clear()
        _TOKENIZERS[key] = tokenizer
    return _TOKENIZERS[key]


# The base model a worker keeps between trials: its weights are frozen and the same in every
# trial of a study, and loading a 7B-32B model takes minutes. Each trial attaches a fresh adapter
# and `_release` takes it off again; a trial whose adapter could not be removed drops the base.
_BASES: dict[tuple, Any] = {}


def _setup_model(config: TrialConfig) -> Any:
    key = (
        config.model_name_or_path,
        str(training_dtype(config)),
        config.trust_remote_code,
        config.gradient_checkpointing,
        config.attn_implementation,
        config.quantization_bit,
    )
    if key in _BASES:
        return _BASES[key]
    _BASES.clear()
    model = load_base(config)
    # ZeRO-3 shards the parameters in place: such a base cannot serve the next trial.
    if not (config.deepspeed and deepspeed_stage(config.deepspeed) == 3):
        _BASES[key] = model
    return model


def training_dtype(config: TrialConfig) -> Any:
    import torch

    return torch.bfloat16 if config.bf16 else torch.float16 if config.fp16 else torch.float32


def load_base(config: TrialConfig) -> Any:
    """The frozen base a trial attaches its adapter to, in the training dtype; with
    `quantization_bit`, quantised by bitsandbytes and prepared for k-bit training (the export
    loads it so too, to check a QLoRA adapter against the loss its trial recorded)."""
    from transformers import AutoModelForCausalLM

    dtype = training_dtype(config)
    model = AutoModelForCausalLM.from_pretrained(
        config.model_name_or_path,
        dtype=dtype,
        trust_remote_code=config.trust_remote_code,
        attn_implementation=config.attn_implementation,
        use_safetensors=True,
        **_quantized_load(config, dtype),
    )
    if config.quantization_bit is not None:
        from peft import prepare_model_for_kbit_training

        # Freezes the base and keeps its unquantised parts (norms, embeddings) in float32, for
        # stable training on a k-bit base. Checkpointing stays the Trainer's to switch on
        # (`activation_checkpointing`), as for any other trial.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def _quantized_load(config: TrialConfig, dtype: Any) -> dict[str, Any]:
    """from_pretrained's arguments for a QLoRA base: bitsandbytes' NF4 with double quantization
    computing in the training dtype, or LLM.int8; nothing for a full-precision base."""
    if config.quantization_bit is None:
        return {}
    import os

    import torch
    from transformers import BitsAndBytesConfig

    if config.quantization_bit == 4:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    else:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    # A bitsandbytes model cannot be moved after loading: each rank loads onto its own GPU.
    device = int(os.environ.get("LOCAL_RANK", "0")) if torch.cuda.is_available() else "cpu"
    return {"quantization_config": quantization, "device_map": {"": device}}


def _release(trainer: Any) -> None:
    """Take the trial's LoRA layers off the kept base (not merged: the base stays as loaded) and
    let the adapter, optimizer state and activations go with the trainer (Optuna's
    `gc_after_trial` collects them)."""
    import torch

    try:
        trainer.model.unload()
    except Exception:  # noqa: BLE001 - a base we cannot clean is reloaded, never reused
        _BASES.clear()
    trainer.model = trainer.model_wrapped = trainer.optimizer = trainer.lr_scheduler = None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _training_args(config: TrialConfig, output_dir: Path, tracking: Tracking | None = None) -> Any:
    """The SFTConfig of one attempt. Under DeepSpeed it also sets the HfDeepSpeedConfig that
    `from_pretrained` reads for as long as this object lives, so it is made before the base."""
    from trl import SFTConfig

    deepspeed = None
    if config.deepspeed:
        deepspeed = str(deepspeed_config(config.deepspeed))
        _single_process_env()
    args = SFTConfig(
        output_dir=str(output_dir),
        deepspeed=deepspeed,  # `auto` values are filled from these arguments by the Trainer
        max_steps=config.max_steps,
        num_train_epochs=config.num_train_epochs,
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_ratio,  # transformers 5: a float below 1 is a ratio
        lr_scheduler_type=config.lr_scheduler_type,
        max_grad_norm=config.max_grad_norm,
        bf16=config.bf16,
        fp16=config.fp16,
        activation_checkpointing=config.gradient_checkpointing,  # transformers 5's name
        dataloader_pin_memory=_has_cuda(),
        use_cpu=not _has_cuda(),  # on CPU, several ranks train as one DDP job (gloo)
        seed=config.seed,
        data_seed=config.seed,
        max_length=config.cutoff_len,
        packing=config.packing,
        eval_packing=False,  # every trial validates on the same rows, packed or not
        use_liger_kernel=config.use_liger_kernel and _liger_installed(),
        eval_strategy="steps",
        eval_steps=config.eval_steps,
        logging_steps=config.logging_steps,
        # Checkpoints only when the keeper asks (CheckpointCallback); one on local disk.
        save_strategy="no",
        save_total_limit=1,
        **trainer_args(tracking),
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        # A diverging run must show as NaN, not be averaged away.
        logging_nan_inf_filter=False,
    )
    if config.deepspeed:
        import deepspeed as ds

        # ZeRO-3's partitioned load (zero.Init) takes the world size from DeepSpeed's own view
        # of the process group, which on the CPU the Trainer would give it only once training
        # starts: join the group the ranks made (a one-process trial: make its group of one).
        ds.init_distributed()
    return args


def _setup_trainer(
    config: TrialConfig,
    model: Any,
    tokenizer: Any,
    data: data_mod.Tokenized,
    args: Any,
    trial: Any | None,
    checkpoints: Keeper | None = None,
    tracking: Tracking | None = None,
) -> Any:
    """TRL's SFTTrainer for one attempt with its `args` (`_training_args`), reporting to `trial`
    (None: to nobody)."""
    from peft import LoraConfig
    from transformers import PrinterCallback

    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules="all-linear" if config.lora_target == "all" else config.lora_target,
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
        task_type="CAUSAL_LM",
    )
    trainer = _trainer_class()(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.val,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[
            pruning := trainer_callback(PruningCallback, trial, metric="eval_loss"),
            timer := trainer_callback(StepTimer),
            *([trainer_callback(CheckpointCallback, checkpoints)] if checkpoints else []),
            *tracking_callbacks(tracking),
        ],
    )
    # With the progress bar off the Trainer prints every log dict; the store has them already.
    trainer.remove_callback(PrinterCallback)
    trainer.loraplus_lr_ratio = config.loraplus_lr_ratio if config.use_loraplus else None
    trainer.pruning, trainer.step_timer = pruning, timer
    return trainer


def _liger_installed() -> bool:
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is not None:
        return True
    logger.warning("use_liger_kernel is set but liger-kernel is not installed; training without")
    return False


@functools.cache
def _trainer_class() -> type:
    """TRL's SFTTrainer, stopping at the first step whose loss is NaN or infinite: a diverged
    run learns nothing more, and waiting for the next evaluation would only burn GPU time."""
    import torch
    import transformers
    from trl import SFTTrainer

    class Trainer(SFTTrainer):
        loraplus_lr_ratio: float | None = None

        def compute_loss(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            """The same mean cross-entropy either way. On a GPU, TRL's fused LM head, which
            never builds the full logits (2.5 GB at batch 4 x 1024 tokens over Qwen's 152k
            vocabulary); on the CPU the Trainer's plain loss, measured 1.7x faster there
            (tests/benchmarks/throughput.py --size tiny) as it skips TRL's per-step entropy
            and token accuracy, which no trial reads."""
            if self.args.use_cpu:
                return transformers.Trainer.compute_loss(self, model, inputs, *args, **kwargs)
            return super().compute_loss(model, inputs, *args, **kwargs)

        def create_optimizer(self, model: Any = None) -> Any:
            """LoRA+ through peft's own optimizer factory: B's learning rate is the ratio times
            A's. DeepSpeed uses this optimizer too (the shipped configs name none)."""
            if self.loraplus_lr_ratio is None or self.optimizer is not None:
                return super().create_optimizer(model)
            from peft.optimizers import create_loraplus_optimizer

            optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            kwargs.pop("lr", None)
            self.optimizer = create_loraplus_optimizer(
                self.model if model is None else model,
                optimizer_cls,
                lr=self.args.learning_rate,
                loraplus_lr_ratio=self.loraplus_lr_ratio,
                loraplus_weight_decay=self.args.weight_decay,
                **kwargs,
            )
            return self.optimizer

        def training_step(self, *args: Any, **kwargs: Any) -> Any:
            loss = super().training_step(*args, **kwargs)
            if not torch.isfinite(loss).all():
                step = self.state.global_step + 1
                raise NonFiniteLoss(f"training loss is {loss.float().mean().item()} at step {step}")
            return loss

    return Trainer


def _single_process_env() -> None:
    """DeepSpeed looks for MPI unless told it is one process of one; a multi-GPU trial has set
    these already (trials.distributed)."""
    import os
    import socket

    if "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )


def set_deepspeed_accelerator() -> None:
    """Tell DeepSpeed there is no GPU when there is none; else it warns on every import."""
    import os

    if not _has_cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _count_params(model: Any) -> tuple[int, int]:
    if hasattr(model, "get_nb_trainable_parameters"):
        # peft's count: a 4-bit weight packs two values in each byte it stores, and a ZeRO-3
        # parameter holds only this rank's part (`ds_numel` is its full size).
        return model.get_nb_trainable_parameters()
    trainable = sum(
        getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad
    )
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    return trainable, total


def main(argv: list[str] | None = None) -> None:
    import yaml

    parser = argparse.ArgumentParser(description="Run one LoRA fine-tune with fixed values.")
    parser.add_argument("params", type=Path, help="YAML of TrialConfig fields")
    parser.add_argument("--out", type=Path, default=Path("runs/trial"), help="output folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    set_deepspeed_accelerator()
    config = TrialConfig.model_validate(yaml.safe_load(args.params.read_text()))
    result = run(config, output_dir=args.out)
    summary = json.dumps(asdict(result), indent=2)
    (args.out / "result.json").write_text(summary + "\n")
    print(summary)


if __name__ == "__main__":
    main()
