"""What a run is doing, read from its study: the `Progress` that `run_study` hands its
`on_progress` (the CLI's bar, a Ray job's log), from a thread that polls the store, since the
trials run in other processes (local workers, Ray actors)."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime

import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner.store import attrs, best_trial, better, counts_as_best

logger = logging.getLogger(__name__)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


@dataclass
class RunningTrial:
    """A trial in progress, as its reports to the store show it."""

    number: int
    step: int | None  # the step of its last evaluation; None before the first
    max_steps: int | None  # the steps it trains, as its workload recorded them; None: not yet
    value: float | None  # what it reported at `step`: the validation loss
    eta_s: float | None  # seconds to its last step at its own pace; None: not known yet


@dataclass
class Progress:
    """What the run has done so far, for a progress bar: its own trials (those it started), and
    how many trials other runs of the study at once finished meanwhile."""

    target: int | None
    run: str = ""  # the run's id, recorded on each of its trials (user attr `run`)
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    others_finished: int = 0  # trials of other runs (or plain Optuna processes) that finished
    best_value: float | None = None  # the study's best so far, trials before this run included
    best_trial: int | None = None
    last: FrozenTrial | None = None  # the trial whose finishing this report is about
    # Why the run stopped early, in one line naming the error and the count, when its trials kept
    # failing the same way (resources.max_identical_failures); None when it ran its course.
    stop_reason: str | None = None
    running: list[RunningTrial] = field(default_factory=list)  # by trial number

    @property
    def finished(self) -> int:
        return self.complete + self.pruned + self.failed


class Monitor(threading.Thread):
    """Polls the store and reports what finished, and where each running trial is: the workers
    may be other processes. `on_progress` is called at once, for each finished trial (with
    `last` set), and after each poll while trials run."""

    def __init__(
        self,
        study: optuna.Study,
        store: optuna.storages.RDBStorage,
        *,
        target: int | None,
        run: str,
        on_progress,
        poll_s: float,
    ):
        super().__init__(daemon=True, name="tuner-monitor")
        self.study = study
        self.store = store
        self.on_progress = on_progress
        self.poll_s = poll_s
        self.seen = {t.number for t in study.get_trials(deepcopy=False, states=FINISHED)}
        self.progress = Progress(target=target, run=run)
        best = best_trial(study)
        if best is not None:
            self.progress.best_value, self.progress.best_trial = best.value, best.number
        self._stop_event = threading.Event()
        self._paces: dict[int, _Pace] = {}

    def run(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.progress)  # an empty bar at once, not after the first trial
        while not self._stop_event.wait(self.poll_s):
            self.poll()

    def stop(self) -> None:
        if self._stop_event.is_set():
            return
        self._stop_event.set()
        self.join()
        # The final count is what the run reports: read it afresh. Optuna's per-study cache
        # fetches only trials above the highest finished id, so a trial whose creation was
        # committed after a later one had finished would stay unseen.
        try:
            self.study = optuna.load_study(study_name=self.study.study_name, storage=self.store)
        except KeyError:
            return  # deleted under the run (tuner/store/_deletion.py): the count so far stands
        for attempt in range(5):
            if self.poll(final=attempt == 4):
                return
            time.sleep(1)

    def poll(self, *, final: bool = False) -> bool:
        try:
            trials = self.study.get_trials(deepcopy=False)
        except Exception as e:  # a store hiccup must not end the run; the next poll retries
            (logger.warning if final else logger.debug)("progress poll failed: %s", e)
            return False
        new = [t for t in trials if t.state in FINISHED and t.number not in self.seen]
        p = self.progress
        was_running = bool(p.running)
        mine = [t for t in trials if t.user_attrs.get(attrs.RUN) == p.run]
        p.running = self._running([t for t in mine if t.state == TrialState.RUNNING])
        reported = False
        for t in sorted(new, key=lambda t: (t.datetime_complete or t.datetime_start, t.number)):
            self.seen.add(t.number)
            if counts_as_best(t) and (
                p.best_value is None or better(t.value, p.best_value, self.study.direction)
            ):
                p.best_value, p.best_trial = t.value, t.number
            if t.user_attrs.get(attrs.RUN) != p.run:
                p.others_finished += 1  # the study's best still counts it
                continue
            p.complete += t.state == TrialState.COMPLETE
            p.pruned += t.state == TrialState.PRUNED
            p.failed += t.state == TrialState.FAIL
            p.last, reported = t, True
            if self.on_progress is not None:
                self.on_progress(p)
        p.last = None
        if not reported and (new or p.running or was_running) and self.on_progress is not None:
            self.on_progress(p)  # a running trial's step, value and ETA (or none left)
        return True

    def _running(self, trials: list[FrozenTrial]) -> list[RunningTrial]:
        now = time.monotonic()
        # The workload reports the loss negated in a study that maximises (trials.reporter).
        sign = -1.0 if self.study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
        running = []
        for t in sorted(trials, key=lambda t: t.number):
            step, max_steps = t.last_step, t.user_attrs.get(attrs.MAX_STEPS)
            value = None if step is None else sign * t.intermediate_values[step]
            eta = None
            if step is not None and max_steps:
                pace = self._paces.setdefault(t.number, _Pace(now, step))
                eta = pace.eta(now, step, max_steps, t.datetime_start)
            running.append(RunningTrial(t.number, step, max_steps, value, eta))
        self._paces = {
            n: pace for n, pace in self._paces.items() if n in {r.number for r in running}
        }
        return running


class _Pace:
    """A running trial's steps per second, from the evaluations the monitor has seen."""

    def __init__(self, now: float, step: int) -> None:
        self.first_at, self.first_step = now, step
        self.last_at, self.last_step = now, step

    def eta(self, now: float, step: int, max_steps: int, started: datetime | None) -> float | None:
        """Seconds until `max_steps`. Until a second evaluation is seen, the pace since the
        trial started (its model loading included, so the first ETA errs long)."""
        if step != self.last_step:
            self.last_at, self.last_step = now, step
        if self.last_step > self.first_step:
            rate = (self.last_step - self.first_step) / (self.last_at - self.first_at)
            since = now - self.last_at
        else:
            if started is None or step <= 0:
                return None
            # Optuna records trials' times as naive local time.
            rate, since = step / max((datetime.now() - started).total_seconds(), 1e-3), 0.0
        return max(0.0, (max_steps - step) / rate - since)
