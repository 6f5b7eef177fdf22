"""A conversation → the token ids a model trains on, with the trained turns' tokens as labels.

The model's chat template decides the text around each turn; the text of a trained turn is
exactly what the data set says. That second half is not what a template gives on its own:
reasoning templates (DeepSeek-R1-Distill, QwQ, Qwen3) cut the `<think>…</think>` out of
assistant turns, because at inference a model is not fed back its earlier thinking. Rendered
through them as is, an answer with a reasoning trace trains on its final answer only, and the
model learns to answer without thinking.

So each trained assistant turn is rendered as a marker, which no template alters, and the marker
is then replaced by the turn's text. Everything the template puts around the turn stays its own:
the turn's opening (`<|im_start|>assistant\\n`, `<｜Assistant｜>`) is prompt, its closing
(`<|im_end|>`, `<｜end▁of▁sentence｜>`: what teaches the model to stop) is trained with the text.
Turns that are not trained (history, under `mask_history`) render as the template renders them,
which is what the model sees at inference.

`enable_thinking` is LLaMA-Factory's switch: true (the default) trains the thinking as given;
false trains answers with their thinking removed, rendered by the template's non-thinking mode
(Qwen3 then prefills an empty `<think>\\n\\n</think>` in the prompt).
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass
from typing import Any

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_THOUGHT = re.compile(re.escape(THINK_OPEN) + ".*?" + re.escape(THINK_CLOSE), re.DOTALL)
# The empty block a reasoning template (Qwen3) writes before an answer it has no thinking for.
_EMPTY_THOUGHT_AT_END = re.compile(
    re.escape(THINK_OPEN) + r"\s*" + re.escape(THINK_CLOSE) + r"\s*$"
)
IGNORE = -100  # the label of a token that is not trained (the HF loss ignores it)

Message = dict[str, str]


class TemplateError(ValueError):
    """The chat template cannot render the conversation as training needs it."""


def remove_thought(text: str) -> str:
    """The answer without its thinking, as LLaMA-Factory's `enable_thinking: false` trains it."""
    return _THOUGHT.sub("", text).lstrip("\n")


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # the id where trained, IGNORE elsewhere
    answer: str  # the last trained turn's text: what a sampled answer is scored against
    text: str  # the rendered conversation the ids spell
    spans: list[tuple[int, int]]  # the character ranges of `text` that are trained


class Renderer:
    """Renders and tokenises conversations through one tokenizer and chat template."""

    def __init__(
        self, tokenizer: Any, template: str, *, mask_history: bool, enable_thinking: bool
    ) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.mask_history = mask_history
        self.enable_thinking = enable_thinking
        # A marker the data cannot contain by accident, made of plain letters so that no
        # template's string handling (strip, split on `</think>`) changes it.
        self._marker = f"TUNERTURN{secrets.token_hex(6)}X"
        self.end_of_turn = self._end_of_turn()

    def encode(self, messages: list[Message]) -> Encoded:
        text, spans, answer = self.render(messages)
        ids, labels = self._tokenize(text, spans)
        return Encoded(ids, labels, answer, text, spans)

    def render(self, messages: list[Message]) -> tuple[str, list[tuple[int, int]], str]:
        """(text, the character ranges trained, the last trained turn's text)."""
        trained = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if self.mask_history:
            trained = trained[-1:]
        contents = {i: self._trained_text(messages[i]["content"]) for i in trained}
        for content in [m["content"] for m in messages]:
            if self._marker in content:  # one chance in 2^48 per run; still never silent
                raise TemplateError("a turn contains tuner's own turn marker; run again")
        shown = [
            {**m, "content": self._mark(i)} if i in contents else m for i, m in enumerate(messages)
        ]
        template_text = self._apply(shown)

        pieces: list[str] = []
        spans: list[tuple[int, int]] = []
        length = 0
        rest = template_text
        for i in trained:
            marker = self._mark(i)
            before, found, rest = rest.partition(marker)
            if not found or marker in rest:
                raise TemplateError(
                    f"the chat template drops or repeats the text of turn {i + 1} "
                    f"({messages[i]['role']}), so it cannot be trained on"
                )
            content = contents[i]
            if content.lstrip().startswith(THINK_OPEN):
                # The answer brings its own thinking: the template's empty block would make two.
                before = _EMPTY_THOUGHT_AT_END.sub("", before)
            closing = os.path.commonprefix([rest, self.end_of_turn])
            pieces += [before, content]
            start = length + len(before)
            spans.append((start, start + len(content) + len(closing)))
            length = start + len(content)
        pieces.append(rest)
        return "".join(pieces), spans, contents[trained[-1]] if trained else ""

    def _trained_text(self, content: str) -> str:
        return content if self.enable_thinking else remove_thought(content)

    def _mark(self, index: int) -> str:
        return f"{self._marker}{index}Y"

    def _apply(self, messages: list[Message], **kwargs: Any) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages,
                chat_template=self.template,
                tokenize=False,
                enable_thinking=self.enable_thinking,
                **kwargs,
            )
        except Exception as e:  # noqa: BLE001 - jinja's errors (raise_exception, undefined ...)
            raise TemplateError(f"the chat template refuses the conversation: {e}") from None

    def _end_of_turn(self) -> str:
        """What the template writes after an assistant turn's text (its end-of-turn token),
        trailing whitespace aside: the separator before the next turn is not the answer's."""
        refused = None
        for opening in ([], [{"role": "system", "content": "s"}]):
            conversation = [
                *opening,
                {"role": "user", "content": "u"},
                {"role": "assistant", "content": self._mark(0)},
            ]
            try:
                text = self._apply(conversation)
            except TemplateError as e:
                refused = e
                continue
            _, found, after = text.partition(self._mark(0))
            if not found:
                raise TemplateError(
                    "the chat template writes no assistant text (an answer renders as nothing), "
                    "so no answer could be trained"
                )
            return after.rstrip()
        raise refused or TemplateError("the chat template renders no conversation")

    def _tokenize(self, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
        """Ids of the whole text, as `apply_chat_template(tokenize=True)` gives them; a token is
        trained when it overlaps a trained range."""
        try:
            encoded = self.tokenizer(
                text, add_special_tokens=False, return_offsets_mapping=True, verbose=False
            )
        except NotImplementedError:  # a tokenizer without offsets: tokenise piece by piece
            return self._tokenize_pieces(text, spans)
        ids = list(encoded["input_ids"])
        labels = [IGNORE] * len(ids)
        span = 0
        for k, (start, end) in enumerate(encoded["offset_mapping"]):
            while span < len(spans) and spans[span][1] <= start:
                span += 1
            if span == len(spans):
                break
            low = spans[span][0]  # and start < the span's end
            if end > low or (start == end and start >= low):
                labels[k] = ids[k]
        return ids, labels

    def _tokenize_pieces(
        self, text: str, spans: list[tuple[int, int]]
    ) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        cut = 0
        for low, high in [*spans, (len(text), len(text))]:
            for piece, trained in ((text[cut:low], False), (text[low:high], True)):
                if piece:
                    piece_ids = self.tokenizer(piece, add_special_tokens=False)["input_ids"]
                    ids += piece_ids
                    labels += piece_ids if trained else [IGNORE] * len(piece_ids)
            cut = high
        return ids, labels


def prompt_ids(ids: list[int], labels: list[int]) -> list[int]:
    """The prompt of a row's last trained turn: every id before that turn's first trained one
    (what the generation objective and the export's check give the model to answer)."""
    k = len(labels)
    while k and labels[k - 1] == IGNORE:
        k -= 1
    while k and labels[k - 1] != IGNORE:
        k -= 1
    return list(ids[:k])
