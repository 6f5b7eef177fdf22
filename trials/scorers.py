"""Scorers for the generation objective beyond the built-in `exact_match` and `contains`, named in
a space as `trials.scorers:NAME`. A scorer of your own is any `(prediction, reference) -> float`
in a file or module (`objective.metric: my_scorers.py:score`)."""

from __future__ import annotations

import re


def boxed(prediction: str, reference: str) -> float:
    """MATH-500 style: the last `\\boxed{...}` of the answer equals the reference's (or the whole
    reference when it has none), after the usual LaTeX clean-up. Reasoning models such as
    DeepSeek-R1 put their final answer in a box after the thinking."""
    got = last_boxed(prediction)
    if got is None:
        return 0.0
    want = last_boxed(reference)
    return float(_clean(got) == _clean(reference if want is None else want))


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (braces may nest), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None  # cut off before the box closed: no answer


_DROP = re.compile(r"\\left|\\right|\\!|\\,|\\;|\s|\$")


def _clean(answer: str) -> str:
    answer = _DROP.sub("", answer)
    answer = answer.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    answer = re.sub(r"\\text\{(.*?)\}", r"\1", answer)
    return answer.rstrip(".")
