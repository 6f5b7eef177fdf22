"""What one trial needs: the fixed settings of a space plus the values suggested for its params.

Field names are the HF Trainer's and LLaMA-Factory's where one exists, so that a space reads like
the command line a person would otherwise type. Defaults are the hand-picked values of blog posts
(learning rate 5e-5, rank 16, alpha 32, dropout 0.05, batch 1 x accumulation 8): a baseline that
leaves a param out trains with these.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DatasetFormat = Literal["alpaca", "sharegpt", "messages"]
Scheduler = Literal[
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
]


class DatasetSpec(BaseModel):
    """The training data, as users bring it. `dataset: data.jsonl` alone means an alpaca file.

    alpaca records: `instruction`, `input`, `output`, optional `system` and `history`
    (`[[user, assistant], ...]`). sharegpt: `conversations` of `{from, value}` turns (human, gpt,
    system, function, observation) or `{role, content}` turns, optional `system`; OpenAI-style
    `messages` records read the same way. messages: OpenAI-style `messages` of `{role, content}`,
    optional `system`. LLaMA-Factory's column names (`prompt`, `query`, `response`, `messages`)
    work too.

    A LLaMA-Factory data folder works as it is: `{dataset_info: data#alpaca_zh}` reads the entry
    `alpaca_zh` of `data/dataset_info.json` (its `file_name` relative to that folder,
    `hf_hub_url` as a hub id), and its keys may also be written inline (`file_name`,
    `formatting`, `columns`, `tags`). `study create` stores the entry's meaning, so workers need
    the data file and not the dataset_info.json. `ranking`, `subset`, `folder` and `num_samples`
    are refused with one line, not half-read.
    """

    model_config = ConfigDict(extra="forbid")

    path: str = Field(
        description="JSON or JSONL file, parquet or csv, a saved `datasets` folder, or a hub id. "
        "A local file is read through at `study create`: a bad record fails there, naming the line."
    )
    format: DatasetFormat = Field(default="alpaca", description="Record layout.")
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Rename columns to the format's names, e.g. {instruction: question}.",
    )
    split: str = Field(
        default="train", description="Split to read from a hub data set or a saved DatasetDict."
    )
    tags: dict[str, str] = Field(
        default_factory=dict,
        description="sharegpt turns' keys and roles, LLaMA-Factory's names: role_tag, "
        "content_tag, user_tag, assistant_tag, observation_tag, function_tag, system_tag.",
    )

    @model_validator(mode="before")
    @classmethod
    def _llama_factory(cls, data: Any) -> Any:
        """LLaMA-Factory's keys (`dataset_info: path#name`, `file_name`, `formatting`, its
        column names) read as tuner's; see trials/dataset_info.py."""
        from trials.dataset_info import translate

        return translate(data) if isinstance(data, dict) else data


class SimulatedArgs(BaseModel):
    """The simulated workload (trials/simulated.py), which trains nothing: it sleeps for each
    step and reports a synthetic curve, for trying scheduling, pruning and faults without GPUs.
    Written beside the other keys of `fixed`, as earlier spaces did, they mean the same."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(default=10, gt=0, description="Steps, each reported to the trial.")
    step_seconds: float = Field(default=0.3, ge=0, description="The sleep of each step.")
    diverge_above_lr: float | None = Field(
        default=None,
        gt=0,
        description="Learning rates above this diverge (the loss turns NaN after the first "
        "step), as real ones do; for trying failed trials without GPUs.",
    )
    hang_above_lr: float | None = Field(
        default=None,
        gt=0,
        description="Learning rates above this hang after the first step (as a stuck collective "
        "or data loader does), for trying resources.trial_timeout.",
    )


SIMULATED_FIELDS = frozenset(SimulatedArgs.model_fields)

# Where a trial's run is reported, through the HF Trainer's own integrations (`report_to`).
TRACKERS = ("tensorboard", "mlflow", "wandb")


def trackers(value: Any) -> list[str]:
    """`report_to` as a list of TRACKERS: one name or a list of them; `none` or [] for none.
    Raises ValueError naming the allowed values."""
    names = [value] if isinstance(value, str) or value is None else value
    allowed = f"{', '.join(TRACKERS)} or none, or a list of them"
    if not isinstance(names, list):
        raise ValueError(f"must be {allowed} (got {value!r})")
    bad = [n for n in names if n not in (*TRACKERS, "none", None)]
    if bad:
        raise ValueError(f"must be {allowed} (got {bad[0]!r})")
    return [n for n in TRACKERS if n in names]  # each once, in a fixed order


class TrialConfig(BaseModel):
    """Everything one LoRA fine-tune reads; a space's `fixed` and `params` both fill it.

    The options are named as the HF Trainer and LLaMA-Factory name them. Any option marked
    searchable may be searched in `params` instead of fixed (not both); the others say what the
    run is about, not how it trains (`quantization_bit`: the bits are set by what fits on the
    GPU, and under a loss objective the full-precision base would simply win).
    """

    model_config = ConfigDict(extra="forbid")

    # What to train. `simulated` trains nothing (see trials/simulated.py); it needs no model.
    workload: Literal["sft", "simulated"] = Field(
        default="sft",
        description="`sft`: a LoRA fine-tune with TRL's SFTTrainer; `simulated`: trains nothing, "
        "sleeps and reports a synthetic curve (see `fixed.simulated`), to try scheduling, "
        "pruning and faults without GPUs.",
    )
    model_name_or_path: str | None = Field(
        default=None,
        description="The base model: a local folder (a path starting ./, / or ~, or one that "
        "exists) or a hub id. Loaded from safetensors only.",
    )
    dataset: DatasetSpec | None = Field(
        default=None, description="The training and validation data (see `fixed.dataset`)."
    )
    template: str = Field(
        default="auto",
        description="`auto`: the tokenizer's own chat template (ChatML if it has none); `chatml`.",
    )
    cutoff_len: int = Field(
        default=1024,
        gt=0,
        description="Tokens per example; longer ones are cut and the share is recorded "
        "(`truncation_ratio`; a warning above 30 %).",
    )
    # Which text is trained (trials/chat.py); LLaMA-Factory's names and defaults.
    mask_history: bool = Field(
        default=False,
        description="Train only the last assistant turn, the earlier ones becoming prompt; false "
        "trains every assistant turn (LLaMA-Factory's name and meaning).",
    )
    enable_thinking: bool = Field(
        default=True,
        description="Train answers' `<think>…</think>` reasoning as given; false removes it and "
        "renders the template's non-thinking mode.",
    )
    val_size: float = Field(
        default=0.1,
        gt=0,
        description="Validation share (< 1) or number of examples (>= 1), held out with a fixed "
        "seed: every trial validates on the same examples.",
    )
    seed: int = Field(
        default=42,
        ge=0,
        le=2**32 - 1,  # numpy's (and so transformers.set_seed's) range
        description="Data order and LoRA initialisation: the same params and seed give the same "
        "result.",
    )

    # How long and how often to evaluate.
    max_steps: int = Field(default=-1, description="Optimizer steps; -1 trains num_train_epochs.")
    num_train_epochs: float = Field(
        default=1.0, gt=0, description="Epochs over the training data when max_steps is -1."
    )
    eval_steps: int = Field(
        default=50,
        gt=0,
        description="Validate every N training steps; each evaluation is reported to Optuna, and "
        "the pruner can stop a trial only there: give a trial about ten.",
    )
    logging_steps: int = Field(default=10, gt=0, description="Log the training loss every N steps.")

    # Optimisation.
    learning_rate: float = Field(default=5e-5, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(default=0.0, ge=0, description="The optimizer's weight decay.")
    warmup_ratio: float = Field(
        default=0.0, ge=0, lt=1, description="Share of the training steps spent warming up."
    )
    lr_scheduler_type: Scheduler = Field(
        default="cosine", description="Learning-rate schedule, by the HF Trainer's names."
    )
    max_grad_norm: float = Field(default=1.0, gt=0, description="Gradients clipped to this norm.")
    per_device_train_batch_size: int = Field(
        default=1,
        gt=0,
        description="Training examples per GPU per step. A CUDA out-of-memory error retrains the "
        "trial once from step 0 with half of it and twice the accumulation (the same effective "
        "batch); a second one, or one at batch 1, fails the trial with `fail_reason: oom`.",
    )
    per_device_eval_batch_size: int = Field(
        default=8, gt=0, description="Validation examples per GPU per step."
    )
    gradient_accumulation_steps: int = Field(
        default=8, gt=0, description="Batches whose gradients make one optimizer step."
    )

    # LoRA.
    lora_rank: int = Field(default=16, gt=0, description="LoRA rank r.")
    lora_alpha: float = Field(
        default=32,
        gt=0,
        description="LoRA alpha (the adapter is scaled by alpha / rank); search it as a "
        "`multiple` of lora_rank.",
    )
    lora_dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout of the LoRA layers.")
    lora_target: str | list[str] = Field(
        default="all", description="`all` (every linear layer) or a list of module names."
    )
    use_rslora: bool = Field(default=False, description="Scale by alpha/sqrt(rank) (rsLoRA).")
    use_dora: bool = Field(default=False, description="Weight-decomposed LoRA (DoRA).")
    use_loraplus: bool = Field(
        default=False,
        description="LoRA+: B trains at loraplus_lr_ratio x A's learning rate (peft's "
        "create_loraplus_optimizer).",
    )
    loraplus_lr_ratio: float = Field(
        default=16.0,
        ge=1,
        description="LoRA+'s ratio; naming it, in fixed or params, turns LoRA+ on.",
    )

    # Precision and memory.
    bf16: bool = Field(default=False, description="Train in bfloat16 (not with fp16).")
    fp16: bool = Field(default=False, description="Train in float16 (not with bf16).")
    gradient_checkpointing: bool = Field(
        default=False, description="Recompute activations in the backward pass: less memory."
    )
    trust_remote_code: bool = Field(
        default=False, description="Run the model repository's own code: only if you trust it."
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3"] = Field(
        default="sdpa",
        description="The attention kernel; flash_attention_2/3 need the flash-attn package on "
        "the workers.",
    )
    use_liger_kernel: bool = Field(
        default=False,
        description="Liger's fused kernels when liger-kernel is installed (a warning and plain "
        "kernels otherwise).",
    )
    packing: bool = Field(
        default=False,
        description="Pack training examples into cutoff_len rows with no padding (TRL's BFD, "
        "attention kept per example). Validation is never packed, so packed and unpacked "
        "trials compare.",
    )
    deepspeed: str | None = Field(
        default=None,
        description="DeepSpeed through the HF Trainer, `auto` values filled from the trial: "
        "zero2 (optimizer state and gradients sharded; the base stays whole and is kept warm "
        "between trials), zero3 (parameters sharded too, for bases that do not fit one GPU; the "
        "base is reloaded per trial), zero3_offload (optimizer and parameters in CPU memory: "
        "least GPU memory, slowest), or a path to your own JSON. The presets are in "
        "trials/ds_configs/. Runs on the CPU too, one process.",
    )

    # QLoRA: the frozen base is loaded quantised through bitsandbytes (the `qlora` extra) and
    # the adapter trains on top of it; the export merges into the unquantised base.
    quantization_bit: Literal[4, 8] | None = Field(
        default=None,
        description="QLoRA: the frozen base is loaded quantised by bitsandbytes and prepared "
        "with peft's prepare_model_for_kbit_training: 4 = NF4 with double quantization, "
        "computing in the training dtype (bf16/fp16, else float32); 8 = LLM.int8. Needs "
        "`pip install 'lora-tuner[qlora]'` where `study create` runs (it refuses without it) and "
        "on the workers; bitsandbytes' CPU backend trains it too. Not with a ZeRO-3 deepspeed "
        "config. The export merges into the unquantised base.",
    )

    # Sampling settings recorded with the trial, for the generation objective and the export.
    temperature: float = Field(
        default=0.6,
        gt=0,
        description="Sampling temperature of the generation objective and of the export's "
        "generation_config.json; kept with every trial.",
    )
    top_p: float = Field(
        default=0.95,
        gt=0,
        le=1,
        description="Nucleus sampling of the generation objective and of the export; kept with "
        "every trial.",
    )

    # Experiment tracking: one run per trial, named STUDY/trial-N (tuner/trial/tracking.py).
    report_to: list[str] = Field(
        default_factory=list,
        description="tensorboard, mlflow, wandb or none, or a list of them: each trial is one "
        "run, named STUDY/trial-N, with its params, curves and final facts "
        "(`pip install 'lora-tuner[tracking]'`; docs/guide.md, Tracking).",
    )

    simulated: SimulatedArgs = Field(
        default_factory=lambda: SimulatedArgs(),
        description="The simulated workload's own settings (`workload: simulated`).",
    )

    @model_validator(mode="before")
    @classmethod
    def _group_simulated(cls, data: Any) -> Any:
        """`steps: 4` beside the other fields (how spaces and stored studies wrote it before
        the group existed) means `simulated: {steps: 4}`."""
        if not isinstance(data, dict) or not SIMULATED_FIELDS & set(data):
            return data
        flat = {k: v for k, v in data.items() if k in SIMULATED_FIELDS}
        grouped = data.get("simulated") or {}
        if isinstance(grouped, dict):
            both = sorted(set(flat) & set(grouped))
            if both:
                raise ValueError(f"give {both[0]} or simulated.{both[0]}, not both")
            grouped = {**grouped, **flat}
        rest = {k: v for k, v in data.items() if k not in SIMULATED_FIELDS}
        return {**rest, "simulated": grouped}

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers(cls, value: Any) -> list[str]:
        return trackers(value)

    @model_validator(mode="after")
    def _check_contradictions(self) -> TrialConfig:
        if self.workload == "sft":
            for name in ("model_name_or_path", "dataset"):
                if getattr(self, name) is None:
                    raise ValueError(f"{name} is required for the sft workload")
        given = self.model_fields_set
        if "loraplus_lr_ratio" in given and "use_loraplus" not in given:
            self.use_loraplus = True
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 cannot both be true")
        if self.quantization_bit is not None and self.deepspeed:
            stage = _readable_stage(self.deepspeed)
            if stage == 3:
                raise ValueError(
                    f"quantization_bit cannot be used with ZeRO-3 (deepspeed: {self.deepspeed}), "
                    "which would shard the packed k-bit weights; use deepspeed: zero2, or none"
                )
        if self.val_size >= 1 and self.val_size != int(self.val_size):
            raise ValueError(
                f"val_size must be a share below 1 or a whole count (got {self.val_size})"
            )
        return self


# Fields that can be searched: the numbers and choices of a run, not what the run is about.
SEARCHABLE = frozenset(TrialConfig.model_fields) - {
    "workload",
    "deepspeed",
    "model_name_or_path",
    "dataset",
    "template",
    "mask_history",
    "enable_thinking",
    "trust_remote_code",
    "attn_implementation",
    "simulated",
    "report_to",
    # What the base is, not how it trains: under a loss objective the full-precision base would
    # simply win, and the bits are set by what fits on the GPU.
    "quantization_bit",
}


DEEPSPEED_PRESETS = ("zero2", "zero3", "zero3_offload")
_DS_CONFIGS = Path(__file__).resolve().parent / "ds_configs"


def deepspeed_config(value: str) -> Path:
    """The JSON file a `deepspeed` value names: a shipped preset, or the user's own path."""
    if value in DEEPSPEED_PRESETS:
        return _DS_CONFIGS / f"{value}.json"
    return Path(value)


def deepspeed_stage(value: str) -> int:
    """The ZeRO stage of a `deepspeed` value (0 when its config sets none)."""
    config = json.loads(deepspeed_config(value).read_text())
    return int((config.get("zero_optimization") or {}).get("stage", 0))


def _readable_stage(value: str) -> int | None:
    """The ZeRO stage of `value`, or None when its file cannot be read from here (a path relative
    to another folder): the space reads it at create, and every trial validates again."""
    try:
        return deepspeed_stage(value)
    except (OSError, ValueError, AttributeError, TypeError):
        return None
