"""Data as users bring it → conversations → tokenised train and validation sets.

alpaca: `instruction`, `input`, `output`, optional `system` and `history`
([[user, assistant], ...]).
sharegpt: `conversations`, a list of `{from, value}` (human/gpt/system/function/observation) or
`{role, content}` turns, optional `system`; `tags` (LLaMA-Factory's) name other keys and roles.
messages: OpenAI-style `messages` of `{role, content}`, optional `system`. `columns` in the space
renames any of them; LLaMA-Factory's `dataset_info.json` entries read too (trials/dataset_info.py).

Every assistant turn is trained, its text exactly as given (`<think>` reasoning included), and
everything else is masked out of the loss; `mask_history` trains the last assistant turn only
(trials/chat.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from trials import files
from trials.chat import Renderer, TemplateError
from trials.config import DatasetSpec, TrialConfig

logger = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TEMPLATES = {"chatml": CHATML_TEMPLATE}
TRUNCATION_WARNING = 0.30

_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "system": "system",
    "function_call": "assistant",
    "function": "tool",
    "observation": "tool",
    "tool": "tool",
}
_FORMAT_COLUMNS = {
    "alpaca": ("instruction", "input", "output", "system", "history"),
    "sharegpt": ("conversations", "system"),
    "messages": ("messages", "system"),
}


class DataError(ValueError):
    """The data set cannot be read as the space says; the message names the record."""


Message = dict[str, str]


@dataclass(frozen=True)
class Example:
    """One conversation: system, user, assistant and tool turns, ending with the assistant's."""

    messages: list[Message]

    @property
    def answer(self) -> str:
        return self.messages[-1]["content"]


# ----------------------------------------------------------------------------- reading


ALLOWED = (
    "data is a .json, .jsonl, .parquet, .csv or .arrow file, a folder that `datasets`' "
    "save_to_disk wrote, or a hub id"
)


def read_records(spec: DatasetSpec) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) pairs; `where` names the line or index for error messages."""
    path = Path(spec.path)
    what = files.kind(path)  # before opening it: a FIFO would block, /dev/zero never end
    if what not in (None, "file", "folder"):
        raise DataError(f"{str(path)!r} is {what}; {ALLOWED}")
    if what == "file" and path.suffix.lower() in (".json", ".jsonl"):
        yield from _read_json(path)
        return
    import datasets

    if what == "folder":
        data = _load_saved(path, spec.split)
    elif what == "file":
        kind = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}.get(path.suffix.lower())
        if kind is None:
            raise DataError(
                f"{path.name}: unsupported file type (use .json, .jsonl, .parquet, .csv)"
            )
        # Its reader also logs the error it raises: the one line below says it, once.
        verbosity = datasets.logging.get_verbosity()
        datasets.logging.set_verbosity(logging.CRITICAL)
        try:
            data = datasets.load_dataset(kind, data_files=str(path), split="train")
        except Exception as e:  # whatever the reader met: the file is not what its name says
            raise DataError(f"{path.name}: cannot be read as {kind} ({_first_line(e)})") from None
        finally:
            datasets.logging.set_verbosity(verbosity)
    else:
        data = datasets.load_dataset(spec.path, split=spec.split)  # a hub id
    for i, record in enumerate(data):
        yield f"record {i + 1}", record


def _load_saved(path: Path, split: str) -> Any:
    """A folder `save_to_disk` wrote: a data set, or a dict of them by split."""
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError(
            f"{str(path)!r} is a folder but not a saved `datasets` folder (save_to_disk writes "
            f"state.json and dataset_info.json, or dataset_dict.json); {ALLOWED}"
        ) from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise DataError(
                f"{path.name}: has no split {split!r} (splits: {', '.join(data)}); "
                "choose one with fixed.dataset.split"
            )
        data = data[split]
    return data


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300]}" if text else type(error).__name__


def _read_json(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path.name}: is not UTF-8 text (offset {e.start})") from None
    if not text.strip():
        raise DataError(f"{path.name}: is empty")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path.name}: invalid JSON at line {e.lineno}: {e.msg}") from None
        for i, record in enumerate(records):
            yield f"record {i + 1}", record
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"line {lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == 1 and _is_one_object(text):
                raise DataError(
                    f"{path.name}: is one JSON object; expected a list of records or JSON lines"
                ) from None
            raise DataError(f"{path.name}: line {lineno} is not valid JSON ({e.msg})") from None


def _is_one_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


# ----------------------------------------------------------------------------- converting


def to_examples(spec: DatasetSpec) -> list[Example]:
    """Read the data set and convert every record; a record that cannot be read is an error."""
    name = Path(spec.path).name
    allowed = _FORMAT_COLUMNS[spec.format]
    for ours in spec.columns:
        if ours not in allowed:
            raise DataError(
                f"{name}: columns.{ours} is not a {spec.format} column "
                f"(allowed: {', '.join(allowed)})"
            )
    convert = {"alpaca": _from_alpaca, "sharegpt": _from_sharegpt, "messages": _from_messages}[
        spec.format
    ]
    examples = []
    for where, record in read_records(spec):
        if not isinstance(record, dict):
            raise DataError(f"{name}: {where} is not an object (got {type(record).__name__})")
        try:
            examples.append(convert(record, spec))
        except DataError as e:
            raise DataError(f"{name}: {where}: {e}") from None
    if not examples:
        raise DataError(f"{name}: holds no records")
    return examples


def _column(record: dict[str, Any], columns: dict[str, str], ours: str, *, required: bool) -> Any:
    theirs = columns.get(ours, ours)
    if theirs not in record or record[theirs] is None:
        if required:
            raise DataError(
                f"has no {theirs!r} field (fields: {', '.join(map(str, record)) or 'none'}); "
                f"map yours with fixed.dataset.columns.{ours}"
            )
        return None
    return record[theirs]


def _text(value: Any, what: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float | bool):
        return str(value)
    raise DataError(f"{what} must be text (got {type(value).__name__})")


def _from_alpaca(record: dict[str, Any], spec: DatasetSpec) -> Example:
    columns = spec.columns
    instruction = _text(_column(record, columns, "instruction", required=True), "instruction")
    extra = _column(record, columns, "input", required=False)
    output = _text(_column(record, columns, "output", required=True), "output")
    system = _column(record, columns, "system", required=False)
    history = _column(record, columns, "history", required=False) or []

    messages: list[Message] = []
    if system:
        messages.append({"role": "system", "content": _text(system, "system")})
    if not isinstance(history, list):
        raise DataError("history must be a list of [user, assistant] pairs")
    for turn in history:
        if not (isinstance(turn, list | tuple) and len(turn) == 2):
            raise DataError("history must be a list of [user, assistant] pairs")
        messages.append({"role": "user", "content": _text(turn[0], "history")})
        messages.append({"role": "assistant", "content": _text(turn[1], "history")})
    extra = _text(extra, "input") if extra is not None else ""
    messages.append(
        {"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction}
    )
    messages.append({"role": "assistant", "content": output})
    return Example(messages)


def _from_sharegpt(record: dict[str, Any], spec: DatasetSpec) -> Example:
    turns = _column(record, spec.columns, "conversations", required=False)
    if turns is None and "conversations" not in spec.columns:
        turns = record.get("messages")  # OpenAI-style records read the same way
    return _from_turns(record, spec, turns, key="conversations")


def _from_messages(record: dict[str, Any], spec: DatasetSpec) -> Example:
    """OpenAI-style `messages` of `{role, content}`; ShareGPT's `{from, value}` read too."""
    turns = _column(record, spec.columns, "messages", required=False)
    return _from_turns(record, spec, turns, key="messages")


def _from_turns(record: dict[str, Any], spec: DatasetSpec, turns: Any, *, key: str) -> Example:
    if not isinstance(turns, list) or not turns:
        raise DataError(
            f"has no conversation (a non-empty `{spec.columns.get(key, key)}` list); "
            f"map yours with fixed.dataset.columns.{key}"
        )
    read = _TurnReader(spec.tags)
    messages = [read(turn, i) for i, turn in enumerate(turns)]
    system = _column(record, spec.columns, "system", required=False)
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": _text(system, "system")})
    if messages[-1]["role"] != "assistant":
        raise DataError(f"the last turn is from {messages[-1]['role']}, not the assistant")
    return Example(messages)


# LLaMA-Factory's tags → the roles they name.
_TAG_ROLES = {
    "user_tag": "user",
    "assistant_tag": "assistant",
    "observation_tag": "tool",
    "function_tag": "assistant",
    "system_tag": "system",
}


class _TurnReader:
    """One turn → a message. Without `tags`: `{from, value}` or `{role, content}` and the usual
    role names; with them, the keys and role names they give (LLaMA-Factory's meaning)."""

    def __init__(self, tags: dict[str, str]) -> None:
        self.role_key = tags.get("role_tag")
        self.content_key = tags.get("content_tag")
        self.roles = {**_ROLES, **{tags[t]: role for t, role in _TAG_ROLES.items() if t in tags}}

    def __call__(self, turn: Any, index: int) -> Message:
        if not isinstance(turn, dict):
            raise DataError(f"turn {index + 1} is not an object")
        role = turn.get(self.role_key) if self.role_key else turn.get("from", turn.get("role"))
        content = (
            turn.get(self.content_key)
            if self.content_key
            else turn.get("value", turn.get("content"))
        )
        if role not in self.roles:
            raise DataError(
                f"turn {index + 1} has role {role!r} (allowed: {', '.join(self.roles)}; "
                "name yours with fixed.dataset.tags)"
            )
        return {
            "role": self.roles[role],
            "content": _text(content if content is not None else "", "content"),
        }


# ----------------------------------------------------------------------------- splitting


def split(examples: list[Example], *, val_size: float, seed: int) -> tuple[list, list]:
    """A fixed-seed split, so every trial of a study validates on the same examples."""
    n_val = int(val_size) if val_size >= 1 else max(1, round(len(examples) * val_size))
    if n_val >= len(examples):
        raise DataError(f"val_size {val_size:g} leaves no training examples (of {len(examples)})")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    val = [examples[i] for i in sorted(order[:n_val])]
    train = [examples[i] for i in sorted(order[n_val:])]
    return train, val


# ----------------------------------------------------------------------------- tokenising


@dataclass
class Tokenized:
    train: Any  # datasets.Dataset with input_ids and labels
    val: Any
    truncation_ratio: float
    train_tokens: int
    dropped: int
    # The reference answer (the last assistant turn's text) of each validation row, in order:
    # what the generation objective scores sampled answers against.
    val_answers: list[str] = field(default_factory=list)
    # Where this process got it: "tokenized" (here), "shared" (the study's cache on disk),
    # "fetched" (from another node, through the artifact location) or "memory" (this process's
    # cache); a trial records it.
    source: str = "tokenized"


def chat_template(tokenizer: Any, template: str) -> str:
    if template == "auto":
        return tokenizer.chat_template or CHATML_TEMPLATE
    if template in TEMPLATES:
        return TEMPLATES[template]
    raise DataError(f"unknown template {template!r} (allowed: auto, {', '.join(TEMPLATES)})")


def renderer(tokenizer: Any, config: TrialConfig) -> Renderer:
    """How this trial's examples become trained tokens (trials/chat.py)."""
    try:
        return Renderer(
            tokenizer,
            chat_template(tokenizer, config.template),
            mask_history=config.mask_history,
            enable_thinking=config.enable_thinking,
        )
    except TemplateError as e:
        raise DataError(f"template {config.template!r}: {e}") from None


def tokenize(examples: Iterable[Example], render: Renderer, *, cutoff_len: int) -> tuple:
    """Token ids with labels on the trained turns; (rows, their answers' text, truncated count,
    dropped count).

    TRL would tokenise too, but it truncates silently and trains one completion per row; doing it
    here measures truncation, trains every assistant turn, and lets a worker reuse the result
    across trials.
    """
    rows: dict[str, list] = {"input_ids": [], "labels": []}
    answers: list[str] = []
    truncated = dropped = 0
    for n, example in enumerate(examples, start=1):
        try:
            encoded = render.encode(example.messages)
        except TemplateError as e:
            raise DataError(f"example {n}: {e}") from None
        ids, labels = encoded.input_ids, encoded.labels
        if len(ids) > cutoff_len:
            truncated += 1
            ids, labels = ids[:cutoff_len], labels[:cutoff_len]
        if all(label == -100 for label in labels):
            dropped += 1  # the prompt alone fills cutoff_len: nothing to learn from
            continue
        rows["input_ids"].append(ids)
        rows["labels"].append(labels)
        answers.append(encoded.answer)
    return rows, answers, truncated, dropped


def check_rendering(examples: list[Example], render: Renderer, *, name: str) -> None:
    """Render the first example and check that its trained tokens read back as its trained
    turns' text: a template that drops or rewrites answer text (or a tokenizer that cannot spell
    it) is refused here, before any GPU time is spent on it."""
    try:
        encoded = render.encode(examples[0].messages)
    except TemplateError as e:
        raise DataError(f"{name}: example 1: {e}") from None
    trained = render.tokenizer.decode(
        [t for t in encoded.labels if t != -100], skip_special_tokens=False
    )
    for low, high in encoded.spans:
        want = encoded.text[low:high]
        if _squeeze(want) not in _squeeze(trained):
            raise DataError(
                f"{name}: example 1: the trained tokens do not spell the answer "
                f"{_clip(want)!r} (they read {_clip(trained)!r}); the tokenizer cannot "
                "represent it, or the template rewrites it"
            )


def _squeeze(text: str) -> str:
    return "".join(text.split())  # tokenizers differ on spaces only, never on the words


def _clip(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


# Bump when `tokenize` changes what it writes: entries on disk from older code are then unused.
_FORMAT = 3
_FACTS = "facts.json"
_ANSWERS = "val_answers.json"
_CACHE: dict[str, Tokenized] = {}


class SharedCache(Protocol):
    """Where workers that share no folder find each other's tokenised data: one entry per cache
    key. The caller (tuner, over the study's artifact location) provides it."""

    def fetch(self, key: str, dest: Path) -> bool:
        """Unpack entry `key` into the new folder `dest`; False when there is none."""

    def publish(self, key: str, entry: Path) -> None:
        """Make the saved folder `entry` entry `key` for the other workers."""


def prepare(
    config: TrialConfig,
    tokenizer: Any,
    *,
    cache_dir: Path | None = None,
    shared: SharedCache | None = None,
) -> Tokenized:
    """Read, split and tokenise the data set once and reuse it: every trial of a study trains on
    the same tokens, so only the first pays for them.

    The process keeps its last result in memory. With `cache_dir` (the study's, shared by all
    its workers) the result is also saved there, and a worker that has not tokenised loads it
    instead: one tokenisation per study rather than one per worker process. With `shared`, the
    `cache_dir` is this node's own: a missing entry is fetched from `shared`, and one built here
    is published to it.
    """
    key = _cache_key(config, tokenizer)
    if key in _CACHE:
        return replace(_CACHE[key], source="memory")
    if cache_dir is None:
        result = _build(config, tokenizer)
    else:
        result = _shared(config, tokenizer, cache_dir / key, shared)
    _CACHE.clear()  # one data set per worker at a time; a new study's replaces it
    _CACHE[key] = result
    return result


def _cache_key(config: TrialConfig, tokenizer: Any) -> str:
    """A hash of everything that changes the tokens; also the entry's folder name on disk."""
    path = Path(config.dataset.path)
    stat = path.stat() if path.exists() else None  # a hub id has no file to stat
    parts = {
        "format": _FORMAT,
        "dataset": config.dataset.model_dump_json(),
        "file": [stat.st_mtime_ns, stat.st_size] if stat else None,
        "model": config.model_name_or_path,
        "tokenizer": [
            len(tokenizer),
            tokenizer.chat_template,
            getattr(tokenizer, "name_or_path", ""),
        ],
        "template": config.template,
        "mask_history": config.mask_history,
        "enable_thinking": config.enable_thinking,
        "cutoff_len": config.cutoff_len,
        "val_size": config.val_size,
        "seed": config.seed,
    }
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _shared(
    config: TrialConfig, tokenizer: Any, entry: Path, shared: SharedCache | None
) -> Tokenized:
    """Load the study's entry, or tokenise and save it while holding its lock, so that workers
    starting together wait for one of them instead of all tokenising. With `shared`, an entry
    missing here is fetched first, and one built here is published."""
    from filelock import FileLock

    # A complete entry is never changed, so reading it needs no lock.
    loaded = _load(entry)
    if loaded is not None:
        return loaded
    entry.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(entry.with_name(f"{entry.name}.lock")):
        loaded = _load(entry)  # another worker may have saved it while this one waited
        if loaded is not None:
            return loaded
        if shared is not None and _fetch(shared, entry):
            loaded = _load(entry)
            if loaded is not None:
                return replace(loaded, source="fetched")
        result = _build(config, tokenizer)
        try:
            _save(result, entry)
        except OSError as e:  # a full or read-only disk costs the other workers time, not trials
            logger.warning("could not save the tokenised data to %s: %s", entry, e)
            return result
        if shared is not None:
            try:
                shared.publish(entry.name, entry)
            except Exception as e:  # noqa: BLE001 - the others tokenise too: time, not trials
                logger.warning("could not publish the tokenised data %s: %s", entry.name, e)
        return result


def _fetch(shared: SharedCache, entry: Path) -> bool:
    """Fetch entry into a temporary folder beside it and rename it into place, as `_save` does."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    try:
        if not shared.fetch(entry.name, tmp):
            return False
        shutil.rmtree(entry, ignore_errors=True)
        os.rename(tmp, entry)
        return True
    except Exception as e:  # noqa: BLE001 - an unreachable or broken entry is rebuilt here
        logger.warning("could not fetch the tokenised data %s: %s", entry.name, e)
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load(entry: Path) -> Tokenized | None:
    """The saved entry, or None when there is none or it cannot be read: a broken entry must
    never fail a trial; the caller rebuilds it and `_save` replaces it under the lock."""
    if not entry.exists():
        return None
    import datasets

    try:
        facts = json.loads((entry / _FACTS).read_text())
        # In memory, as a freshly tokenised set is: the trainer's `map` then writes no cache
        # files into the shared entry, and both paths train the same way.
        facts["val_answers"] = json.loads((entry / _ANSWERS).read_text())
        train = datasets.load_from_disk(str(entry / "train"), keep_in_memory=True)
        val = datasets.load_from_disk(str(entry / "val"), keep_in_memory=True)
        return Tokenized(train=train, val=val, source="shared", **facts)
    except Exception as e:  # noqa: BLE001 - any unreadable entry is rebuilt
        logger.warning("ignoring the unreadable tokenised data at %s (%s)", entry, e)
        return None


def _save(result: Tokenized, entry: Path) -> None:
    """Write into a temporary folder beside the entry and rename it, so that no reader ever sees
    a half-written entry."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    try:
        result.train.save_to_disk(str(tmp / "train"))
        result.val.save_to_disk(str(tmp / "val"))
        facts = {
            "truncation_ratio": result.truncation_ratio,
            "train_tokens": result.train_tokens,
            "dropped": result.dropped,
        }
        (tmp / _FACTS).write_text(json.dumps(facts))
        (tmp / _ANSWERS).write_text(json.dumps(result.val_answers, ensure_ascii=False))
        shutil.rmtree(entry, ignore_errors=True)  # a broken entry, else the rename fails
        os.rename(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _build(config: TrialConfig, tokenizer: Any) -> Tokenized:
    import datasets

    examples = to_examples(config.dataset)
    render = renderer(tokenizer, config)
    check_rendering(examples, render, name=Path(config.dataset.path).name)
    train, val = split(examples, val_size=config.val_size, seed=config.seed)
    train_rows, _, train_cut, train_dropped = tokenize(train, render, cutoff_len=config.cutoff_len)
    val_rows, val_answers, val_cut, val_dropped = tokenize(
        val, render, cutoff_len=config.cutoff_len
    )
    if not train_rows["input_ids"] or not val_rows["input_ids"]:
        raise DataError(
            f"cutoff_len {config.cutoff_len} leaves no example with an answer; raise cutoff_len"
        )
    ratio = (train_cut + val_cut) / (len(train) + len(val))
    if ratio > TRUNCATION_WARNING:
        logger.warning(
            "%.0f%% of examples are longer than cutoff_len=%d and were cut; "
            "raise cutoff_len if the answers matter",
            100 * ratio,
            config.cutoff_len,
        )
    return Tokenized(
        train=datasets.Dataset.from_dict(train_rows),
        val=datasets.Dataset.from_dict(val_rows),
        truncation_ratio=ratio,
        train_tokens=sum(len(ids) for ids in train_rows["input_ids"]),
        dropped=train_dropped + val_dropped,
        val_answers=val_answers,
        source="tokenized",
    )
