"""A local worker's tie to its driver: a worker whose driver is gone fails its trial and exits.

Local workers run in their own process group (so that a terminal's Ctrl-C reaches the driver
only, tuner.backends.local), which also puts them out of reach of `kill -9 -PGID`: job control or
a scheduler that kills the run's group kills the driver alone. Between trials a worker sees its
pipe close. During a trial it reads nothing from the pipe, so a thread watches its parent: once
the worker has been re-parented, the driver that started it is gone, whatever killed it. The
thread then interrupts the trial (which ends FAIL with the reason, and is retried) and, should
the trial not end, ends the process: its heartbeat stops, and the next run fails the trial.

A parent-death signal (Linux's PR_SET_PDEATHSIG) would be quicker, but fires when the thread
that started the worker ends rather than the process, and exists on Linux only: a poll of a
few microseconds every POLL_S is both portable and exact.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

POLL_S = 0.2
# After the interrupt, how long the trial may take to record its failure before the worker
# exits regardless (a trial stuck in a long kernel call, or a frozen store).
WIND_DOWN_S = 60.0


def watch(driver_pid: int, on_gone: Callable[[], None]) -> threading.Thread:
    """Call `on_gone` (once, from a daemon thread) when this process's parent is no longer
    `driver_pid`; WIND_DOWN_S later, if the process is still here, exit it."""

    def run() -> None:
        while os.getppid() == driver_pid:
            time.sleep(POLL_S)
        on_gone()
        time.sleep(WIND_DOWN_S)
        os._exit(1)  # noqa: SLF001 - the main thread did not end; nothing more will run here

    thread = threading.Thread(target=run, name="tuner-lifeline", daemon=True)
    thread.start()
    return thread
