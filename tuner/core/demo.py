"""An offline demo: a tiny Llama that knows some word games, and chat data that asks for them.

No hub download can happen on the machines `tuner` is tested on, so the quickstart builds its own
model. The base is pre-trained on the games in a raw form ("kalemo reversed is omelak."); the
instruction data asks for the same games in chat form. LoRA has a real skill to adapt, so the
validation loss answers to the learning rate, rank and the rest, as in a real sweep.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from trials.quiet import quiet_libraries

logger = logging.getLogger(__name__)

DEMO_VERSION = "1"
MARKER = ".tuner-demo"
SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


@dataclass
class DemoPaths:
    root: Path

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def data(self) -> Path:
        return self.root / "data.jsonl"


def prepare_demo(
    root: Path = Path("demo"), *, force: bool = False, pretrain_steps: int = 400, seed: int = 0
) -> DemoPaths:
    """Write the demo model, tokenizer and data under `root` (idempotent: a finished demo of the
    same version is kept). Built in a temporary folder and renamed, so an interrupted run leaves
    nothing half-made."""
    paths = DemoPaths(root)
    marker = root / MARKER
    if not force and marker.exists() and marker.read_text().strip() == DEMO_VERSION:
        logger.info("demo already prepared in %s", root)
        return paths

    quiet_libraries()  # the pre-training's own log lines only, not the libraries' bars
    staging = root.with_name(root.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    rng = random.Random(seed)
    words = write_data(staging / "data.jsonl", rng)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(staging / "model")
    started = time.perf_counter()
    model = pretrain(tokenizer, _pretraining_text(words, rng), steps=pretrain_steps, seed=seed)
    model.save_pretrained(staging / "model", safe_serialization=True)
    logger.info("pre-trained the demo base in %.0f s", time.perf_counter() - started)
    (staging / MARKER).write_text(DEMO_VERSION)

    shutil.rmtree(root, ignore_errors=True)
    staging.rename(root)
    return paths


# ----------------------------------------------------------------------------- data


def write_data(path: Path, rng: random.Random) -> list[str]:
    """The instruction data: alpaca records asking for the word games about the first 1,200 of
    3,000 made-up words. Returns the words (the base pre-trains on all of them)."""
    words = _words(rng, 3000)
    _write_instructions(path, words[:1200], rng)
    return words


def _words(rng: random.Random, n: int) -> list[str]:
    words: set[str] = set()
    while len(words) < n:
        syllables = rng.randint(2, 3)
        words.add("".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables)))
    return sorted(words)


_GAMES = {
    "reverse": lambda w: w[::-1],
    "capitals": lambda w: w.upper(),
    "twice": lambda w: f"{w} {w}",
    "first": lambda w: w[0],
    "length": lambda w: str(len(w)),
}
_RAW = {
    "reverse": "{w} reversed is {a}.",
    "capitals": "{w} in capitals is {a}.",
    "twice": "{w} twice is {a}.",
    "first": "{w} starts with {a}.",
    "length": "{w} has {a} letters.",
}
_ASK = {
    "reverse": ["Reverse the word {w}.", "Spell {w} backwards.", "What is {w} reversed?"],
    "capitals": ["Write {w} in capital letters.", "Shout the word {w}.", "Uppercase {w}."],
    "twice": ["Say {w} twice.", "Repeat {w} two times."],
    "first": ["What letter does {w} start with?", "Give the first letter of {w}."],
    "length": ["How many letters are in {w}?", "Count the letters of {w}."],
}


def _pretraining_text(words: list[str], rng: random.Random) -> str:
    lines = []
    for w in words:
        for game in rng.sample(list(_GAMES), 3):
            lines.append(_RAW[game].format(w=w, a=_GAMES[game](w)))
    rng.shuffle(lines)
    return "\n".join(lines) + "\n"


def _write_instructions(path: Path, words: list[str], rng: random.Random) -> None:
    """alpaca records; a third put the word in `input`, as many real alpaca sets do."""
    with path.open("w", encoding="utf-8") as out:
        for w in words:
            game = rng.choice(list(_GAMES))
            answer = _GAMES[game](w)
            if rng.random() < 1 / 3:
                record = {
                    "instruction": rng.choice(_ASK[game]).format(w="this word").rstrip(".?") + ":",
                    "input": w,
                    "output": answer,
                }
            else:
                record = {
                    "instruction": rng.choice(_ASK[game]).format(w=w),
                    "input": "",
                    "output": answer,
                }
            out.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------- model


def build_tokenizer():  # noqa: ANN201 - transformers type, imported lazily
    """A character-level tokenizer with a ChatML template whose end token is the EOS."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from trials.data import CHATML_TEMPLATE

    vocab = {token: i for i, token in enumerate(SPECIALS + CHARS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(SPECIALS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>"
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def pretrain(tokenizer, text: str, *, steps: int, seed: int, seq_len: int = 128, batch: int = 32):  # noqa: ANN001, ANN201
    """A few hundred steps of next-character prediction: enough for the games in raw form."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch,), generator=generator)
        chunk = torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
        loss = model(input_ids=chunk, labels=chunk).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 100 == 0 or step == steps - 1:
            logger.info("demo pre-training step %d/%d: loss %.3f", step + 1, steps, loss.item())
    model.eval()
    return model
