"""What a trial times. Training throughput as a person tuning a GPU means it: tokens per second
inside the training steps, after the first step (allocator warm-up, kernel selection) and without
evaluations, a Trainer callback (trials/callbacks.py); and the stages of a trial, lap by lap."""

from __future__ import annotations

import time


class StepTimer:
    def __init__(self) -> None:
        self.seconds = 0.0
        self.tokens = 0
        self._started = 0.0
        self._tokens_before = 0

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
        # The Trainer counts a step's tokens as it fetches its batches, before this call.
        tokens = int(state.num_input_tokens_seen)
        if state.global_step > 1:
            self.seconds += time.perf_counter() - self._started
            self.tokens += tokens - self._tokens_before
        self._tokens_before = tokens

    @property
    def tokens_per_s(self) -> float | None:
        """None until two steps have run."""
        return self.tokens / self.seconds if self.seconds > 0 else None


class Clock:
    """The seconds of a trial's stages (load, data, restore, ...), each from the last lap."""

    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = now - self.last
        self.last = now
