"""The driver: the policy of a run, once, whatever runs the trials.

It keeps slots (tuner/backends/base.py) and hands each free one its next trial, with the params
the feed sampled ahead (tuner/backends/feed.py). It alone decides:

- how many trials start: exactly `n_trials`, fewer only after `timeout`, the `gpu_hours` budget
  or an interrupt. What a slot ran is read from the store (each trial records its slot's
  `worker` id), so a hand-out that never became a trial is given back, and so is one whose
  trial died with its worker and was enqueued again: an enqueued trial (the baseline, a warm
  start, a retry) is never skipped;
- how many slots run: the place's capacity, never more than the trials left. On an elastic
  place (a Ray cluster) slots start beyond the room and wait for it, as many as the run can use
  (the trials left, `--jobs` if given, at most MAX_WAITING waiting): their waiting is what asks
  the autoscaler for nodes, and the waiting ones past the trials left are withdrawn. A trial is
  handed only to a placed slot, so waiting costs no trial, no retry and no death. If no slot is
  placed for `placement_timeout`, the run fails with one line saying what a trial asks for and
  the most any node offered: a sweep never ends "0 trials" for want of GPUs;
- when a trial has run too long (`trial_timeout`, counted from when the trial began, not from
  when its slot was asked: a slot may spend minutes loading a base model first): its slot is
  killed and the trial fails, not retried;
- what a dead worker costs: its trial fails with the reason and is retried with the same
  params, up to `max_retries`; past `MAX_DEATHS_PER_SLOT` deaths per slot the run stops;
- stale trials: as it waits, it runs Optuna's heartbeat check, as workers do before each trial;
- trials that keep failing the same way (`max_identical_failures` in a row, the same error type
  and message): the set-up is broken, not the params, and every trial would fail alike. The run
  stops (RunFailed, naming the error and the count) and its running trials are stopped as on an
  interrupt: they share the cause (base model, data, code), and letting them run on to the same
  error (minutes of hub retries, say) is the slow failure this is for;
- Ctrl-C or SIGTERM: each slot's trial is asked to stop, then killed after a grace period; every
  trial the run started ends FAIL "interrupted", and the interrupt is raised again;
- a study marked for deletion (tuner/store/_deletion.py): no trial starts, the running ones stop at
  their next report, and the run ends (StudyDeleted), touching nothing of the study after.
"""

from __future__ import annotations

import logging
import queue
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from optuna.trial import TrialState

from tuner.backends.base import Backend, Ended, RunPlan, Slot
from tuner.backends.feed import FEED_WAIT_S, TrialFeed, take
from tuner.common.errors import BackendError, RunFailed, StoreFull, StudyDeleted
from tuner.store import StoreFile, attrs, deletion, optuna_private, recovery, spent

logger = logging.getLogger(__name__)

MAX_DEATHS_PER_SLOT = 3  # beyond this the cause is not one unlucky worker: stop, say why
INTERRUPT_GRACE_S = 60.0  # how long an interrupted trial may take to end before its slot is killed
POLL_S = 1.0  # the longest the driver waits without looking at timeouts and stale trials
# Slots waiting for room at once on an elastic place: enough to ask an autoscaler for a
# cluster's worth of nodes in one go, not a placement group per trial of a 10,000-trial sweep.
MAX_WAITING = 32


@dataclass
class _Seat:
    """The driver's record of one slot."""

    slot: Slot
    index: int
    handed: int = 0  # trials handed to it
    started: float = 0.0  # when the slot was started (monotonic)
    placed: bool = False  # holds its resources; until then it waits for room, and gets no trial
    since: float | None = None  # when its current trial was handed out (monotonic); None: free
    handed_at: datetime | None = None  # the same, as wall time, to compare with a trial's start
    # When its trial was first seen ended elsewhere while the slot had not come back (monotonic).
    ended_elsewhere: float | None = None


def run(backend: Backend, plan: RunPlan) -> None:
    """Run the plan's trials on the backend; returns when they are done (see the module)."""
    Driver(backend, plan).run()


class Driver:
    def __init__(self, backend: Backend, plan: RunPlan) -> None:
        self.backend = backend
        self.plan = plan
        self.remaining = plan.n_trials  # hand-outs left; None: no limit
        self.deadline = time.time() + plan.timeout if plan.timeout else None
        self.seats: list[_Seat] = []
        self.deaths = 0
        self.feed: TrialFeed | None = None
        self.fed: queue.Queue | None = None
        self.study: Any = None
        self.stale_check_s = 1.0
        self._next_stale_check = 0.0
        self.peak_placed = 0  # the most slots placed at once: what the death cap scales with
        self._unplaced_since: float | None = None  # since when no slot is placed, and some wait
        self._asked = 0  # waiting slots last reported
        self._asked_at: float | None = None  # when the first slot that had to wait was started
        self._told_placed = False
        self._failing: tuple[str, ...] | None = None  # the error the last trials failed with
        self._failed_alike = 0  # how many in a row
        self.deleting = False  # the study is marked for deletion, or gone

    def run(self) -> None:
        from tuner.common.settings import get_settings
        from tuner.store import open_study

        try:
            self.backend.open(self.plan)
            # The driver's own connection, for its bookkeeping: which slot ran what, budgets,
            # stale trials. Opened with heartbeats, so Optuna's stale check retries as workers do.
            opened = open_study(
                self.plan.study_name, self.plan.storage_url, heartbeat=True, in_run=True
            )
            self.study = opened.study
            self.store_file = StoreFile(self.plan.storage_url)
            self.stale_check_s = float(get_settings().heartbeat_interval)
            self._start_feed()
            while self._step():
                pass
        except (KeyboardInterrupt, SystemExit):
            self._interrupt(recovery.INTERRUPTED)
            raise
        except StoreFull:
            raise  # nothing can be written: the slots are closed, the next run fails their trials
        except BaseException as e:
            if self._deleting():
                # Its rows are gone or going: whatever failed on them, the delete is the news.
                raise self._deleted() from None
            self._interrupt(f"the run stopped: {str(e).splitlines()[0] if str(e) else e!r}")
            raise
        finally:
            self._close()
        if self.deleting:
            raise self._deleted()

    # ------------------------------------------------------------------------- one turn

    def _step(self) -> bool:
        """Start slots, hand out trials, wait for one to end; False when nothing is left."""
        stopping = self._stopping()
        if not stopping:
            self._fill()
            self._place()
            self._hand_out()
        if stopping or self.remaining == 0:
            self._retire_free()
        busy, waiting = self._busy(), [seat for seat in self.seats if not seat.placed]
        if not busy and not waiting:
            return False
        self.backend.wait([seat.slot for seat in busy + waiting], timeout=POLL_S)
        for seat in busy:
            ended = seat.slot.poll()
            if ended is not None:
                self._ended(seat, ended)
        self.store_file.check()
        self._end_overdue()
        self._fail_stale()
        self._place()
        self._watch_placement()
        return True

    def _stopping(self) -> bool:
        """No new trial starts: past the deadline, the study spent its GPU-hours, or it is
        being deleted."""
        if self._deleting():
            return True
        if self.deadline is not None and time.time() > self.deadline:
            return True
        limit = self.plan.budget.gpu_hours
        if limit is None:
            return False
        return spent(self.study, self.plan.resources.gpus_per_trial, limit)

    def _wanted(self) -> int:
        """How many slots to keep: the place's capacity (on an elastic place, `--jobs` or as
        many as the run can use), and no more than the trials left need."""
        if not self.backend.elastic:
            wanted: int | None = self.backend.capacity(self.plan)
        else:
            wanted = self.plan.jobs
        if self.remaining is not None:
            left = self.remaining + len(self._busy())
            wanted = left if wanted is None else min(wanted, left)
        placed = sum(seat.placed for seat in self.seats)
        if wanted is None:
            # No end to the trials: the room there is, and one slot more that waits, asking for
            # the next node until the cluster's maximum.
            wanted = max(self.backend.capacity(self.plan), placed) + 1
        if self.backend.elastic:
            wanted = min(wanted, placed + MAX_WAITING)
        return wanted

    def _fill(self) -> None:
        """Start slots up to `_wanted`; past it, withdraw the slots still waiting for room."""
        wanted = self._wanted()
        for seat in [s for s in self.seats if not s.placed][::-1]:
            if len(self.seats) <= wanted:
                break
            self._drop(seat)
        while len(self.seats) < wanted:
            index = min(set(range(len(self.seats) + 1)) - {s.index for s in self.seats})
            slot = self.backend.start(self.plan, index)
            if slot is None:
                break  # the place is full (another job holds its resources, say)
            self.seats.append(_Seat(slot, index, started=time.monotonic()))

    def _place(self) -> None:
        """Note the slots that got their resources; they can take trials from now on."""
        now = time.monotonic()
        for seat in self.seats:
            if seat.placed or not seat.slot.placed():
                continue
            seat.placed = True
            if self._asked_at is not None and not self._told_placed:
                self._told_placed = True
                logger.info("first trial placed after %.1f s", now - self._asked_at)
            elif now - seat.started >= POLL_S:
                left = sum(not s.placed for s in self.seats)
                waited = now - seat.started
                logger.info("%s placed after %.1f s; %d still wait", seat.slot.worker, waited, left)
        self.peak_placed = max(self.peak_placed, sum(seat.placed for seat in self.seats))

    def _watch_placement(self) -> None:
        """Say what the run waits for; fail it when no slot could be placed for
        `placement_timeout` (raise BackendError, with what a trial asks for)."""
        now = time.monotonic()
        waiting = [s for s in self.seats if not s.placed and now - s.started >= POLL_S]
        if len(waiting) > self._asked:
            if self._asked_at is None:
                self._asked_at = min(seat.started for seat in waiting)
            logger.info(
                "waiting for the autoscaler: asked for %d × %s", len(waiting), _bundle(self.plan)
            )
        self._asked = len(waiting)
        if not waiting or any(seat.placed for seat in self.seats):
            self._unplaced_since = None
            return
        if self._unplaced_since is None:
            self._unplaced_since = min(seat.started for seat in waiting)
        limit = self.plan.resources.placement_timeout
        if now - self._unplaced_since > limit:
            raise BackendError(
                f"no trial could be placed in {limit:g} s "
                f"(resources.placement_timeout): {self.backend.unplaced(self.plan)}"
            )

    def _hand_out(self) -> None:
        """Each free slot gets its next trial; the feed is waited for at most FEED_WAIT_S in
        all, after which a trial samples for itself rather than keep GPUs waiting."""
        until = time.monotonic() + FEED_WAIT_S
        for seat in self.seats:
            if seat.since is not None or not seat.placed or self.remaining == 0:
                continue
            seat.slot.run(take(self.fed, max(0.0, until - time.monotonic())))
            seat.handed += 1
            seat.since, seat.handed_at = time.monotonic(), datetime.now()
            if self.remaining is not None:
                self.remaining -= 1

    def _retire_free(self) -> None:
        """Free slots with nothing more to run give their resources back now, and the waiting
        ones their ask."""
        for seat in [s for s in self.seats if s.since is None]:
            self._drop(seat)

    # ------------------------------------------------------------------------- endings

    def _ended(self, seat: _Seat, ended: Ended) -> None:
        seat.since = None
        if self.deleting:
            self._drop(seat)  # its trial, if any, goes with the study
            return
        if ended.ran is not None:
            if ended.ran.trial_id is not None and not ended.ran.requeued:
                self._count_failures(ended.ran.trial_id)
            if ended.ran.requeued:
                self._give_back()  # its retry takes the place of the trial failed elsewhere
            if not ended.reusable:
                self._drop(seat)
            return
        self.deaths += 1
        self._drop(seat)
        logger.warning("%s died: %s", seat.slot.worker, ended.died)
        if self.deaths > MAX_DEATHS_PER_SLOT * max(1, self.peak_placed):
            raise BackendError(f"trial workers keep dying; last: {ended.died}")
        self._settle(seat, ended.died or "its worker died", retry=ended.retry)

    def _count_failures(self, trial_id: int) -> None:
        """Count the trials that failed with the same error in a row, as they end; raise
        RunFailed at `max_identical_failures`. Any other ending starts the count again."""
        limit = self.plan.resources.max_identical_failures
        if not limit:
            return
        error = _own_error(optuna_private.storage(self.study).get_trial(trial_id))
        same = error is not None and error == self._failing
        self._failing, self._failed_alike = error, (self._failed_alike + 1 if same else 1)
        if error is not None and self._failed_alike >= limit:
            raise RunFailed(
                f"{self._failed_alike} trials in a row failed with the same error, so the run "
                f"stopped (resources.max_identical_failures: {limit}): {' '.join(error)}"
            )

    def _settle(self, seat: _Seat, reason: str, *, retry: bool) -> None:
        """A slot's worker is gone: fail the trial it left RUNNING (retried when `retry`), and
        give back the hand-out when no trial of it is left to count: the worker died before
        its trial began, or the trial will run again as an enqueued retry."""
        trials = self._trials_of(seat)
        if len(trials) < seat.handed:
            self._give_back()
            return
        last = trials[-1]
        if last.state == TrialState.RUNNING:
            if recovery.fail_and_retry(
                self.study, last, reason, max_retries=self.plan.resources.max_retries, retry=retry
            ):
                self._give_back()
        elif retry and recovery.retried(self.study, last):
            self._give_back()  # failed as stale a moment before, and retried

    def _end_overdue(self) -> None:
        """Kill the slots whose trial began more than `trial_timeout` ago: a hang would not
        answer anything gentler. The trial fails and is not retried (it would hang again)."""
        limit = self.plan.resources.trial_timeout
        if limit is None:
            return
        for seat in self._busy():
            if time.monotonic() - seat.since <= limit:
                continue
            trials = self._trials_of(seat)
            running = trials[-1] if len(trials) == seat.handed else None
            if running is None or running.state != TrialState.RUNNING:
                continue  # its trial has not begun yet (the slot is still loading)
            began = max(running.datetime_start, seat.handed_at)
            if (datetime.now() - began).total_seconds() <= limit:
                continue
            reason = f"timed out after {limit:g}s (resources.trial_timeout)"
            logger.warning("trial %d: %s; killing its worker", running.number, reason)
            self._drop(seat)
            recovery.fail_and_retry(
                self.study,
                running,
                reason,
                max_retries=self.plan.resources.max_retries,
                retry=False,
            )

    def _fail_stale(self) -> None:
        if time.monotonic() < self._next_stale_check:
            return
        self._next_stale_check = time.monotonic() + self.stale_check_s
        recovery.fail_stale(self.study)
        self._end_frozen()

    def _end_frozen(self) -> None:
        """Kill the slots whose trial ended elsewhere (failed as stale) two heartbeat intervals
        ago and that have not come back: a stopped or wedged worker (`kill -STOP`), whose lost
        heartbeat failed its trial, held its slot, and the run, forever. A worker that only lost
        the store comes back at its next write, finding its trial over."""
        busy = self._busy()
        if not busy:
            return
        now, study = time.monotonic(), self.study.get_trials(deepcopy=False)  # one read for all
        for seat in busy:
            trials = self._trials_of(seat, study)
            current = trials[-1] if len(trials) == seat.handed else None
            if current is None or not current.state.is_finished():
                seat.ended_elsewhere = None
                continue
            seat.ended_elsewhere = seat.ended_elsewhere or now
            if now - seat.ended_elsewhere < 2 * self.stale_check_s:
                continue
            logger.warning(
                "%s has not come back from trial %d, which was failed as stale; killing it",
                seat.slot.worker,
                current.number,
            )
            self._drop(seat)
            if recovery.retried(self.study, current):
                self._give_back()  # its retry takes the trial's place

    # ------------------------------------------------------------------------- the rest

    def _start_feed(self) -> None:
        capacity = self.backend.capacity(self.plan)
        if self.remaining is not None:
            capacity = min(capacity, self.remaining)
        depth = self.plan.feed_depth(capacity)
        if depth:
            self.fed = queue.Queue(maxsize=max(depth, capacity))
            self.feed = TrialFeed(self.plan, self.fed, first=capacity, depth=depth).start()

    def _interrupt(self, reason: str) -> None:
        """Ask every slot's trial to stop, give them INTERRUPT_GRACE_S to end, then kill the
        slots and fail whatever they left RUNNING, with `reason`."""
        try:
            asked = [seat for seat in self._busy() if seat.slot.interrupt()]
            until = time.monotonic() + INTERRUPT_GRACE_S
            while (busy := [s for s in asked if s.since is not None]) and time.monotonic() < until:
                self.backend.wait([s.slot for s in busy], timeout=0.2)
                for seat in busy:
                    if seat.slot.poll() is not None:
                        seat.since = None
        finally:
            seats, self.seats = self.seats, []
            for seat in seats:
                seat.slot.kill()
            for trial in self._left_running(seats):
                recovery.fail_and_retry(self.study, trial, reason, max_retries=0, retry=False)

    def _deleting(self) -> bool:
        """Whether the study is being deleted (read once per turn; once seen, for good)."""
        if not self.deleting and self.study is not None:
            self.deleting = deletion.deleting(self.study)
        return self.deleting

    def _deleted(self) -> StudyDeleted:
        for seat in self.seats:
            seat.slot.kill()  # a trial still running stops at its next report, or goes with it
        self.seats = []
        return StudyDeleted(
            f"study {self.plan.study_name!r} was deleted while this run ran (tuner study delete)"
        )

    def _close(self) -> None:
        if self.feed is not None:
            self.feed.stop()
        for seat in self.seats:
            seat.slot.kill()
        self.seats = []
        self.backend.close()

    def _drop(self, seat: _Seat) -> None:
        seat.slot.kill()
        self.seats.remove(seat)

    def _give_back(self) -> None:
        if self.remaining is not None:
            self.remaining += 1

    def _busy(self) -> list[_Seat]:
        return [seat for seat in self.seats if seat.since is not None]

    def _left_running(self, seats: list[_Seat]) -> list[Any]:
        if self.study is None:
            return []
        workers = {seat.slot.worker for seat in seats}
        return [
            t
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.user_attrs.get(attrs.WORKER) in workers
        ]

    def _trials_of(self, seat: _Seat, trials: list[Any] | None = None) -> list[Any]:
        """The trials the slot ran, oldest first, among `trials` (default: read afresh, as they
        may have just begun)."""
        worker = seat.slot.worker
        trials = self.study.get_trials(deepcopy=False) if trials is None else trials
        return [t for t in trials if t.user_attrs.get(attrs.WORKER) == worker]


def _own_error(trial: Any) -> tuple[str, ...] | None:
    """The error a FAIL trial failed by (its fail reason and detail: type and message); None for
    any other ending, and for a diverged trial or one out of memory: NaN and OOM are the params'
    doing (a constraint the sampler steers away from), not a broken set-up, and a search near its
    learning-rate or batch edge meets them often, with the same message each time."""
    if trial.state != TrialState.FAIL:
        return None
    said = attrs.failure(trial)
    if not said or said[0] in ("nan", "oom", deletion.REASON):
        return None
    return said


def _bundle(plan: RunPlan) -> str:
    """What one slot asks for, as the autoscaler sees it: `{GPU: 1, CPU: 1}`."""
    resources = plan.resources
    return f"{{GPU: {resources.gpus_per_trial:g}, CPU: {resources.cpus_per_trial:g}}}"
