"""The generation objective: sample answers to the validation prompts with the trained adapter and
score them against the references.

Temperature and top_p change nothing in training, only what the model writes; so a trial trains
once, scores at its own `temperature`/`top_p` (the value Optuna optimises), and then, from the
same adapter, at each temperature of `temperature_grid`, so an export can pick the best
temperature for the best adapter without training again.

Scorers take `(prediction, reference)` and return a number (a bool counts as 0 or 1); the trial's
score is their mean. `exact_match` and `contains` are built in; a space names its own as
`path/to/file.py:function` or `package.module:function` (MATH-500 answer extraction, a HumanEval
test run).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trials import distributed
from trials.chat import prompt_ids

Scorer = Callable[[str, str], float]


def _normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def exact_match(prediction: str, reference: str) -> float:
    """1 when the answer is the reference, whitespace aside."""
    return float(_normalize(prediction) == _normalize(reference))


def contains(prediction: str, reference: str) -> float:
    """1 when the reference appears in the answer (a final answer after reasoning, say)."""
    return float(_normalize(reference) in _normalize(prediction))


BUILT_IN: dict[str, Scorer] = {"exact_match": exact_match, "contains": contains}


class ScorerError(ValueError):
    pass


def load_scorer(name: str) -> Scorer:
    """A built-in scorer by name, or a user's `file.py:function` / `module:function`."""
    if name in BUILT_IN:
        return BUILT_IN[name]
    where, sep, attr = name.rpartition(":")
    if not sep or not where or not attr:
        raise ScorerError(
            f"unknown metric {name!r} (allowed: eval_loss, perplexity, "
            f"{', '.join(BUILT_IN)}, or a scorer as file.py:function or module:function)"
        )
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise ScorerError(f"scorer file {where!r} does not exist")
            spec = importlib.util.spec_from_file_location(f"tuner_scorer_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ScorerError:
        raise
    except Exception as e:  # noqa: BLE001 - a user's file can fail in any way; name it
        raise ScorerError(f"cannot load scorer {name!r}: {type(e).__name__}: {e}") from None
    scorer = getattr(module, attr, None)
    if not callable(scorer):
        raise ScorerError(f"scorer {name!r}: {where} has no function {attr!r}")
    return scorer


def score_adapter(
    model: Any,
    tokenizer: Any,
    val: Any,
    answers: list[str],
    *,
    metric: str,
    settings: Any,
    temperature: float,
    top_p: float,
    seed: int,
) -> tuple[float, dict[str, float]]:
    """(score at the trial's temperature, {temperature: score} over the grid).

    Every rank of a multi-GPU trial calls this: each samples and scores its share of the
    prompts (see `generate`), and every rank returns the same scores, over all of them."""
    n = len(answers) if settings.max_samples is None else min(settings.max_samples, len(answers))
    rows = val.select(range(n))
    prompts = [
        prompt_ids(ids, labels)
        for ids, labels in zip(rows["input_ids"], rows["labels"], strict=True)
    ]
    references = answers[:n]
    scorer = load_scorer(metric)

    def at(t: float) -> float:
        mine = generate(
            model,
            tokenizer,
            prompts,
            temperature=t,
            top_p=top_p,
            max_new_tokens=settings.max_new_tokens,
            batch_size=settings.batch_size,
            seed=seed,
        )
        values = _everyones({i: float(scorer(p, references[i])) for i, p in mine.items()})
        return math.fsum(values) / len(values)

    score = at(temperature)
    grid = {f"{t:g}": score if t == temperature else at(t) for t in settings.temperature_grid}
    return score, grid


def _everyones(values: dict[int, float]) -> list[float]:
    """Every rank's values by prompt index, gathered, in prompt order (in one process: its own)."""
    _, world = distributed.rank_and_world()
    if world > 1:
        values = {i: v for share in distributed.gather(values) for i, v in share.items()}
    return [values[i] for i in sorted(values)]


def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    *,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
) -> dict[int, str]:
    """This rank's sampled answers (text, special tokens dropped), by prompt index.

    The prompts go in left-padded batches of `batch_size`; on the ranks of a multi-GPU trial,
    batch k is sampled by rank k % ranks (in one process, all of them). Each batch is seeded
    with `seed + k`, so an answer depends on the adapter, the settings and its batch only: the
    ranks together give exactly the answers one process would."""
    starts = range(0, len(prompts), batch_size)
    rank, world = distributed.rank_and_world()
    # Under ZeRO-3 every forward gathers the weights from all ranks, so generate() runs synced
    # (a rank that is done keeps stepping until all are) and each rank must call it as often as
    # the others: a rank out of batches samples the first one again and drops the answers.
    synced = world > 1 and _partitioned(model)
    rounds = math.ceil(len(starts) / world)
    how = {
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "stop": _stop_ids(model, tokenizer),
        "synced": synced,
    }
    was_training = model.training
    model.eval()
    out: dict[int, str] = {}
    try:
        for k in range(rank, rounds * world if synced else len(starts), world):
            if k >= len(starts):
                _sample(model, tokenizer, prompts[:batch_size], seed=seed, **how)
                continue
            start = starts[k]
            texts = _sample(
                model, tokenizer, prompts[start : start + batch_size], seed=seed + k, **how
            )
            out.update(enumerate(texts, start))
    finally:
        model.train(was_training)
    return out


def _sample(
    model: Any,
    tokenizer: Any,
    batch: list[list[int]],
    *,
    seed: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    stop: list[int],
    synced: bool,
) -> list[str]:
    """One left-padded batch, sampled from `seed`."""
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in batch)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
    torch.manual_seed(seed)
    with torch.no_grad():
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=0,  # top_p alone decides, as the space says
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            eos_token_id=stop,
            use_cache=True,
            synced_gpus=synced,
        )
    texts = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
    return [text.strip() for text in texts]


def _partitioned(model: Any) -> bool:
    """Whether ZeRO-3 holds the model's weights in parts, one on each rank."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokens that end an answer: EOS, the chat template's end-of-turn, the model's own."""
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<｜end▁of▁sentence｜>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if isinstance(i, int) and i >= 0)
