"""Runs of one study at once: each run gets an id, recorded on every trial it starts, and a seed
offset that keeps its sampling apart from every other run's.

Several `study run`s of one study may go at once: two terminals, cron on two machines with the
same URL, a rerun while the last trials of the one before finish. Each samples with the study's
sampler seeded from the space's `sampler.seed`, offset by where the study stands (its trial
count) and by slot (tuner.backends). Two runs that start on the same count would draw the same
stream and train the same params pairwise; so would TPE, which given the same seed and history
proposes the same point.

The first run of a study at a time, the one that holds the study's run lock (tuner.store._locks:
a PostgreSQL advisory lock, or a file lock beside an SQLite store), seeds as a run alone always
did, so that a seeded run on its own draws what it drew before (what `sampler.seed` promises, as
Optuna's `seed` does: the same seed and history, the same suggestions). Every run that finds the
lock taken mixes a random nonce into its seeds. A nonce alone would do for keeping runs apart, but
would make every run's draws differ from the last; the lock alone cannot tell runs apart. Both
together: a run alone is reproducible, and runs at once, on one machine or many, draw apart.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from tuner.store._locks import try_lock

SEED_SPACE = 2**32  # numpy's seeds, which Optuna's samplers use, are below this


@dataclass(frozen=True)
class Run:
    id: str  # recorded on each trial the run starts (trial user attr `run`)
    seed_offset: int  # 0 for the study's first run at a time; else a random nonce


@contextmanager
def start_run(url: str, study: str) -> Iterator[Run]:
    """A run of `study`, for as long as the block lasts (the first run holds the lock)."""
    with try_lock(url, "run", study) as first:
        nonce = 0 if first else 1 + secrets.randbelow(SEED_SPACE - 1)
        yield Run(id=secrets.token_hex(6), seed_offset=nonce)
