"""Trials on this machine: a slot is a worker process (tuner/backends/worker.py), fed one trial
at a time through a pipe. Worker i trains on GPU i mod n when there are GPUs.

Workers start as fresh interpreters, with no database or CUDA state of the driver's: spawned, or,
for a training run on a machine without GPUs, forked by multiprocessing's fork server, which
imported the training stack once for every worker (`worker_context`). Each goes into its
own process group, so a terminal's Ctrl-C reaches the driver only, which interrupts each worker
once: its trial ends FAIL "interrupted" and nothing is left RUNNING. A worker whose driver is
gone, however it went (`kill -9` of the run's process group included), fails its trial, which
is retried, and exits (tuner.backends.lifeline). A worker stopped (`kill -STOP`, a debugger) for
longer than the heartbeat grace period is killed (`StoppedWatch`): stopped inside a write, it
holds the store's lock, and every other process, the driver included, would wait on it for good.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tuner.backends import lifeline
from tuner.backends.base import Ended, RunPlan
from tuner.backends.worker import Worker, WorkerSpec
from tuner.common.errors import BackendError, StoreFull, StudyDeleted
from tuner.common.settings import get_settings
from tuner.common.text import error_line
from tuner.store import recovery

logger = logging.getLogger(__name__)

IDLE_EXIT_S = 10.0  # how long a free worker may take to exit once told to
GPU_DRIVERS = ("/proc/driver/nvidia", "/dev/kfd")  # NVIDIA's and AMD's (ROCm) kernel drivers
ELSEWHERE = (
    "run it with --backend ray on a cluster that can, or use a space for this machine "
    "(quickstart.yaml, lora_sft_small.yaml)"
)


class LocalBackend:
    elastic = False  # this machine does not grow: `jobs` workers, placed as they start

    def __init__(self, address: str | None = None) -> None:
        # This machine is the place: there is no cluster address to use.
        self.ctx: Any = None  # how workers start, from `open`
        self.watch: StoppedWatch | None = None  # from `open`

    def open(self, plan: RunPlan) -> None:
        jobs = self.capacity(plan)
        gpus = visible_gpus()
        check_serves(plan, gpus)
        self.ctx = worker_context(plan, gpus)
        self.threads = max(1, (os.cpu_count() or 1) // jobs)
        self.gpus = assign_gpus(jobs, gpus)
        self.log_level = logging.getLogger("tuner").getEffectiveLevel()
        self.watch = StoppedWatch(get_settings().grace_period).start()

    def capacity(self, plan: RunPlan) -> int:
        return plan.jobs or 1

    def start(self, plan: RunPlan, index: int) -> LocalSlot:
        spec = WorkerSpec(
            plan.study_name,
            plan.storage_url,
            worker=f"local-{uuid.uuid4().hex[:8]}",
            index=index,
            threads=self.threads,
            log_level=self.log_level,
            run=plan.run,
            seed_offset=plan.seed_offset,
        )
        ours, theirs = self.ctx.Pipe()
        gpu = self.gpus[index % len(self.gpus)]
        # The environment goes along: a forked worker would have its fork server's, which is
        # this process's as it was when the server started.
        process = self.ctx.Process(
            target=_serve,
            args=(theirs, spec, gpu, os.getpid(), dict(os.environ)),
            name=f"tuner-worker-{index}",
        )
        process.start()
        theirs.close()  # the worker's end lives in the worker: its exit closes the pipe
        slot = LocalSlot(spec.worker, process, ours)
        self.watch.add(slot)
        return slot

    def wait(self, slots: list[LocalSlot], timeout: float) -> None:
        handles = [h for slot in slots for h in (slot.conn, slot.process.sentinel)]
        multiprocessing.connection.wait(handles, timeout)

    def unplaced(self, plan: RunPlan) -> str:
        return "worker processes could not start on this machine"  # never: they start placed

    def close(self) -> None:
        if self.watch is not None:
            self.watch.stop()


class StoppedWatch:
    """Kills the workers that stay stopped (state T in /proc: `kill -STOP`, a debugger) for
    longer than `grace_s`, the heartbeat grace period, by then their trials are stale for
    everyone. The store cannot be asked (a worker stopped inside a write holds its lock), so
    this looks at the processes only. Linux's /proc; elsewhere it sees nothing stopped."""

    INTERVAL_S = 0.5

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.slots: list[LocalSlot] = []
        self.lock = threading.Lock()
        self.done = threading.Event()

    def start(self) -> StoppedWatch:
        threading.Thread(target=self._run, name="tuner-stopped-watch", daemon=True).start()
        return self

    def add(self, slot: LocalSlot) -> None:
        with self.lock:
            self.slots = [s for s in self.slots if not s.conn.closed] + [slot]

    def stop(self) -> None:
        self.done.set()

    def _run(self) -> None:
        since: dict[int, float] = {}  # pid: when first seen stopped (monotonic)
        while not self.done.wait(self.INTERVAL_S):
            with self.lock:
                slots = list(self.slots)
            now = time.monotonic()
            for slot in slots:
                if slot.conn.closed or slot.killed_as:
                    continue  # let go: its pid may be another process's by now
                pid = slot.process.pid
                if not _stopped(pid):
                    since.pop(pid, None)
                    continue
                if now - since.setdefault(pid, now) > self.grace_s:
                    slot.killed_as = (
                        f"worker process was stopped (kill -STOP, a debugger) for longer than "
                        f"the heartbeat grace period ({self.grace_s:g} s), and killed"
                    )
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)


def _stopped(pid: int | None) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False  # gone, or no /proc
    return stat.rpartition(")")[2].split()[0] in ("T", "t")  # after "(comm)": the state


class LocalSlot:
    def __init__(self, worker: str, process: Any, conn: Any) -> None:
        self.worker = worker
        self.process = process
        self.conn = conn
        self.busy = False
        self.killed_as: str | None = None  # why the StoppedWatch killed it

    def run(self, params: dict[str, Any] | None) -> None:
        self.conn.send(params)
        self.busy = True

    def placed(self) -> bool:
        return True  # a process of this machine: its room is the machine's

    def poll(self) -> Ended | None:
        if self.conn.poll():
            try:
                ran = self.conn.recv()
                self.busy = False
                return Ended(ran=ran)
            except (EOFError, OSError):
                pass  # the worker is gone: its exit code says how
        if self.process.is_alive():
            return None
        self.process.join()
        self.busy = False
        return Ended(
            died=self.killed_as or f"worker process died (exit code {self.process.exitcode})"
        )

    def interrupt(self) -> bool:
        if not self.process.is_alive():
            return False
        os.kill(self.process.pid, signal.SIGINT)
        return True

    def kill(self) -> None:
        # A free worker exits on its own when its pipe closes (its libraries clean up); a busy
        # one is hung, or its trial is being failed: it goes at once.
        self.conn.close()
        if not self.busy:
            self.process.join(timeout=IDLE_EXIT_S)
        if self.process.is_alive():
            self.process.kill()
        self.process.join()


def _serve(conn: Any, spec: WorkerSpec, gpu: str | None, driver: int, env: dict) -> None:
    """The worker process: set up once, then one trial per message until the pipe closes, or
    until the driver is gone (tuner.backends.lifeline)."""
    os.environ.clear()
    os.environ.update(env)
    os.setpgrp()  # the terminal's Ctrl-C goes to the driver, which forwards it once
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # before torch is imported
    held = _HeldInterrupts()
    worker = None
    try:
        worker = Worker(spec)
        worker.objective.interruptible = held.trial
        worker.objective.driver_pid = driver
        lifeline.watch(driver, lambda: held.driver_gone(worker))
        while not held.pending:
            try:
                params = conn.recv()
            except EOFError:
                return  # the driver is done with this slot, or gone
            conn.send(worker.run_one(params))
    except KeyboardInterrupt:
        pass  # Optuna has marked the trial FAIL, and the objective recorded why
    except StudyDeleted:
        return  # deleted as this worker started: nothing to run, and the driver stops too
    except StoreFull:
        raise SystemExit(1) from None  # the driver meets it too, and says so in one line
    except Exception as e:
        # The slot's error, not a trial's (Optuna records those): its store deleted or gone
        # as it started, its set-up failed. The driver says the slot died and what the run
        # meets; here one line says why (multiprocessing would print a traceback), -v adds it.
        logger.error(
            "%s stopped: %s", spec.worker, _root(e), exc_info=logger.isEnabledFor(logging.DEBUG)
        )
        raise SystemExit(1) from None
    if held.orphaned and worker is not None:
        worker.retry_failed()  # the driver would have: the trial did nothing wrong
    raise SystemExit(130)


def _root(error: BaseException) -> str:
    """The innermost cause, in one line: a store error's own words, not a wrapper's guess."""
    seen = {id(error)}
    while (inner := error.__cause__ or error.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        error = inner
    return error_line(error)


class _HeldInterrupts:
    """SIGINT in a worker raises KeyboardInterrupt inside a trial's objective only, where the
    trial records it and ends FAIL. Anywhere else (Optuna creating or telling a trial) it is
    held: the trial in the making then meets it as it starts, and a trial being told is told,
    after which the worker exits. A trial is never left RUNNING half-made by a Ctrl-C.

    Before the first trial (while the worker sets up) it is held too: the worker exits once set
    up, having started nothing."""

    def __init__(self) -> None:
        self.pending = False
        self.open = False
        self.orphaned = False  # the driver died: the interrupt is the lifeline's
        signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self.pending = True
        if self.open:
            raise KeyboardInterrupt

    def driver_gone(self, worker: Worker) -> None:
        """From the lifeline's thread: stop as a Ctrl-C would, the trial failing with why."""
        self.orphaned = True
        worker.objective.interrupted_because = recovery.DRIVER_DIED
        os.kill(os.getpid(), signal.SIGINT)  # handled in the main thread, where the trial runs

    @contextlib.contextmanager
    def trial(self) -> Iterator[None]:
        if self.pending:
            raise KeyboardInterrupt
        self.open = True
        try:
            yield
        finally:
            self.open = False


STACK = "tuner.trial.stack"  # what the fork server imports, once, for the workers it forks


def worker_context(plan: RunPlan, gpus: list[str]) -> Any:
    """How this run's workers start (a multiprocessing context).

    Forked by the fork server, for a training run on Linux without GPUs: the server (one per
    driver process, kept for its life) has imported the training stack (tuner.trial.stack), and
    a worker it forks starts in a fraction of a second instead of importing it again: 6-7 s of
    CPU per worker, which on a CPU is most of what a short trial costs, and paid by every run of
    a process that runs many (a notebook, the tests).

    Spawned otherwise: where there are GPUs, as CUDA does not survive a fork of a process that
    asked torch about devices (the stack's imports do), and a trial there lasts minutes; for
    the simulated workload, which imports nothing heavy."""
    forkable = sys.platform == "linux" and "forkserver" in mp.get_all_start_methods()
    if gpus or plan.workload == "simulated" or not forkable:
        return mp.get_context("spawn")
    context = mp.get_context("forkserver")
    context.set_forkserver_preload([STACK])  # for the server this process starts, if not yet
    return context


def check_serves(plan: RunPlan, gpus: list[str]) -> None:
    """Refuse, in one line, a space this machine cannot train, before any worker starts (so
    before DeepSpeed builds its ops for minutes). `gpus`: the GPUs visible here.

    What this machine cannot serve, precisely:
    - `gpus_per_trial` above 1 with fewer GPUs visible: such a trial is one rank per GPU. At or
      below 1, a trial runs on the CPU when there is no GPU (the demo, and the default of 1,
      which is what a cluster would be asked for), as the local backend always did;
    - `bf16` on a CUDA GPU older than compute capability 8.0 (Ampere), which has no bfloat16.
      On the CPU torch computes bfloat16 (slowly), and the HF Trainer accepts it: not refused;
    - `deepspeed` when DeepSpeed is not installed. DeepSpeed on the CPU accelerator is a
      supported path here (one process, tests/test_study.py), and is not refused.
    """
    per_trial = plan.resources.gpus_per_trial
    if per_trial > 1:
        if len(gpus) < per_trial:
            raise BackendError(
                f"resources.gpus_per_trial: {per_trial:g} GPUs per trial, and this "
                f"machine has {len(gpus)} visible{' (CUDA_VISIBLE_DEVICES)' * _restricted()}; "
                f"the local backend cannot run it: {ELSEWHERE}"
            )
        logger.warning(
            "resources.gpus_per_trial is %g, but the local backend trains each trial on one "
            "GPU; --backend ray trains it on %g (ray start --head here)",
            per_trial,
            per_trial,
        )
    if plan.bf16 and gpus:
        old = _without_bf16(min(len(gpus), plan.jobs or 1))  # the GPUs the workers train on
        if old is not None:
            raise BackendError(
                f"fixed.bf16: {old} has no bfloat16 (CUDA compute capability 8.0 or later); "
                f"set bf16: false (fp16: true), or {ELSEWHERE}"
            )
    if plan.deepspeed is not None and importlib.util.find_spec("deepspeed") is None:
        raise BackendError(
            f"fixed.deepspeed: {plan.deepspeed} needs DeepSpeed, which is not installed here "
            f"(pip install 'lora-tuner[deepspeed]'); or {ELSEWHERE}"
        )


def _restricted() -> bool:
    return os.environ.get("CUDA_VISIBLE_DEVICES") is not None


def _without_bf16(count: int) -> str | None:
    """The first of the first `count` visible GPUs without bfloat16, as `GPU i (name)`; None if
    all have it. Reads device properties only: the driver makes no tensor."""
    import torch

    if torch.version.cuda is None:
        return None  # ROCm: the GPUs it supports compute bfloat16
    for i in range(min(count, torch.cuda.device_count())):
        if torch.cuda.get_device_capability(i) < (8, 0):
            return f"GPU {i} ({torch.cuda.get_device_name(i)})"
    return None


def visible_gpus() -> list[str]:
    """GPU ids this process may use: CUDA_VISIBLE_DEVICES if set, else every device torch sees.
    Without a GPU driver there is none, and torch (seconds to import) is not asked."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    if not any(Path(p).exists() for p in GPU_DRIVERS):
        return []
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def assign_gpus(jobs: int, gpus: list[str]) -> list[str | None]:
    """Worker i trains on GPU i mod n (None: no GPU). More jobs than GPUs share them."""
    if not gpus:
        return [None] * jobs
    if jobs > len(gpus):
        logger.warning("%d jobs share %d GPUs; expect them to compete for memory", jobs, len(gpus))
    return [gpus[i % len(gpus)] for i in range(jobs)]
