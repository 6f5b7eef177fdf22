"""Data as users bring it: alpaca and sharegpt, JSON and JSONL, renamed columns, any language."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trials.config import DatasetSpec, TrialConfig
from trials.data import DataError, prepare, split, to_examples, tokenize
from tuner.core.demo import build_tokenizer


def _jsonl(path: Path, records: list) -> Path:
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
    )
    return path


def test_alpaca_with_input_system_and_history(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text(
        json.dumps(
            [
                {
                    "instruction": "Translate",
                    "input": "chat",
                    "output": "cat",
                    "system": "Be brief.",
                    "history": [["Hi", "Hello!"]],
                },
                {"instruction": "2+2?", "input": "", "output": 4},
            ]
        )
    )
    first, second = to_examples(DatasetSpec(path=str(path)))
    assert first.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Translate\n\nchat"},
        {"role": "assistant", "content": "cat"},
    ]
    assert second.messages == [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]


def test_sharegpt_roles_messages_and_languages(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "s.jsonl",
        [
            {
                "conversations": [
                    {"from": "system", "value": "Réponds en français."},
                    {"from": "human", "value": "你好，世界是什么？"},
                    {"from": "gpt", "value": "Le monde 🌍"},
                ]
            },
            {
                "messages": [
                    {"role": "user", "content": "مرحبا"},
                    {"role": "assistant", "content": "Привет"},
                ]
            },
        ],
    )
    first, second = to_examples(DatasetSpec(path=str(path), format="sharegpt"))
    assert [m["role"] for m in first.messages] == ["system", "user", "assistant"]
    assert first.messages[1]["content"] == "你好，世界是什么？"
    assert first.answer == "Le monde 🌍"
    assert second.answer == "Привет"


def test_openai_messages_format_with_mixed_languages_and_a_renamed_column(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "m.jsonl",
        [
            {
                "chat": [
                    {"role": "user", "content": "用 English 解释 LoRA 是什么？"},
                    {"role": "assistant", "content": "LoRA 是 low-rank adaptation：只训练小矩阵。"},
                ],
                "system": "你是 helpful assistant.",
            },
            {
                "chat": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"},
                    {"role": "user", "content": "再见 and goodbye"},
                    {"role": "assistant", "content": "Bye 👋"},
                ]
            },
        ],
    )
    spec = DatasetSpec(path=str(path), format="messages", columns={"messages": "chat"})
    first, second = to_examples(spec)
    assert first.messages[:2] == [
        {"role": "system", "content": "你是 helpful assistant."},
        {"role": "user", "content": "用 English 解释 LoRA 是什么？"},
    ]
    assert first.answer == "LoRA 是 low-rank adaptation：只训练小矩阵。"
    assert [m["role"] for m in second.messages] == ["user", "assistant", "user", "assistant"]
    assert second.answer == "Bye 👋"
    unmapped = r"line 1: has no conversation .*`messages`.*fixed.dataset.columns.messages"
    with pytest.raises(DataError, match=unmapped):
        to_examples(DatasetSpec(path=str(path), format="messages"))


def test_columns_rename_a_users_fields(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "q.jsonl", [{"question": "Why?", "answer": "Because."}])
    spec = DatasetSpec(path=str(path), columns={"instruction": "question", "output": "answer"})
    (example,) = to_examples(spec)
    assert example.messages[0]["content"] == "Why?" and example.answer == "Because."


@pytest.mark.parametrize(
    ("content", "fmt", "expected"),
    [
        ("", "alpaca", "is empty"),
        (
            '{"instruction": "a", "output": "b"}\n{"instruction": \n',
            "alpaca",
            "line 2 is not valid JSON",
        ),
        (
            '{"prompt": "a", "response": "b"}\n',
            "alpaca",
            "line 1: has no 'instruction' field (fields: prompt, response); map yours with",
        ),
        (
            '{"conversations": [{"from": "human", "value": "a"}]}\n',
            "sharegpt",
            "line 1: the last turn is from user, not the assistant",
        ),
        (
            '{"conversations": [{"from": "narrator", "value": "a"}]}\n',
            "sharegpt",
            "turn 1 has role 'narrator'",
        ),
        ('{"text": "a"}\n', "sharegpt", "has no conversation"),
        ('["a"]', "alpaca", "record 1 is not an object"),
        (
            '{\n "data": [{"instruction": "a", "output": "b"}]\n}\n',
            "alpaca",
            "is one JSON object; expected a list of records or JSON lines",
        ),
        ('{"instruction": {"a": 1}, "output": "b"}\n', "alpaca", "instruction must be text"),
    ],
)
def test_bad_data_names_file_and_record(
    tmp_path: Path, content: str, fmt: str, expected: str
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as error:
        to_examples(DatasetSpec(path=str(path), format=fmt))
    assert str(error.value).startswith("bad.jsonl: ")
    assert expected in str(error.value)


def test_only_the_answer_is_trained_and_ends_with_the_end_token() -> None:
    tokenizer = build_tokenizer()
    examples = [
        _example("Reverse kalemo.", "omelak"),
        _example("Shout it.", "HEY"),
    ]
    rows, answers, truncated, dropped = tokenize(examples, _renderer(tokenizer), cutoff_len=200)
    assert (truncated, dropped) == (0, 0)
    assert answers == ["omelak", "HEY"]  # the references a generation objective scores against
    for ids, labels, answer in zip(
        rows["input_ids"], rows["labels"], ["omelak", "HEY"], strict=True
    ):
        trained = [t for t in labels if t != -100]
        assert tokenizer.decode(trained) == f"{answer}<|im_end|>"
        prompt_len = labels.index(trained[0])
        assert tokenizer.decode(ids[:prompt_len]).endswith("<|im_start|>assistant\n")


def test_cutoff_len_truncates_and_is_counted() -> None:
    tokenizer = build_tokenizer()
    examples = [_example("a", "x" * 50), _example("b", "y"), _example("c" * 80, "z")]
    rows, _, truncated, dropped = tokenize(examples, _renderer(tokenizer), cutoff_len=40)
    assert truncated == 2  # the long answer is cut; the long prompt leaves no answer at all
    assert dropped == 1
    assert all(len(ids) <= 40 for ids in rows["input_ids"])


def test_split_is_fixed_by_the_seed() -> None:
    examples = [_example(str(i), str(i)) for i in range(50)]
    train_a, val_a = split(examples, val_size=0.2, seed=3)
    train_b, val_b = split(examples, val_size=0.2, seed=3)
    _, val_c = split(examples, val_size=0.2, seed=4)
    assert val_a == val_b and len(val_a) == 10 and len(train_a) == 40
    assert val_a != val_c
    assert len(split(examples, val_size=5, seed=0)[1]) == 5
    with pytest.raises(DataError, match="leaves no training examples"):
        split(examples, val_size=50, seed=0)


def test_prepare_reports_truncation(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "d.jsonl",
        [{"instruction": "w" * (10 if i % 2 else 200), "output": "ok"} for i in range(20)],
    )
    config = TrialConfig(
        model_name_or_path="the tokenizer is given",
        dataset=DatasetSpec(path=str(path)),
        cutoff_len=120,
        val_size=4,
    )
    data = prepare(config, build_tokenizer())
    assert data.truncation_ratio == pytest.approx(0.5)
    assert data.dropped == 10
    assert len(data.train) + len(data.val) == 10


def test_prepare_tokenises_once_and_shares_through_the_cache_dir(tmp_path: Path) -> None:
    """A second process (here: a cleared process cache) loads what the first saved; a change
    that alters the tokens makes a new entry; a broken entry is rebuilt, not an error."""
    from trials import data as data_mod

    path = _jsonl(
        tmp_path / "d.jsonl", [{"instruction": "q" * 4 * i, "output": f"a{i}"} for i in range(12)]
    )
    config = TrialConfig(
        model_name_or_path="demo", dataset=DatasetSpec(path=str(path)), cutoff_len=64, val_size=3
    )
    tokenizer = build_tokenizer()
    cache = tmp_path / "tokenized"
    data_mod._CACHE.clear()

    first = prepare(config, tokenizer, cache_dir=cache)
    assert first.source == "tokenized"
    assert prepare(config, tokenizer, cache_dir=cache).source == "memory"
    data_mod._CACHE.clear()
    shared = prepare(config, tokenizer, cache_dir=cache)
    assert shared.source == "shared"
    for part in ("train", "val"):
        for column in ("input_ids", "labels"):
            assert getattr(shared, part)[column] == getattr(first, part)[column]
    facts = ("truncation_ratio", "train_tokens", "dropped")
    assert [getattr(shared, f) for f in facts] == [getattr(first, f) for f in facts]
    (entry,) = _entries(cache)
    assert not [p for p in cache.iterdir() if p.name.startswith(".")], "no temp folder left"

    data_mod._CACHE.clear()
    shorter = prepare(config.model_copy(update={"cutoff_len": 48}), tokenizer, cache_dir=cache)
    assert shorter.source == "tokenized" and shorter.truncation_ratio > first.truncation_ratio
    assert len(_entries(cache)) == 2

    (entry / "facts.json").unlink()  # as a crash outside the atomic rename would leave it
    data_mod._CACHE.clear()
    rebuilt = prepare(config, tokenizer, cache_dir=cache)
    assert rebuilt.source == "tokenized"
    assert rebuilt.train["input_ids"] == first.train["input_ids"]
    data_mod._CACHE.clear()
    assert prepare(config, tokenizer, cache_dir=cache).source == "shared"


def _entries(cache: Path) -> list[Path]:
    return [p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")]


def _example(prompt: str, answer: str):
    from trials.data import Example

    return Example([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}])


def _renderer(tokenizer, **options):
    from trials.data import renderer

    return renderer(
        tokenizer, TrialConfig(model_name_or_path="given", dataset={"path": "x"}, **options)
    )
