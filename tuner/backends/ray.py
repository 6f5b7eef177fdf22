"""Trials on a Ray cluster.

One actor per trial slot, each asking Ray for the space's `resources` (`gpus_per_trial`,
`cpus_per_trial`) and running Optuna's own optimize loop against the shared store, one trial at
a time. An actor runs trials back to back, so a GPU freed by a finished or pruned trial gets the
next trial at once: no batches, no barrier. The number of actors follows the cluster's resources,
so a node that joins mid-sweep gets work.

An actor that dies (its process or node killed) has its running trial failed with the reason and
retried, up to `max_retries`, with the same params; a trial that failed by its own error is not
retried. Ray's token authentication stays on: `tuner` never starts a cluster without it.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
import uuid
from typing import Any

from tuner.backends.base import RunPlan
from tuner.errors import BackendError
from tuner.storage import mask_url, strip_password

logger = logging.getLogger(__name__)

WORKER_ATTR = "worker"
_PER_ATTEMPT_ATTRS = (WORKER_ATTR, "worker_pid", "fail_reason")  # not copied into a retry


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
        actor_class = ray.remote(max_restarts=0, max_concurrency=1)(TrialActor)
        remaining = plan.n_trials
        deadline = time.time() + plan.timeout if plan.timeout else None
        actors: dict[str, Any] = {}  # worker id → handle
        idle: list[str] = []
        pending: dict[Any, str] = {}  # future → worker id
        try:
            while True:
                expired = deadline is not None and time.time() > deadline
                wanted = _slots(plan)
                if remaining is not None:
                    wanted = min(wanted, remaining + len(pending))
                while len(actors) < wanted and not expired:
                    worker = f"ray-{uuid.uuid4().hex[:8]}"
                    actors[worker] = actor_class.options(
                        num_gpus=plan.gpus_per_trial, num_cpus=plan.cpus_per_trial
                    ).remote(actor_plan, worker)
                    idle.append(worker)
                while idle and remaining != 0 and not expired:
                    worker = idle.pop()
                    pending[actors[worker].run_one.remote()] = worker
                    if remaining is not None:
                        remaining -= 1
                if not pending:
                    break
                done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                for future in done:
                    worker = pending.pop(future)
                    try:
                        ray.get(future)
                        idle.append(worker)
                    except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as e:
                        del actors[worker]
                        retried = _fail_and_retry(plan, worker, f"Ray worker died: {_first(e)}")
                        if remaining is not None:
                            remaining += retried
        except BaseException:
            for worker in list(actors):
                _fail_and_retry(plan, worker, "interrupted (Ctrl-C or a stop signal)", retry=False)
            raise
        finally:
            for handle in actors.values():
                ray.kill(handle)


class TrialActor:
    """Runs trials of one study, one at a time, on the resources Ray gave it."""

    def __init__(self, plan: RunPlan, worker: str) -> None:
        from tuner.objective import Objective, quiet_worker_logs
        from tuner.study import open_study

        quiet_worker_logs(logging.WARNING)
        seed_offset = int(worker.split("-")[1], 16) % 100_000  # distinct draws per actor
        self.opened = open_study(
            plan.study_name, plan.storage_url, heartbeat=True, seed_offset=seed_offset
        )
        self.objective = Objective(self.opened.space, artifact_dir=self.opened.artifact_dir)
        self.objective.on_trial_start = lambda trial: _mark(trial, worker)
        self.objective.warm_up(threads=max(1, int(plan.cpus_per_trial)))

    def run_one(self) -> None:
        self.opened.study.optimize(
            self.objective, n_trials=1, catch=(Exception,), gc_after_trial=True
        )


def _mark(trial: Any, worker: str) -> None:
    """Which actor (and process) runs the trial: the driver fails it by this if the actor dies."""
    trial.set_user_attr(WORKER_ATTR, worker)
    trial.set_user_attr("worker_pid", os.getpid())


def _slots(plan: RunPlan) -> int:
    """How many trials the cluster can hold at once, by its total resources."""
    import ray

    total = ray.cluster_resources()
    by_cpu = int(total.get("CPU", 0) // plan.cpus_per_trial)
    if plan.gpus_per_trial > 0:
        return min(by_cpu, int(total.get("GPU", 0) // plan.gpus_per_trial))
    return by_cpu


def _fail_and_retry(plan: RunPlan, worker: str, reason: str, *, retry: bool = True) -> int:
    """Fail the trial a dead worker left RUNNING; enqueue a retry. Returns retries enqueued."""
    import optuna
    from optuna.trial import TrialState

    from tuner.objective import fail_trial
    from tuner.storage import open_storage

    storage = open_storage(plan.storage_url)
    study = optuna.load_study(study_name=plan.study_name, storage=storage)
    retried = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.user_attrs.get(WORKER_ATTR) != worker:
            continue
        if not fail_trial(storage, trial._trial_id, reason):
            continue
        if retry and _retries(trial) < plan.max_retries:
            # Optuna's own retry: a WAITING copy with the same params, linked to the original.
            clean = copy.copy(trial)
            clean.user_attrs = {
                k: v for k, v in trial.user_attrs.items() if k not in _PER_ATTEMPT_ATTRS
            }
            optuna.storages.RetryFailedTrialCallback(max_retry=plan.max_retries)(study, clean)
            retried += 1
    return retried


def _retries(trial: Any) -> int:
    return len(trial.system_attrs.get("retry_history", []))


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
