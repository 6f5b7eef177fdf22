"""What a run is doing, on stderr: the `on_progress` of `tuner.core.study.run_study` for the CLI.

In a terminal: a tqdm bar of finished trials (complete, pruned, failed, best so far) and under it
one line per running trial, `trial 3: step 40/120, val loss 2.31, ETA 1m20s`, redrawn as the
store shows each evaluation. The dashboard remains the place for curves.

Every finished trial also gets a line of its own, so that a log that is not a terminal (cron,
CI) shows the run too. There the bar is off, and a running trial's line is logged once per
evaluation instead (timestamped, through logging): an hour-long trial then shows it is alive and
how far it is, at the pace the space's `eval_steps` set, and no more often.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from tuner.common.text import number

logger = logging.getLogger(__name__)


class ProgressBar:
    """A context manager; pass its `update` as `on_progress`."""

    def __enter__(self) -> ProgressBar:
        self.bar: Any = None
        self.lines: list[Any] = []  # one tqdm status line per running trial, under the bar
        self.logged: dict[int, int | None] = {}  # trial -> the step last logged (no terminal)
        return self

    def update(self, progress: Any) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(
                total=progress.target,
                unit="trial",
                file=sys.stderr,
                disable=None,  # off when stderr is not a terminal
                dynamic_ncols=True,
            )
        if progress.last is not None:
            self._log(progress.last, progress)
        others = f", other runs {progress.others_finished}" if progress.others_finished else ""
        self.bar.set_postfix_str(
            f"complete {progress.complete}, pruned {progress.pruned}, failed {progress.failed}"
            f"{others}, best {number(progress.best_value)}",
            refresh=False,
        )
        self.bar.update(progress.finished - self.bar.n)
        if self.bar.disable:
            self._log_running(progress.running)
        else:
            self._show_running(progress.running)
        self.bar.refresh()

    def _show_running(self, running: list[Any]) -> None:
        from tqdm import tqdm

        while len(self.lines) > len(running):
            self.lines.pop().close()
        while len(self.lines) < len(running):
            self.lines.append(
                tqdm(
                    file=sys.stderr,
                    position=len(self.lines) + 1,
                    bar_format="{desc}",
                    leave=False,
                    dynamic_ncols=True,
                )
            )
        for line, trial in zip(self.lines, running, strict=True):
            line.set_description_str(running_line(trial))

    def _log_running(self, running: list[Any]) -> None:
        for trial in running:
            if trial.step is not None and self.logged.get(trial.number) != trial.step:
                logger.info("%s", running_line(trial))
            self.logged[trial.number] = trial.step
        now = {trial.number for trial in running}
        self.logged = {n: step for n, step in self.logged.items() if n in now}

    def _log(self, trial: Any, progress: Any) -> None:
        from tqdm import tqdm

        from tuner.store import attrs

        state = trial.state.name.lower()
        value = f" {number(trial.value)}" if trial.value is not None else ""
        where = f" at step {trial.last_step}" if state == "pruned" else ""
        reason = " ".join(attrs.failure(trial))
        reason = f": {reason}" if reason else ""
        values = trial.user_attrs.get(attrs.HPARAMS, {})
        params = " ".join(f"{k}={number(v)}" for k, v in values.items())
        best = (
            f" | best {number(progress.best_value)} (trial {progress.best_trial})"
            if progress.best_trial is not None
            else " | no trial complete yet"
        )
        tqdm.write(
            f"trial {trial.number} {state}{value}{where}{reason} [{params}]{best}", file=sys.stderr
        )

    def close(self) -> None:
        while self.lines:
            self.lines.pop().close()
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __exit__(self, *exc: Any) -> None:
        self.close()


def running_line(trial: Any) -> str:
    """`trial 3: step 40/120, val loss 2.31, ETA 1m20s`, from a `tuner.core.monitor.RunningTrial`
    (what `Progress.running` holds)."""
    if trial.step is None:
        return f"trial {trial.number}: started, no evaluation yet"
    of = f"/{trial.max_steps}" if trial.max_steps else ""
    eta = f", ETA {duration(trial.eta_s)}" if trial.eta_s is not None else ""
    return f"trial {trial.number}: step {trial.step}{of}, val loss {number(trial.value)}{eta}"


def duration(seconds: float) -> str:
    """45s, 1m20s, 2h05m: short enough for a status line, as precise as an estimate is."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
