"""Trials on a Ray cluster.

One actor per trial slot, each asking Ray for the space's `resources` (`gpus_per_trial`,
`cpus_per_trial`) and running Optuna's own optimize loop against the shared store, one trial at
a time. An actor runs trials back to back, so a GPU freed by a finished or pruned trial gets the
next trial at once: no batches, no barrier. The number of slots follows the cluster's resources,
so a node that joins mid-sweep gets work. The driver samples ahead and sends each actor its next
trial's params with the call that starts it (tuner/feed.py).

A trial that needs several GPUs (`gpus_per_trial: 4`) gets a slot of one actor per GPU, placed
together by a placement group and joined in one torch process group: rank 0 runs the Optuna
trial, the others train with it (DDP, or DeepSpeed when the space names a config), and rank 0's
prune decision stops every rank at the same step (`trials.distributed`).

An actor that dies (its process or node killed) has its running trial failed with the reason and
retried, up to `max_retries`, with the same params; a trial that failed by its own error is not
retried. Ray's token authentication stays on: `tuner` never starts a cluster without it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import time
import uuid
from typing import Any

from optuna.trial import TrialState

from tuner.backends.base import RunPlan
from tuner.budget import spent
from tuner.errors import BackendError
from tuner.feed import FedSampler, TrialFeed, read_while, take
from tuner.storage import mask_url, strip_password

logger = logging.getLogger(__name__)

MAX_DEATHS_PER_SLOT = 3  # beyond this the cause is not one unlucky worker: stop, say why


class RayBackend:
    name = "ray"

    def __init__(self, address: str | None = None) -> None:
        self.address = address

    def run(self, plan: RunPlan) -> None:
        import ray

        connect(self.address)
        # What actors receive is recorded by Ray (GCS, dashboard): never the password.
        actor_plan = dataclasses.replace(plan, storage_url=strip_password(plan.storage_url))
        if actor_plan.storage_url != plan.storage_url:
            logger.warning(
                "the storage password is not sent to Ray workers (%s); they read it from "
                "PGPASSWORD or ~/.pgpass on their node",
                mask_url(plan.storage_url),
            )
        study = _driver_study(plan)
        capacity = min(_capacity(plan), plan.n_trials or 1 << 30)
        depth = plan.feed_depth(capacity)
        fed: queue.Queue | None = queue.Queue(maxsize=max(depth, capacity)) if depth else None
        feed = TrialFeed(plan, fed, first=capacity, depth=depth).start() if depth else None
        remaining = plan.n_trials
        deadline = time.time() + plan.timeout if plan.timeout else None
        slots: dict[str, _Slot] = {}  # worker id → slot
        idle: list[str] = []
        pending: dict[Any, tuple[str, int]] = {}  # future → (worker id, rank)
        deaths = 0
        try:
            while True:
                expired = deadline is not None and time.time() > deadline
                if idle and not expired:
                    expired = spent(study, plan.gpus_per_trial, plan.gpu_hours)
                wanted = _capacity(plan)
                if remaining is not None:
                    wanted = min(wanted, remaining + len({w for w, _ in pending.values()}))
                while len(slots) < wanted and not expired:
                    slot = _Slot.start(actor_plan)
                    if slot is None:
                        break  # the cluster's resources are taken (by another job, say)
                    slots[slot.worker] = slot
                    idle.append(slot.worker)
                while idle and remaining != 0 and not expired:
                    worker = idle.pop()
                    for rank, future in enumerate(slots[worker].run_one(take(fed))):
                        pending[future] = (worker, rank)
                    if remaining is not None:
                        remaining -= 1
                if not pending:
                    break
                done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                for future in done:
                    if future not in pending:
                        continue  # its slot was dropped a moment ago
                    worker, rank = pending.pop(future)
                    slot = slots[worker]
                    try:
                        ray.get(future)
                        if not any(w == worker for w, _ in pending.values()):
                            idle.append(worker)
                        elif rank == 0:
                            slot.rank0_done = time.monotonic()
                        continue
                    except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as e:
                        reason, retry = f"Ray worker died: {_first(e)}", True
                    except ray.exceptions.RayTaskError as e:
                        # Not a trial's own error (Optuna records those): the store was out of
                        # reach for longer than its retries, say. Counted like a death.
                        who = "worker" if slot.ranks == 1 else f"rank {rank}"
                        reason = f"{who} failed: {_first(e.cause or e)}"
                        retry = slot.ranks == 1
                    deaths += 1
                    if deaths > MAX_DEATHS_PER_SLOT * max(1, _capacity(plan)):
                        raise BackendError(f"Ray workers keep dying; last: {reason}")
                    found, retried = _fail_and_retry(study, plan, worker, reason, retry=retry)
                    _drop(slot, slots, pending, idle)
                    if remaining is not None:
                        # A worker that died before its trial began (it could not reach the
                        # store, say) leaves that trial to the next one.
                        remaining += retried if found else 1
                for worker in _overdue(slots, pending, plan.trial_timeout):
                    reason = f"timed out after {plan.trial_timeout:g}s (resources.trial_timeout)"
                    logger.warning("%s: %s; killing its actors", worker, reason)
                    # It would hang again: failed, not retried; its place in the budget is used.
                    _fail_and_retry(study, plan, worker, reason, retry=False)
                    _drop(slots[worker], slots, pending, idle)
                for worker in _hung(slots, pending):
                    logger.warning("%s: ranks still busy after rank 0 ended; restarting", worker)
                    _drop(slots[worker], slots, pending, idle)
        except BaseException:
            for worker in list(slots):
                _fail_and_retry(
                    study, plan, worker, "interrupted (Ctrl-C or a stop signal)", retry=False
                )
            raise
        finally:
            if feed is not None:
                feed.stop()
            for slot in list(slots.values()):
                slot.stop()


RANK_GRACE_S = 60.0  # how long the other ranks may run on after rank 0 ended its trial


class _Slot:
    """Where one trial runs at a time: one actor, or for a multi-GPU trial one actor per GPU
    (rank 0 first) in a placement group, joined in one torch process group for its lifetime."""

    def __init__(self, worker: str, actors: list[Any], group: Any) -> None:
        self.worker = worker
        self.actors = actors
        self.group = group
        self.ranks = len(actors)
        self.rank0_done: float | None = None
        self.started: float | None = None  # when its current trial was handed out

    @classmethod
    def start(cls, plan: RunPlan) -> _Slot | None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        worker = f"ray-{uuid.uuid4().hex[:8]}"
        ranks = plan.ranks
        actor_class = ray.remote(max_restarts=0, max_concurrency=1)(TrialActor)
        if ranks == 1:
            actor = actor_class.options(
                num_gpus=plan.gpus_per_trial, num_cpus=plan.cpus_per_trial
            ).remote(plan, worker)
            return cls(worker, [actor], None)
        cpus = plan.cpus_per_trial / ranks
        group = placement_group([{"GPU": 1, "CPU": cpus}] * ranks, strategy="PACK")
        try:
            ray.get(group.ready(), timeout=60)
        except ray.exceptions.GetTimeoutError:
            ray.util.remove_placement_group(group)
            return None
        actors = [
            actor_class.options(
                num_gpus=1,
                num_cpus=cpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, rank),
            ).remote(plan, worker, rank=rank, world=ranks)
            for rank in range(ranks)
        ]
        address = ray.get(actors[0].rendezvous.remote())
        ray.get([actor.join.remote(address) for actor in actors])
        return cls(worker, actors, group)

    def run_one(self, params: dict | None = None) -> list[Any]:
        """Futures of one trial: rank 0 runs it (with `params` fed by the driver, if any), the
        others follow."""
        self.rank0_done = None
        self.started = time.monotonic()
        first = self.actors[0].run_one.remote(params)
        return [first] + [a.follow.remote() for a in self.actors[1:]]

    def stop(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        if self.group is not None:
            ray.util.remove_placement_group(self.group)


def _drop(slot: _Slot, slots: dict, pending: dict, idle: list) -> None:
    """End a slot whose trial is over or broken: all its ranks go, a fresh slot replaces it."""
    slot.stop()
    slots.pop(slot.worker, None)
    if slot.worker in idle:
        idle.remove(slot.worker)
    for future, (worker, _) in list(pending.items()):
        if worker == slot.worker:
            del pending[future]


def _overdue(slots: dict[str, _Slot], pending: dict, timeout: float | None) -> list[str]:
    """Slots whose trial has run past `resources.trial_timeout`."""
    if timeout is None:
        return []
    busy = {w for w, _ in pending.values()}
    now = time.monotonic()
    return [
        w
        for w, slot in slots.items()
        if w in busy and slot.started is not None and now - slot.started > timeout
    ]


def _hung(slots: dict[str, _Slot], pending: dict) -> list[str]:
    """Multi-GPU slots whose rank 0 ended its trial long ago while another rank still runs: a
    rank that failed mid-collective leaves the others waiting until the process group's timeout."""
    busy = {w for w, _ in pending.values()}
    now = time.monotonic()
    return [
        w
        for w, slot in slots.items()
        if w in busy and slot.rank0_done is not None and now - slot.rank0_done > RANK_GRACE_S
    ]


class TrialActor:
    """Runs trials of one study, one at a time, on the resources Ray gave it; in a multi-GPU
    slot, one rank of each trial."""

    def __init__(self, plan: RunPlan, worker: str, *, rank: int = 0, world: int = 1) -> None:
        from tuner.objective import Objective, quiet_worker_logs
        from tuner.study import open_study

        quiet_worker_logs(logging.WARNING)
        seed_offset = int(worker.split("-")[1], 16) % 100_000  # distinct draws per actor
        self.opened = open_study(
            plan.study_name, plan.storage_url, heartbeat=rank == 0, seed_offset=seed_offset
        )
        self.sampler = self.opened.study.sampler = FedSampler(self.opened.study.sampler)
        self.rank, self.world = rank, world
        self.objective = Objective(
            self.opened.space, artifact_dir=self.opened.artifact_dir, ranks=world
        )
        self.objective.worker = worker  # the driver fails the trial by this if the actor dies
        with read_while(self.opened.study):
            self.objective.warm_up(threads=max(1, int(plan.cpus_per_trial / world)))

    def rendezvous(self) -> str:
        from trials import distributed

        return distributed.rendezvous_address()

    def join(self, address: str) -> None:
        from trials import distributed

        distributed.init_group(rank=self.rank, world=self.world, address=address)

    def run_one(self, params: dict | None = None) -> None:
        self.sampler.offer(params)
        self.opened.study.optimize(
            self.objective, n_trials=1, catch=(Exception,), gc_after_trial=True
        )
        if self.world > 1 and not self.objective.shared:
            # The trial ended before its config was shared (a bad value, a store error): the
            # other ranks are waiting for one, so tell them there is none.
            from trials import distributed

            distributed.share(None)

    def follow(self) -> int | None:
        return self.objective.follow()


def _capacity(plan: RunPlan) -> int:
    """How many trials the cluster can hold at once, by its total resources."""
    import ray

    total = ray.cluster_resources()
    by_cpu = int(total.get("CPU", 0) // plan.cpus_per_trial)
    if plan.gpus_per_trial > 0:
        return min(by_cpu, int(total.get("GPU", 0) // plan.gpus_per_trial))
    return by_cpu


def _fail_and_retry(
    study: Any, plan: RunPlan, worker: str, reason: str, *, retry: bool = True
) -> tuple[bool, bool]:
    """Fail the trial a dead worker left RUNNING and enqueue its retry.
    Returns (whether the worker had a trial running, whether a retry was enqueued)."""
    from tuner import recovery

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.user_attrs.get(recovery.WORKER_ATTR) == worker:
            retried = recovery.fail_and_retry(
                study, trial, reason, max_retries=plan.max_retries, retry=retry
            )
            return True, retried
    return False, False


def _driver_study(plan: RunPlan) -> Any:
    """One store connection for the driver's bookkeeping, however many workers die."""
    import optuna

    from tuner.storage import open_storage

    return optuna.load_study(study_name=plan.study_name, storage=open_storage(plan.storage_url))


def _first(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else type(error).__name__


def connect(address: str | None) -> None:
    """Join the cluster at `address` (`auto`, `HOST:PORT`, `ray://HOST:10001`), or the one
    RAY_ADDRESS names (inside `ray job submit`), or start a local one with token auth on."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        _ensure_token()
    try:
        ray.init(
            address=address,
            log_to_driver=False,
            configure_logging=False,
            include_dashboard=False if address is None else None,
        )
    except Exception as e:  # noqa: BLE001 - Ray raises many kinds; the user needs one line
        raise BackendError(
            f"cannot connect to Ray at {address or 'a new local cluster'}: {_first(e)}"
        ) from None


def _ensure_token() -> None:
    from ray._private.authentication import authentication_token_setup as tokens

    if not tokens._get_default_token_path().exists():
        tokens.generate_and_save_token()
