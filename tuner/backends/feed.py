"""One asking process per run: the driver samples the next trials ahead, over an in-memory view
of the study, and a worker that becomes free starts one at once.

In plain distributed Optuna every worker samples for itself, in the moment between finishing
one trial and starting the next: it brings its own cache of the study up to date (the whole
study, the first time) and runs the sampler, whose cost grows with the trials (TPE: ~0.1 s of
CPU at 10,000), with every other worker doing the same against the same store. Here the driver
keeps one view of the study in an `InMemoryStorage` (loaded once, then only the trials that
finished since) and one sampler, and keeps `lookahead` suggestions ready in a queue.

The worker's side is Optuna's own sampler interface: `FedSampler` wraps the study's sampler and
answers a trial's suggestions from the values it was fed, so the trial is an ordinary Optuna
trial (its params, distributions and pruning as before). With nothing fed (the feed is behind,
or `resources.lookahead: 0`) the wrapped sampler samples, as plain Optuna does. A trial popped
from Optuna's queue (the baseline, a warm start, a retry) keeps its fixed params, and the fed
values wait for the worker's next trial.

What the driver's sampler sees differs from plain Optuna's only in timing: a suggestion may wait
in the queue while trials finish. `lookahead` bounds that: one suggestion per trial slot by
default, so the search behaves as if it ran up to twice the trials at once (TPE with 32 or 64
trials pending differs little once it has a few hundred results; `resources.lookahead: 4` trades
hand-out latency for fresher suggestions). Fewer ready suggestions would not do: trials of one
sweep tend to end together (the pruner stops the weak ones at the same step), and each suggestion
costs the sampler its full time (TPE: ~75 ms at 10,000 trials), so a burst of free workers would
wait in line for the sampler.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections import deque
from collections.abc import Iterator
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from tuner.backends.base import RunPlan
from tuner.common.errors import StudyDeleted
from tuner.store import attrs, deletion, optuna_private

logger = logging.getLogger(__name__)

FEED_SEED_OFFSET = 104_729  # the driver's sampler draws apart from every worker's own
FED_ATTR = attrs.FED  # system attr of a trial whose params the driver sampled
MAX_UNUSED = 256  # fed suggestions never run (dropped by a worker) stop counting as pending


class FedSampler(optuna.samplers.PartialFixedSampler):
    """Optuna's `PartialFixedSampler` whose fixed params change from trial to trial: the values
    fed for the trial, or none, and then the wrapped sampler samples."""

    def __init__(self, base: BaseSampler) -> None:
        super().__init__({}, base)
        self._next: dict[str, Any] | None = None  # fed, waiting for a trial that samples

    @property
    def feeding(self) -> bool:
        """Whether the trial now running was fed."""
        return bool(self._fixed_params)

    def wants(self) -> bool:
        return self._next is None

    def offer(self, params: dict[str, Any] | None) -> None:
        if params is not None:
            self._next = params

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self._fixed_params = {}
        if self._next is not None and attrs.FIXED_PARAMS not in trial.system_attrs:
            self._fixed_params, self._next = self._next, None
            optuna_private.storage(study).set_trial_system_attr(
                optuna_private.trial_id(trial), FED_ATTR, True
            )
        super().before_trial(study, trial)

    def infer_relative_search_space(
        self, study: Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        # Every param is fed: the wrapped sampler need not model the study for this trial.
        if self._fixed_params:
            return {}
        return super().infer_relative_search_space(study, trial)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState, values: Any) -> None:
        self._fixed_params = {}
        super().after_trial(study, trial, state, values)


FEED_WAIT_S = 0.5  # a free worker waits this long for a suggestion before sampling itself


def take(fed: Any, wait_s: float = FEED_WAIT_S) -> dict[str, Any] | None:
    """The next suggestion from a feed's queue, or None when none comes within `wait_s`: the
    trial then samples for itself (the feed is behind, or gone) rather than wait longer."""
    if fed is None:
        return None
    try:
        return fed.get(timeout=wait_s)
    except queue.Empty:
        return None


class TrialFeed:
    """The driver's side: a thread that fills `out`, a queue of param dicts, sampling with the
    study's sampler over an in-memory view of the study.

    At the start every slot needs a trial at once, so the first `first` suggestions are made
    without pause (`out` must hold that many); after that `depth` are kept ready, so that what
    waits in the queue was sampled knowing all but the last few results."""

    def __init__(self, plan: RunPlan, out: Any, *, first: int, depth: int) -> None:
        self.plan = plan
        self.out = out
        self.first, self.depth = max(first, depth), depth
        self.made = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tuner-feed", daemon=True)

    def start(self) -> TrialFeed:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        view = None
        try:
            view = StudyView(self.plan)
            while not self._stop.is_set():
                if self.made >= self.first and _ready(self.out) >= self.depth:
                    self._stop.wait(0.02)
                    continue
                view.sync()
                params = view.suggest()
                self.made += 1
                while not self._stop.is_set():
                    try:
                        self.out.put(params, timeout=0.2)
                        break
                    except queue.Full:
                        continue
        except Exception as e:
            if isinstance(e, StudyDeleted) or (view is not None and deletion.deleting(view.study)):
                return  # the study is being deleted: the driver ends the run, and says so
            # Workers sample for themselves when nothing is fed: a slower run, not a lost one.
            logger.warning("the trial feed stopped; workers sample for themselves", exc_info=True)


@contextlib.contextmanager
def read_while(study: Study) -> Iterator[None]:
    """Read the study into the worker's cache while the block runs (the base model loads): a
    worker needs the whole study for the pruner, and at 10,000 trials reading it takes seconds
    that would otherwise come before its first trial."""

    def read() -> None:
        with contextlib.suppress(Exception):  # the first trial meets the same error and says it
            study.get_trials(deepcopy=False)

    reader = threading.Thread(target=read, name="tuner-read", daemon=True)
    reader.start()
    try:
        yield
    finally:
        reader.join()


def _ready(out: Any) -> int:
    try:
        return out.qsize()
    except NotImplementedError:  # multiprocessing queues on macOS: bounded by maxsize alone
        return 0


class StudyView:
    """The study as the driver's sampler sees it: the store's finished trials, mirrored into
    memory as they finish, and the trials not yet finished: the suggestions it handed out, and
    the trials running that it did not suggest (another run's, at once; an enqueued one). The
    sampler thus sees every running trial, as Optuna's TPE (`constant_liar`) does in plain
    Optuna, and steers its next suggestion away from them: a second line, after the run's own
    seed (tuner/store/_runs.py), against two runs at once training the same params."""

    def __init__(self, plan: RunPlan) -> None:
        from tuner.search import algorithms
        from tuner.store import open_study

        opened = open_study(plan.study_name, plan.storage_url, in_run=True)
        self.study, self.space, self.run = opened.study, opened.space, plan.run
        count = len(self.study.get_trials(deepcopy=False))
        self.view = optuna.create_study(
            storage=optuna.storages.InMemoryStorage(),
            directions=self.study.directions,
            sampler=algorithms.build_sampler(
                self.space.sampler, seed_offset=plan.seed_offset + FEED_SEED_OFFSET + count
            ),
        )
        self._seen: set[int] = set()  # store trials mirrored finished
        self._seen_running: set[int] = set()  # store trials added running (not suggested here)
        self._pending: dict[tuple, deque[int]] = {}  # params → numbers of view trials running
        self._handed: deque[tuple[tuple, int]] = deque()  # (params, number), oldest first

    def sync(self) -> None:
        for trial in self.study.get_trials(deepcopy=False):
            if trial.state.is_finished() and optuna_private.trial_id(trial) not in self._seen:
                self._seen.add(optuna_private.trial_id(trial))
                self._mirror(trial)
            elif trial.state == TrialState.RUNNING and self._not_ours(trial):
                self._seen_running.add(
                    optuna_private.trial_id(trial)
                )  # `_mirror` finishes it in the view
                self._add_running(trial)

    def suggest(self) -> dict[str, Any]:
        trial = self.view.ask()
        self.space.suggest(trial)
        key = _key(trial.params)
        self._pending.setdefault(key, deque()).append(trial.number)
        self._handed.append((key, trial.number))
        if len(self._handed) > MAX_UNUSED:
            self._forget(*self._handed.popleft())
        return dict(trial.params)

    def _not_ours(self, trial: FrozenTrial) -> bool:
        """A running trial the view has not seen, with all its params (its worker records them
        as `hparams` once suggested), that is not one of this run's suggestions."""
        if (
            optuna_private.trial_id(trial) in self._seen_running
            or attrs.HPARAMS not in trial.user_attrs
        ):
            return False
        ours = trial.user_attrs.get(attrs.RUN, "") == self.run
        return not (ours and FED_ATTR in trial.system_attrs)

    def _add_running(self, trial: FrozenTrial) -> None:
        """Add a running trial to the view as running: pending, as the suggestions handed out
        are, and finished by `_mirror` when it finishes in the store."""
        running = optuna.trial.create_trial(
            state=TrialState.RUNNING, params=trial.params, distributions=trial.distributions
        )
        storage = optuna_private.storage(self.view)
        with contextlib.suppress(ValueError):  # params the view's space cannot hold: left out
            trial_id = storage.create_new_trial(
                optuna_private.study_id(self.view), template_trial=running
            )
            number = storage.get_trial_number_from_id(trial_id)
            self._pending.setdefault(_key(trial.params), deque()).append(number)

    def _mirror(self, trial: FrozenTrial) -> None:
        numbers = self._pending.get(_key(trial.params))
        if not numbers:
            # A trial Optuna would not take back (a FAIL without its params) is left out.
            with contextlib.suppress(ValueError):
                self.view.add_trial(trial)
            return
        storage, number = optuna_private.storage(self.view), numbers.popleft()
        trial_id = storage.get_trial_id_from_study_id_trial_number(
            optuna_private.study_id(self.view), number
        )
        for step, value in trial.intermediate_values.items():
            storage.set_trial_intermediate_value(trial_id, step, value)
        for key, value in trial.system_attrs.items():
            storage.set_trial_system_attr(trial_id, key, value)
        storage.set_trial_state_values(trial_id, trial.state, trial.values)

    def _forget(self, key: tuple, number: int) -> None:
        """A suggestion no worker ran stops being pending (a FAIL, which samplers ignore)."""
        numbers = self._pending.get(key)
        if numbers and number in numbers:
            numbers.remove(number)
            storage = optuna_private.storage(self.view)
            trial_id = storage.get_trial_id_from_study_id_trial_number(
                optuna_private.study_id(self.view), number
            )
            storage.set_trial_state_values(trial_id, TrialState.FAIL)


def _key(params: dict[str, Any]) -> tuple:
    return tuple(sorted(params.items()))
