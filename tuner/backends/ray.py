"""Trials on a Ray cluster: a slot is an actor (tuner/backends/worker.py) that asks Ray for the
space's `resources` (`gpus_per_trial`, `cpus_per_trial`) and runs trials back to back, so a GPU
freed by a finished or pruned trial gets the next trial at once. The driver starts as many slots
as the run can use (tuner/backends/driver.py); those beyond the cluster's room wait in pending
placement groups, which is what asks the autoscaler for nodes, and take trials as nodes join.

A trial that needs several GPUs (`gpus_per_trial: 4`) gets a slot of one actor per GPU, placed
on one node by a placement group and joined in one torch process group: rank 0 runs the Optuna
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
from tuner.common import extras
from tuner.common.errors import BackendError
from tuner.store import mask_url, strip_password

logger = logging.getLogger(__name__)

RANK_GRACE_S = 60.0  # how long the other ranks may run on after rank 0 ended its trial
NODES_LOOK_S = 2.0  # how often the nodes are looked at while slots wait for room


class RayBackend:
    """Each slot reserves its resources with a placement group before its actors start: a group
    still pending is demand the autoscaler sees (and grows the cluster for), it withdraws with
    the slot, and it ends with the driver if the driver dies. Not `request_resources`: that is
    one value per cluster, so two sweeps would overwrite each other's, the first to end would
    drop both, and a killed driver would leave it standing."""

    elastic = True  # slots start beyond the room, and wait for it

    def __init__(self, address: str | None = None) -> None:
        extras.require("ray", what="--backend ray")
        self.address = address
        self.largest: tuple[float, float] | None = None  # (GPU, CPU): the biggest node seen
        self._looked = 0.0

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
        self._look_at_nodes()

    def capacity(self, plan: RunPlan) -> int:
        """How many trials the cluster can hold at once, by its total resources."""
        import ray

        total, asks = ray.cluster_resources(), plan.resources
        by_cpu = int(total.get("CPU", 0) // asks.cpus_per_trial)
        if asks.gpus_per_trial > 0:
            return min(by_cpu, int(total.get("GPU", 0) // asks.gpus_per_trial))
        return by_cpu

    def start(self, plan: RunPlan, index: int) -> RaySlot:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        ranks, asks = plan.ranks, plan.resources
        spec = WorkerSpec(
            plan.study_name,
            self.url,
            worker=f"ray-{uuid.uuid4().hex[:8]}",
            index=index,
            threads=max(1, int(asks.cpus_per_trial / ranks)),
            world=ranks,
            run=plan.run,
            seed_offset=plan.seed_offset,
        )
        # One bundle per rank, all on one node (STRICT_PACK): a trial's ranks talk at the
        # speed of one machine, and a trial bigger than any node is said so, not spread.
        gpus = asks.gpus_per_trial if ranks == 1 else 1
        bundle = {"GPU": gpus, "CPU": asks.cpus_per_trial / ranks}
        group = placement_group(
            [{k: v for k, v in bundle.items() if v > 0}] * ranks, strategy="STRICT_PACK"
        )
        # The actors are made at once, in the group: Ray starts them the moment it is placed.
        actors = [
            self.actor.options(
                num_gpus=bundle["GPU"],
                num_cpus=bundle["CPU"],
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, rank),
            ).remote(dataclasses.replace(spec, rank=rank))
            for rank in range(ranks)
        ]
        return RaySlot(spec.worker, actors, group)

    def wait(self, slots: list[RaySlot], timeout: float) -> None:
        import ray

        refs = [ref for slot in slots for ref in (slot.pending if slot.held else [slot.ready])]
        if any(not slot.held for slot in slots):
            self._look_at_nodes()
        if refs:
            ray.wait(refs, num_returns=1, timeout=timeout)
        else:
            time.sleep(timeout)  # only ranks past rank 0's end: their grace is counted in poll

    def unplaced(self, plan: RunPlan) -> str:
        self._look_at_nodes(now=True)
        asks = plan.resources
        ask = f"{asks.gpus_per_trial:g} GPU + {asks.cpus_per_trial:g} CPU"
        line = f"a trial asks for {ask}{' on one node' if plan.ranks > 1 else ''}; "
        if self.largest is None:
            return line + "no node was seen"
        gpus, cpus = self.largest
        line += f"the most any node offered is {gpus:g} GPU, {cpus:g} CPU"
        if gpus >= asks.gpus_per_trial and cpus >= asks.cpus_per_trial:
            line += " (other work held it all along)"
        return line

    def _look_at_nodes(self, *, now: bool = False) -> None:
        """Note the biggest node alive (by GPUs, then CPUs), for `unplaced` to name."""
        import ray

        if not now and time.monotonic() - self._looked < NODES_LOOK_S:
            return
        self._looked = time.monotonic()
        for node in ray.nodes():
            if node.get("Alive"):
                resources = node.get("Resources") or {}
                size = (resources.get("GPU", 0.0), resources.get("CPU", 0.0))
                self.largest = max(self.largest or size, size)

    def close(self) -> None:
        pass


class RaySlot:
    """Where one trial runs at a time: one actor, or for a multi-GPU trial one actor per GPU
    (rank 0 first), joined in one torch process group for the slot's lifetime. The actors wait
    for their placement group to be placed, then start (and warm up) in it."""

    def __init__(self, worker: str, actors: list[Any], group: Any) -> None:
        self.worker = worker
        self.actors = actors
        self.group = group
        self.ready = group.ready()  # resolves when the group holds its resources
        self.held = False
        # A multi-GPU slot's joins, queued on each actor ahead of its first trial; checked
        # by poll until each is known to be done.
        self.setup: list[Any] = []
        if len(actors) > 1:
            address = actors[0].rendezvous.remote()  # passed on as the value it resolves to
            self.setup = [actor.join.remote(address) for actor in actors]
        self.futures: list[Any] = []
        self.pending: list[Any] = []
        self.rank0_done: float | None = None

    def placed(self) -> bool:
        import ray

        self.held = self.held or bool(ray.wait([self.ready], timeout=0)[0])
        return self.held

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
        if self.setup and (ended := self._joined()) is not None:
            return ended
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

    def _joined(self) -> Ended | None:
        """A rank that could not join the process group ends the slot (the others would wait
        for it); the trial is retried on a fresh one."""
        import ray

        done, _ = ray.wait(self.setup, num_returns=len(self.setup), timeout=0)
        for future in done:
            try:
                ray.get(future)
            except ray.exceptions.RayError as e:
                died = f"a rank could not join the others: {_first(e)}"
                return self._ended(Ended(died=died, reusable=False))
        if len(done) == len(self.setup):
            self.setup = []
        return None

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
        ray.util.remove_placement_group(self.group)  # withdraws its ask, if it still waits


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
