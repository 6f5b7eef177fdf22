"""A local worker's tie to its driver: a worker whose driver is gone fails its trial and exits.

Local workers run in their own process group (so that a terminal's Ctrl-C reaches the driver
only, tuner.backends.local), which also puts them out of reach of `kill -9 -PGID`: job control or
a scheduler that kills the run's group kills the driver alone. Between trials a worker sees its
pipe close. During a trial it reads nothing from the pipe, so a thread watches the driver: once
it is gone, whatever killed it, the thread interrupts the trial (which ends FAIL with the reason,
and is retried) and, should the trial not end, ends the process: its heartbeat stops, and the
next run fails the trial.

How the thread watches: a spawned worker is the driver's child, and sees itself re-parented
when the driver is gone (portable, and exact). A worker forked by the fork server (Linux only,
tuner.backends.local) is the server's child, and the server outlives the driver while workers
hold it: such a worker waits on a pidfd of the driver instead, which is readable once the
driver has exited (a zombie included), and never names another process that took its pid.

A parent-death signal (Linux's PR_SET_PDEATHSIG) would be quicker, but fires when the thread
that started the worker ends rather than the process.
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable

POLL_S = 0.2
# After the interrupt, how long the trial may take to record its failure before the worker
# exits regardless (a trial stuck in a long kernel call, or a frozen store).
WIND_DOWN_S = 60.0


def watch(driver_pid: int, on_gone: Callable[[], None]) -> threading.Thread:
    """Call `on_gone` (once, from a daemon thread) when the driver, process `driver_pid`, is
    gone; WIND_DOWN_S later, if this process is still here, exit it."""
    wait = _reparented if os.getppid() == driver_pid else _pidfd_readable

    def run() -> None:
        wait(driver_pid)
        on_gone()
        time.sleep(WIND_DOWN_S)
        os._exit(1)  # noqa: SLF001 - the main thread did not end; nothing more will run here

    thread = threading.Thread(target=run, name="tuner-lifeline", daemon=True)
    thread.start()
    return thread


def _reparented(driver_pid: int) -> None:
    while os.getppid() == driver_pid:
        time.sleep(POLL_S)


def _pidfd_readable(driver_pid: int) -> None:
    try:
        fd = os.pidfd_open(driver_pid)
    except ProcessLookupError:
        return  # gone already
    try:
        select.select([fd], [], [])
    finally:
        os.close(fd)
