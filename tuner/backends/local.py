"""Trials on this machine: `jobs` worker processes, each running Optuna's own optimize loop
against the shared study store (which is what makes median pruning see every trial).

Workers take trials from a shared counter, so a run finishes exactly the trials asked for. The
driver samples ahead and feeds the workers through a queue (tuner/feed.py). A
worker that dies has its trial failed and retried (up to the space's `max_retries`), and a new
worker takes its place.
They live in their own process group: Ctrl-C reaches the driver only, which interrupts each
worker once; the worker's trial ends FAIL ("interrupted") and nothing is left RUNNING.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import time
from typing import Any

from tuner.backends.base import RunPlan
from tuner.budget import spent
from tuner.errors import BackendError
from tuner.feed import FedSampler, TrialFeed, read_while, take

logger = logging.getLogger(__name__)

INTERRUPT_GRACE_S = 60.0
MAX_RESTARTS_PER_JOB = 3


class _Slots:
    """A counter of trials left to start, shared by the worker processes."""

    def __init__(self, ctx: Any, n_trials: int | None) -> None:
        self.value = ctx.Value("i", -1 if n_trials is None else n_trials)

    def take(self) -> bool:
        with self.value.get_lock():
            if self.value.value == 0:
                return False
            if self.value.value > 0:
                self.value.value -= 1
            return True

    def give_back(self) -> None:
        with self.value.get_lock():
            if self.value.value >= 0:
                self.value.value += 1

    def left(self) -> bool:
        return self.value.value != 0


class LocalBackend:
    name = "local"

    def run(self, plan: RunPlan) -> None:
        ctx = mp.get_context("spawn")  # fresh interpreters: no torch or DB state copied by fork
        slots = _Slots(ctx, plan.n_trials)
        running = ctx.Array("i", [-1] * plan.jobs)  # the trial id each worker is on
        since = ctx.Array("d", [0.0] * plan.jobs)  # when it began (time.time())
        timed_out: set[int] = set()
        deadline = time.time() + plan.timeout if plan.timeout else None
        threads = max(1, (os.cpu_count() or 1) // plan.jobs)
        level = logging.getLogger("tuner").getEffectiveLevel()
        gpus = assign_gpus(plan.jobs, visible_gpus())
        depth = plan.feed_depth(plan.jobs)
        fed = ctx.Queue(maxsize=max(depth, plan.jobs)) if depth else None
        feed = TrialFeed(plan, fed, first=plan.jobs, depth=depth).start() if depth else None

        def start(index: int) -> Any:
            process = ctx.Process(
                target=_worker,
                args=(
                    index,
                    plan,
                    slots,
                    running,
                    since,
                    deadline,
                    threads,
                    level,
                    os.getpid(),
                    gpus[index],
                    fed,
                ),
                name=f"tuner-worker-{index}",
            )
            process.start()
            return process

        workers = {i: start(i) for i in range(plan.jobs)}
        restarts = 0
        try:
            while workers:
                for index, process in list(workers.items()):
                    process.join(timeout=0.2)
                    if process.exitcode is None:
                        if index not in timed_out and _overdue(plan, running, since, index):
                            logger.warning(
                                "trial %d ran past resources.trial_timeout (%gs); killing its "
                                "worker",
                                running[index],
                                plan.trial_timeout,
                            )
                            timed_out.add(index)
                            process.kill()
                        continue
                    del workers[index]
                    if process.exitcode == 0:
                        continue
                    timed = index in timed_out
                    if timed:
                        timed_out.discard(index)
                        reason = (
                            f"timed out after {plan.trial_timeout:g}s (resources.trial_timeout)"
                        )
                        # It would hang again: failed, not retried; its slot is used up.
                        _fail_orphan(plan, running, index, reason, retry=False)
                    else:
                        reason = f"worker process died (exit code {process.exitcode})"
                        if _fail_orphan(plan, running, index, reason, retry=True):
                            slots.give_back()  # the retry takes the dead trial's place
                    expired = deadline is not None and time.time() > deadline
                    if slots.left() and not expired:
                        if not timed:  # a hang is the trial's doing, not the worker's
                            restarts += 1
                            if restarts > MAX_RESTARTS_PER_JOB * plan.jobs:
                                raise BackendError(
                                    "worker processes keep dying (last exit code "
                                    f"{process.exitcode}); see the log above"
                                )
                            logger.warning(
                                "worker %d died (exit code %s); starting another",
                                index,
                                process.exitcode,
                            )
                        workers[index] = start(index)
        except BaseException:
            _stop(workers)
            for index in range(plan.jobs):
                _fail_orphan(
                    plan, running, index, "interrupted (Ctrl-C or a stop signal)", retry=False
                )
            raise
        finally:
            if feed is not None:
                feed.stop()
                fed.cancel_join_thread()  # suggestions left in the queue are dropped


def _overdue(plan: RunPlan, running: Any, since: Any, index: int) -> bool:
    if plan.trial_timeout is None or running[index] < 0:
        return False
    return time.time() - since[index] > plan.trial_timeout


def visible_gpus() -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES if set, else every device torch sees."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def assign_gpus(jobs: int, gpus: list[str]) -> list[str | None]:
    """Worker i trains on GPU i mod n (None: no GPU). More jobs than GPUs share them."""
    if not gpus:
        return [None] * jobs
    if jobs > len(gpus):
        logger.warning("%d jobs share %d GPUs; expect them to compete for memory", jobs, len(gpus))
    return [gpus[i % len(gpus)] for i in range(jobs)]


def _stop(workers: dict[int, Any]) -> None:
    """Interrupt each worker once, give its trial time to be marked FAIL, then kill stragglers."""
    for process in workers.values():
        if process.is_alive():
            os.kill(process.pid, signal.SIGINT)
    deadline = time.monotonic() + INTERRUPT_GRACE_S
    for process in workers.values():
        process.join(timeout=max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


def _fail_orphan(plan: RunPlan, running: Any, index: int, reason: str, *, retry: bool) -> bool:
    """Fail the trial a dead worker left RUNNING, so that it does not wait for heartbeats, and
    enqueue its retry. Returns whether a retry was enqueued."""
    trial_id = running[index]
    running[index] = -1
    if trial_id < 0:
        return False
    import optuna

    from tuner import recovery
    from tuner.storage import open_storage

    storage = open_storage(plan.storage_url)
    try:
        study = optuna.load_study(study_name=plan.study_name, storage=storage)
        return recovery.fail_and_retry(
            study, storage.get_trial(trial_id), reason, max_retries=plan.max_retries, retry=retry
        )
    finally:
        storage.engine.dispose()


def _retried_elsewhere(opened: Any, trial_id: int, plan: RunPlan) -> bool:
    """Whether this worker's trial was failed by another process while it ran: a worker's
    heartbeat check fails a trial whose heartbeats stopped for the grace period (the store was
    away longer than that) and enqueues its retry (recovery.RetryStale), which needs a slot."""
    from optuna.trial import TrialState

    from tuner import recovery

    try:
        trial = opened.store.get_trial(trial_id)
    except Exception:
        return False
    return trial.state == TrialState.FAIL and recovery.retries(trial) < plan.max_retries


def _worker(
    index: int,
    plan: RunPlan,
    slots: _Slots,
    running: Any,
    since: Any,
    deadline: float | None,
    threads: int,
    log_level: int,
    driver_pid: int,
    gpu: str | None,
    fed: Any,
) -> None:
    os.setpgrp()  # the terminal's Ctrl-C goes to the driver, which forwards it once
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # before torch is imported
    from tuner.algorithms import build_sampler
    from tuner.objective import Objective, quiet_worker_logs
    from tuner.study import open_study

    quiet_worker_logs(log_level)
    opened = open_study(plan.study_name, plan.storage_url, heartbeat=True)
    objective = Objective(opened.space, artifact_dir=opened.artifact_dir)

    def started(trial: Any) -> None:
        since[index] = time.time()
        running[index] = trial._trial_id

    objective.on_trial_start = started
    with read_while(opened.study):
        objective.warm_up(threads=threads)
    # Distinct seeds per worker and per run, so that no two draw the same random trials; the
    # study was just read into the cache, so counting its trials costs no query.
    seed_offset = 7919 * index + len(opened.study.get_trials(deepcopy=False))
    sampler = opened.study.sampler = FedSampler(
        build_sampler(opened.space.sampler, seed_offset=seed_offset)
    )
    try:
        while slots.take():
            expired = deadline is not None and time.time() > deadline
            if (
                expired
                or os.getppid() != driver_pid
                or spent(opened.study, plan.gpus_per_trial, plan.gpu_hours)
            ):
                slots.give_back()
                break
            if fed is not None and sampler.wants():
                sampler.offer(take(fed))
            try:
                opened.study.optimize(
                    objective, n_trials=1, catch=(Exception,), gc_after_trial=True
                )
            except Exception:
                # No trial began (the store failed first), or another process failed this one
                # as stale and enqueued its retry: either way the slot is not spent.
                if running[index] < 0 or _retried_elsewhere(opened, running[index], plan):
                    slots.give_back()
                raise
            running[index] = -1
    except KeyboardInterrupt:
        running[index] = -1  # Optuna has already marked the trial FAIL
        raise SystemExit(130) from None
