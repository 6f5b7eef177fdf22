"""Trials on a Ray cluster: a slot is an actor (tuner/backends/worker.py) that asks Ray for the
space's `resources` (`gpus_per_trial`, `cpus_per_trial`) and runs trials back to back, so a GPU
freed by a finished or pruned trial gets the next trial at once. The number of slots follows the
cluster's resources, so a node that joins mid-sweep gets work.

A trial that needs several GPUs (`gpus_per_trial: 4`) gets a slot of one actor per GPU, placed
together by a placement group and joined in one torch process group: rank 0 runs the Optuna
trial, the others train with it (DDP, or DeepSpeed when the space names a config), and rank 0's
prune decision stops every rank at the same step (`trials.distributed`).

What the actors receive is recorded by Ray (GCS, dashboard): never the storage password. Ray's
token authentication stays on: `tuner` never starts a cluster without it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid
from typing import Any

from tuner.backends.base import Ended, RunPlan
from tuner.backends.ray_job import is_job_address
from tuner.backends.worker import Worker, WorkerSpec
from tuner.errors import BackendError
from tuner.store import mask_url, strip_password

logger = logging.getLogger(__name__)

RANK_GRACE_S = 60.0  # how long the other ranks may run on after rank 0 ended its trial
PLACEMENT_WAIT_S = 60.0  # how long a multi-GPU slot waits for its GPUs to be free together


class RayBackend:
    def __init__(self, address: str | None = None) -> None:
        self.address = address

    def open(self, plan: RunPlan) -> None:
        import ray

        connect(self.address)
        self.url = strip_password(plan.storage_url)
        if self.url != plan.storage_url:
            logger.warning(
                "the storage password is not sent to Ray workers (%s); they read it from "
                "PGPASSWORD or ~/.pgpass on their node",
                mask_url(plan.storage_url),
            )
        self.actor = ray.remote(max_restarts=0, max_concurrency=1)(RayWorker)

    def capacity(self, plan: RunPlan) -> int:
        """How many trials the cluster can hold at once, by its total resources."""
        import ray

        total = ray.cluster_resources()
        by_cpu = int(total.get("CPU", 0) // plan.cpus_per_trial)
        if plan.gpus_per_trial > 0:
            return min(by_cpu, int(total.get("GPU", 0) // plan.gpus_per_trial))
        return by_cpu

    def start(self, plan: RunPlan, index: int) -> RaySlot | None:
        worker, ranks = f"ray-{uuid.uuid4().hex[:8]}", plan.ranks
        spec = WorkerSpec(
            plan.study_name,
            self.url,
            worker=worker,
            index=index,
            threads=max(1, int(plan.cpus_per_trial / ranks)),
            world=ranks,
        )
        if ranks == 1:
            actor = self.actor.options(
                num_gpus=plan.gpus_per_trial, num_cpus=plan.cpus_per_trial
            ).remote(spec)
            return RaySlot(worker, [actor], None)
        return self._start_gang(spec, plan.cpus_per_trial / ranks)

    def _start_gang(self, spec: WorkerSpec, cpus: float) -> RaySlot | None:
        """One actor per rank, on GPUs reserved together, joined in one process group."""
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group = placement_group([{"GPU": 1, "CPU": cpus}] * spec.world, strategy="PACK")
        try:
            ray.get(group.ready(), timeout=PLACEMENT_WAIT_S)
        except ray.exceptions.GetTimeoutError:
            ray.util.remove_placement_group(group)
            return None
        actors = [
            self.actor.options(
                num_gpus=1,
                num_cpus=cpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, rank),
            ).remote(dataclasses.replace(spec, rank=rank))
            for rank in range(spec.world)
        ]
        address = ray.get(actors[0].rendezvous.remote())
        ray.get([actor.join.remote(address) for actor in actors])
        return RaySlot(spec.worker, actors, group)

    def wait(self, slots: list[RaySlot], timeout: float) -> None:
        import ray

        pending = [future for slot in slots for future in slot.pending]
        if pending:
            ray.wait(pending, num_returns=1, timeout=timeout)
        else:
            time.sleep(timeout)  # only ranks past rank 0's end: their grace is counted in poll

    def close(self) -> None:
        pass


class RaySlot:
    """Where one trial runs at a time: one actor, or for a multi-GPU trial one actor per GPU
    (rank 0 first) in a placement group, joined in one torch process group for its lifetime."""

    def __init__(self, worker: str, actors: list[Any], group: Any) -> None:
        self.worker = worker
        self.actors = actors
        self.group = group
        self.futures: list[Any] = []
        self.pending: list[Any] = []
        self.rank0_done: float | None = None

    def run(self, params: dict[str, Any] | None) -> None:
        """Rank 0 runs the trial (with `params` fed by the driver, if any), the others follow."""
        first = self.actors[0].run_one.remote(params)
        self.futures = [first] + [actor.follow.remote() for actor in self.actors[1:]]
        self.pending = list(self.futures)
        self.rank0_done = None

    def poll(self) -> Ended | None:
        import ray

        if not self.futures:
            return None
        done, self.pending = ray.wait(self.futures, num_returns=len(self.futures), timeout=0)
        ran = None
        for rank, future in enumerate(self.futures):
            if future not in done:
                continue
            try:
                value = ray.get(future)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as e:
                return self._ended(Ended(died=f"Ray worker died: {_first(e)}"))
            except ray.exceptions.RayTaskError as e:
                # Not a trial's own error (Optuna records those): the store was out of reach
                # for longer than its retries, say. A rank's failure is not retried.
                who = "worker" if len(self.actors) == 1 else f"rank {rank}"
                died = f"{who} failed: {_first(e.cause or e)}"
                return self._ended(Ended(died=died, retry=len(self.actors) == 1))
            ran = value if rank == 0 else ran
        if not self.pending:
            return self._ended(Ended(ran=ran))
        return self._rank0_alone(ran) if ran is not None else None

    def _rank0_alone(self, ran: Any) -> Ended | None:
        """A rank that failed mid-collective leaves the others waiting until the process
        group's timeout: after RANK_GRACE_S the slot ends, and is replaced."""
        now = time.monotonic()
        if self.rank0_done is None:
            self.rank0_done = now
        if now - self.rank0_done <= RANK_GRACE_S:
            return None
        logger.warning("%s: ranks still busy after rank 0 ended; restarting", self.worker)
        return self._ended(Ended(ran=ran, reusable=False))

    def _ended(self, ended: Ended) -> Ended:
        self.futures, self.pending = [], []
        return ended

    def interrupt(self) -> bool:
        return False  # a running actor task cannot be interrupted: the driver kills the slot

    def kill(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        if self.group is not None:
            ray.util.remove_placement_group(self.group)


class RayWorker(Worker):
    """The worker as a Ray actor, with what a multi-GPU slot needs to form its process group."""

    def rendezvous(self) -> str:
        import ray

        from trials import distributed

        return distributed.rendezvous_address(ray.util.get_node_ip_address())

    def join(self, address: str) -> None:
        from trials import distributed

        distributed.init_group(rank=self.spec.rank, world=self.spec.world, address=address)


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
    if is_job_address(address):
        # The job API, not a GCS: a driver there runs as a Ray job (tuner/backends/ray_job.py).
        raise BackendError(
            f"--address {address} is a Ray job API: submit the run as a job "
            "(`tuner study submit`, or `tuner study run`/`tuner sweep run` from the CLI)"
        )
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
