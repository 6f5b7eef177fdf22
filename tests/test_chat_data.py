"""Train what the data says: reasoning traces kept through the real chat templates of
DeepSeek-R1-Distill-Qwen, Qwen3 and QwQ, every assistant turn trained, LLaMA-Factory's
dataset_info.json read as it is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli, small_space, write_space
from trials.chat import prompt_ids
from trials.config import DatasetSpec, TrialConfig
from trials.data import DataError, Example, prepare, renderer, to_examples, tokenize

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
# Each model's own special tokens: (bos, eos) as its tokenizer_config.json names them.
MODELS = {
    "deepseek_r1_distill_qwen": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "qwen3": (None, "<|im_end|>"),
    "qwq": (None, "<|im_end|>"),
}
SPECIALS = [
    "<pad>",
    "<unk>",
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
    "<|im_start|>",
    "<|im_end|>",
    "<think>",
    "</think>",
]
TURNS = [
    ("What is 17 + 25?", "<think>\n17 + 25: 7 + 5 = 12, carry 1; 1 + 2 + 1 = 4.\n</think>\n\n42"),
    ("用中文说：再乘以 2？", "<think>\n42 × 2 = 84，先算个位。\n</think>\n\n答案是 84。"),
    ("And minus 4?", "<think>\n84 - 4 = 80.\n</think>\n\nThe answer is \\boxed{80}."),
]


def char_tokenizer(template: str, texts: list[str], *, bos: str | None, eos: str):  # noqa: ANN201
    """A character-level tokenizer over `texts`, carrying `template` as its chat template: the
    model's own special tokens are single tokens, as in the real tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("".join(texts)) | set("abcdefghijklmnopqrstuvwxyz0123456789 \n.,:?"))
    vocab = {token: i for i, token in enumerate(SPECIALS + chars)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(SPECIALS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token=bos, eos_token=eos
    )
    tokenizer.chat_template = template
    return tokenizer


def model_tokenizer(name: str):  # noqa: ANN201
    bos, eos = MODELS[name]
    texts = [t for turn in TURNS for t in turn] + ["Be exact. 你好"]
    return char_tokenizer((TEMPLATES / f"{name}.jinja").read_text(), texts, bos=bos, eos=eos)


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), "utf-8")
    return path


def _files(tmp_path: Path) -> dict[str, DatasetSpec]:
    """The same three-turn conversation, with a reasoning trace in every answer, written as
    alpaca (earlier turns in `history`), sharegpt and OpenAI messages; two records each."""
    (q1, a1), (q2, a2), (q3, a3) = TURNS
    alpaca = {"instruction": q3, "output": a3, "history": [[q1, a1], [q2, a2]]}
    sharegpt = {
        "conversations": [
            {"from": r, "value": v} for q, a in TURNS for r, v in (("human", q), ("gpt", a))
        ]
    }
    messages = {
        "messages": [
            {"role": r, "content": v} for q, a in TURNS for r, v in (("user", q), ("assistant", a))
        ],
        "system": "Be exact.",
    }
    out = {}
    for fmt, record in (("alpaca", alpaca), ("sharegpt", sharegpt), ("messages", messages)):
        path = _jsonl(tmp_path / f"{fmt}.jsonl", [record, record])
        out[fmt] = DatasetSpec(path=str(path), format=fmt)
    return out


def _trained_turns(tokenizer, labels: list[int]) -> list[str]:  # noqa: ANN001
    """The trained tokens as text, one string per run of trained tokens (one per turn)."""
    runs: list[list[int]] = []
    previous = -100
    for label in labels:
        if label != -100:
            if previous == -100:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return [tokenizer.decode(run) for run in runs]


@pytest.mark.parametrize("fmt", ["alpaca", "sharegpt", "messages"])
@pytest.mark.parametrize("model", list(MODELS))
def test_every_answer_trains_with_its_thinking_through_the_real_template(
    tmp_path: Path, model: str, fmt: str
) -> None:
    tokenizer = model_tokenizer(model)
    eos = tokenizer.eos_token
    config = TrialConfig(
        model_name_or_path="given", dataset=_files(tmp_path)[fmt], val_size=1, cutoff_len=4096
    )
    data = prepare(config, tokenizer)
    row = data.train[0]
    # Every assistant turn, exactly as written, then the model's end-of-turn token.
    assert _trained_turns(tokenizer, row["labels"]) == [a + eos for _, a in TURNS]
    assert data.val_answers == [TURNS[-1][1]]
    # The generation objective's prompt is the last turn's: it ends where the answer begins.
    prompt = tokenizer.decode(prompt_ids(row["input_ids"], row["labels"]))
    assert prompt.endswith(("<｜Assistant｜>", "<|im_start|>assistant\n"))
    assert TURNS[-1][0] in prompt and TURNS[-1][1] not in prompt

    history_masked = prepare(config.model_copy(update={"mask_history": True}), tokenizer)
    assert _trained_turns(tokenizer, history_masked.train[0]["labels"]) == [TURNS[-1][1] + eos]


@pytest.mark.parametrize("model", list(MODELS))
def test_the_templates_alone_would_drop_the_thinking(model: str) -> None:
    """Why the rendering above is needed: each real template, applied as is, cuts the reasoning
    out of earlier answers (all three) or out of every answer (R1-Distill and QwQ)."""
    tokenizer = model_tokenizer(model)
    messages = [
        {"role": r, "content": v} for q, a in TURNS for r, v in (("user", q), ("assistant", a))
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert "17 + 25: 7 + 5" not in text  # the first answer's thinking is gone
    assert "42" in text


@pytest.mark.parametrize("model", ["qwen3", "deepseek_r1_distill_qwen"])
def test_enable_thinking_false_trains_the_answers_without_their_thinking(model: str) -> None:
    tokenizer = model_tokenizer(model)
    messages = [
        {"role": r, "content": v} for q, a in TURNS for r, v in (("user", q), ("assistant", a))
    ]
    config = TrialConfig(model_name_or_path="given", dataset={"path": "x"}, enable_thinking=False)
    rows, answers, _, _ = tokenize(
        [Example(messages)], renderer(tokenizer, config), cutoff_len=4096
    )
    trained = _trained_turns(tokenizer, rows["labels"][0])
    assert trained == ["42" + tokenizer.eos_token, "答案是 84。" + tokenizer.eos_token,
                       "The answer is \\boxed{80}." + tokenizer.eos_token]  # fmt: skip
    assert answers == ["The answer is \\boxed{80}."]
    if model == "qwen3":  # its non-thinking mode prefills an empty block, in the prompt
        prompt = tokenizer.decode(prompt_ids(rows["input_ids"][0], rows["labels"][0]))
        assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_multi_turn_truncation_keeps_the_turns_that_fit(tmp_path: Path) -> None:
    """A cut conversation still trains its first turns; only a row with no trained token left
    is dropped, and both are counted."""
    tokenizer = model_tokenizer("qwen3")
    messages = [
        {"role": r, "content": v} for q, a in TURNS for r, v in (("user", q), ("assistant", a))
    ]
    render = renderer(tokenizer, TrialConfig(model_name_or_path="given", dataset={"path": "x"}))
    full = render.encode(messages)
    labels = full.labels
    first_answer_ends = 1 + next(
        k for k in range(len(labels) - 1) if labels[k] != -100 and labels[k + 1] == -100
    )
    long_prompt = [{"role": "user", "content": "x" * 300}, {"role": "assistant", "content": "y"}]
    rows, _, truncated, dropped = tokenize(
        [Example(messages), Example(long_prompt)], render, cutoff_len=first_answer_ends + 5
    )
    assert (truncated, dropped) == (2, 1)
    (labels,) = rows["labels"]
    assert _trained_turns(tokenizer, labels)[0] == TURNS[0][1] + "<|im_end|>"


@pytest.mark.slow
def test_a_template_that_drops_answers_is_refused_at_create(tmp_path: Path) -> None:
    """A template that writes no assistant text (a prompt-only template, say) would train on
    nothing: create refuses it with one line, and makes no study."""
    prompt_only = (
        "{% for m in messages %}{% if m['role'] == 'user' %}<|im_start|>user\n"
        "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    model = tmp_path / "model"
    char_tokenizer(prompt_only, ["abc"], bos=None, eos="<|im_end|>").save_pretrained(model)
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, num_hidden_layers=1).save_pretrained(model)  # create loads it
    data = _jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}] * 4)
    space = {
        "params": {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-3, "log": True}},
        "fixed": {"model_name_or_path": str(model), "dataset": str(data)},
    }
    write_space(tmp_path / "s.yaml", space)
    result = run_cli("study", "create", "--space", "s.yaml", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith("error: s.yaml: fixed.template: ")
    assert "writes no assistant text" in lines[0]
    assert not (tmp_path / "tuner.db").exists()


# ----------------------------------------------------------------------------- LLaMA-Factory


def _llama_factory_dir(tmp_path: Path) -> Path:
    """A LLaMA-Factory data folder as its users have them: files beside a dataset_info.json,
    alpaca and sharegpt, Chinese and English, LLaMA-Factory's column names and tags."""
    root = tmp_path / "lf_data"
    root.mkdir()
    alpaca = [
        {
            "prompt": "把这句话翻译成英文",
            "query": "我喜欢猫。",
            "response": "I like cats.",
            "history": [["你好", "你好！有什么可以帮你？"]],
        },
        {
            "prompt": "Name a prime number.",
            "query": "",
            "response": "<think>\n2 is.\n</think>\n\n2",
        },
    ]
    (root / "alpaca_mix.json").write_text(json.dumps(alpaca, ensure_ascii=False), "utf-8")
    _jsonl(
        root / "sharegpt_zh.jsonl",
        [
            {
                "conversations": [
                    {"from": "human", "value": "一加一等于几？"},
                    {"from": "gpt", "value": "<think>\n一加一是二。\n</think>\n\n等于二。"},
                ],
                "system": "你是数学老师。",
            }
        ]
        * 2,
    )
    _jsonl(
        root / "openai_en.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "Bye"},
                    {"role": "assistant", "content": "Goodbye."},
                ]
            }
        ]
        * 2,
    )
    info = {
        "alpaca_mix": {
            "file_name": "alpaca_mix.json",
            "columns": {
                "prompt": "prompt",
                "query": "query",
                "response": "response",
                "history": "history",
            },
        },
        "sharegpt_zh": {
            "file_name": "sharegpt_zh.jsonl",
            "formatting": "sharegpt",
            "columns": {"messages": "conversations", "system": "system"},
        },
        "openai_en": {
            "file_name": "openai_en.jsonl",
            "formatting": "sharegpt",
            "columns": {"messages": "messages"},
            "tags": {
                "role_tag": "role",
                "content_tag": "content",
                "user_tag": "user",
                "assistant_tag": "assistant",
            },
        },
        "alpaca_en_hub": {"hf_hub_url": "llamafactory/alpaca_en", "ms_hub_url": "x/alpaca_en"},
        "dpo_pairs": {"file_name": "alpaca_mix.json", "ranking": True},
    }
    (root / "dataset_info.json").write_text(json.dumps(info, ensure_ascii=False, indent=2))
    return root


def test_llama_factory_dataset_info_entries_read_as_they_are(tmp_path: Path) -> None:
    root = _llama_factory_dir(tmp_path)
    alpaca = to_examples(DatasetSpec(dataset_info=f"{root}#alpaca_mix"))
    assert alpaca[0].messages == [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！有什么可以帮你？"},
        {"role": "user", "content": "把这句话翻译成英文\n\n我喜欢猫。"},
        {"role": "assistant", "content": "I like cats."},
    ]
    assert alpaca[1].answer == "<think>\n2 is.\n</think>\n\n2"
    (zh, _) = to_examples(DatasetSpec(dataset_info=f"{root / 'dataset_info.json'}#sharegpt_zh"))
    assert [m["role"] for m in zh.messages] == ["system", "user", "assistant"]
    assert zh.messages[0]["content"] == "你是数学老师。"
    (en, _) = to_examples(DatasetSpec(dataset_info=f"{root}#openai_en"))
    assert [m["content"] for m in en.messages] == ["Hi", "Hello!", "Bye", "Goodbye."]
    # The same keys written inline, relative to the space's folder, mean the same.
    inline = DatasetSpec(
        file_name=str(root / "sharegpt_zh.jsonl"),
        formatting="sharegpt",
        columns={"messages": "conversations"},
        tags={
            "role_tag": "from",
            "content_tag": "value",
            "user_tag": "human",
            "assistant_tag": "gpt",
        },
    )
    assert to_examples(inline)[0].messages[1:] == zh.messages[1:]
    assert DatasetSpec(dataset_info=f"{root}#alpaca_en_hub").path == "llamafactory/alpaca_en"


@pytest.mark.parametrize(
    ("dataset", "expected"),
    [
        (
            {"dataset_info": "lf_data#alpaca_cn"},
            "fixed.dataset.dataset_info: dataset_info.json has no entry 'alpaca_cn' (entries: "
            "alpaca_en_hub, alpaca_mix, dpo_pairs, openai_en, sharegpt_zh)",
        ),
        ({"dataset_info": "lf_data"}, "fixed.dataset.dataset_info: must be PATH#NAME"),
        ({"dataset_info": "nowhere#x"}, "fixed.dataset.dataset_info: no such file"),
        (
            {"dataset_info": "lf_data#dpo_pairs"},
            "fixed.dataset.ranking: not supported (preference (ranking) data is for DPO/RM",
        ),
        (
            {"file_name": "lf_data/sharegpt_zh.jsonl", "tags": {"speaker_tag": "from"}},
            "fixed.dataset.tags.speaker_tag: not a LLaMA-Factory tag (allowed: role_tag,",
        ),
    ],
)
def test_bad_llama_factory_entries_are_one_line(
    tmp_path: Path, dataset: dict, expected: str
) -> None:
    _llama_factory_dir(tmp_path)
    space = small_space(tmp_path)
    space["fixed"]["dataset"] = dataset
    write_space(tmp_path / "s.yaml", space)
    result = run_cli("study", "create", "--space", "s.yaml", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: s.yaml: {expected}"), line


@pytest.mark.slow
def test_a_llama_factory_dataset_trains_through_a_sweep(
    tmp_path: Path, tiny_reasoning_model: Path
) -> None:
    """Held-out style: a space that names an entry of a LLaMA-Factory dataset_info.json (zh,
    sharegpt, with reasoning) trains through `study create` and `study run`, no code changed;
    the stored space no longer needs the dataset_info.json."""
    root = _llama_factory_dir(tmp_path)
    space = {
        "params": {"learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
        "fixed": {
            "model_name_or_path": str(tiny_reasoning_model),
            "dataset": {"dataset_info": "lf_data#sharegpt_zh"},
            "val_size": 1,
            "max_steps": 2,
            "eval_steps": 1,
            "gradient_accumulation_steps": 1,
            "per_device_eval_batch_size": 1,
        },
    }
    write_space(tmp_path / "lf.yaml", space)
    created = run_cli("study", "create", "--space", "lf.yaml", cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    (root / "dataset_info.json").unlink()
    ran = run_cli("study", "run", "lf", "--n-trials", "1", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    best = run_cli("study", "best", "lf", "--json", cwd=tmp_path)
    assert best.returncode == 0, best.stderr
    report = json.loads(best.stdout)  # a best exists only among COMPLETE trials
    assert report["trial"] == 0 and report["value"] > 0


@pytest.fixture(scope="module")
def tiny_reasoning_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised tiny Llama whose tokenizer carries Qwen3's template and spells the
    LLaMA-Factory test data (Chinese included)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    texts = [
        "一加一等于几？<think>\n一加一是二。\n</think>\n\n等于二。你是数学老师。",
        "把这句话翻译成英文我喜欢猫。I like cats.你好！有什么可以帮你？",
    ]
    bos, eos = MODELS["qwen3"]
    tokenizer = char_tokenizer((TEMPLATES / "qwen3.jinja").read_text(), texts, bos=bos, eos=eos)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    out = tmp_path_factory.mktemp("tiny_reasoning_model")
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_data_errors_still_name_the_record_with_tags(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "t.jsonl", [{"conversations": [{"speaker": "narrator", "text": "hi"}]}]
    )
    tags = {"role_tag": "speaker", "content_tag": "text", "assistant_tag": "narrator"}
    (example,) = to_examples(DatasetSpec(path=str(path), format="sharegpt", tags=tags))
    assert example.messages == [{"role": "assistant", "content": "hi"}]
    with pytest.raises(
        DataError, match=r"t.jsonl: line 1: turn 1 has role 'narrator'.*fixed.dataset.tags"
    ):
        to_examples(DatasetSpec(path=str(path), format="sharegpt", tags={"role_tag": "speaker"}))
