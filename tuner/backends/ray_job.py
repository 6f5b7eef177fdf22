"""A run as a Ray job, for a driver off the cluster: `tuner study submit`, and `tuner study run`
or `tuner sweep run` with `--address http://HEAD:8265` (the dashboard's job API).

The job's entrypoint is the `python -m tuner ...` command a person would type on the head node;
the working directory (and a requirements file, if given) travel in the job's runtime env. The
storage password never does: Ray records entrypoints and runtime envs (dashboard, job list), so
the cluster's nodes read it from PGPASSWORD or ~/.pgpass instead. Ray's token reaches the job
API as a request header only (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token here).

`follow_job` streams the job's log here and returns its outcome, so that a run submitted from a
laptop or a CI runner looks and exits like one run on the head.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import shlex
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.common import extras
from tuner.common.errors import BackendError, TunerError
from tuner.common.limits import check_count
from tuner.store import mask_url, open_study, resolve_url, strip_password

logger = logging.getLogger(__name__)

# Never uploaded with the working directory: environments, local stores, demo weights.
EXCLUDES = [".git", ".venv", "venv", "__pycache__", "*.db", "*.db-*", "tuner_artifacts", "demo"]
STOP_WAIT_S = 60.0  # after Ctrl-C: how long to show the job's last lines while it stops
INTERRUPTED = 130  # the exit status of a run stopped by Ctrl-C (or `ray job stop`), as locally


def is_job_address(address: str | None) -> bool:
    """An http(s):// address is a cluster's job API (the dashboard): a run there is a Ray job.
    The other forms (`auto`, HOST:PORT, ray://) join the cluster as a driver."""
    return address is not None and address.startswith(("http://", "https://"))


@dataclass(frozen=True)
class Submitted:
    job_id: str
    entrypoint: str
    address: str


@dataclass(frozen=True)
class JobOutcome:
    job_id: str
    status: str  # SUCCEEDED, FAILED or STOPPED
    exit_code: int  # the entrypoint's own status where Ray has it; 130 if stopped, else 1
    message: str  # Ray's one-line account of how the job ended


def submit_study(
    name: str,
    *,
    address: str,
    storage: str | None = None,
    n_trials: int | None = None,
    timeout: str | None = None,
    working_dir: str | Path = ".",
    requirements: str | Path | None = None,
) -> Submitted:
    """Submit `tuner study run NAME --backend ray` as a Ray job at `address` (the dashboard's
    http://HEAD:8265); returns the job id. The study must exist in `storage`."""
    if n_trials is not None:
        check_count(n_trials, key="--n-trials")  # here, not after the upload
    url = resolve_url(storage)
    open_study(name, url)  # fail here, not on the cluster, if there is no such study
    command = ["study", "run", name, "--backend", "ray"]
    if n_trials is not None:
        command += ["--n-trials", str(n_trials)]
    if timeout is not None:
        command += ["--timeout", timeout]
    return submit_job(
        command,
        address=address,
        storage=url,
        working_dir=working_dir,
        requirements=requirements,
        metadata={"tuner_study": name},
    )


def submit_job(
    command: list[str],
    *,
    address: str,
    storage: str,
    working_dir: str | Path = ".",
    requirements: str | Path | None = None,
    metadata: dict[str, str] | None = None,
) -> Submitted:
    """Submit `python -m tuner COMMAND --storage URL` as a Ray job at `address`, with the
    storage URL stripped of its password. `python -m tuner`: the job runs the uploaded tree's
    tuner, whatever the nodes have installed."""
    working_dir = Path(working_dir).resolve()
    if not working_dir.is_dir():
        raise TunerError(f"--working-dir {working_dir} is not a directory")
    runtime_env: dict[str, Any] = {"working_dir": str(working_dir), "excludes": EXCLUDES}
    if requirements is not None:
        path = Path(requirements)
        if not path.is_file():
            raise TunerError(f"--requirements {path} does not exist")
        runtime_env["pip"] = str(path.resolve())
    # `-u`: the job's output is a pipe, which Python would buffer; a user following the job
    # (`--follow`, `ray job logs`) sees each trial as it ends, not all of them at the end.
    entrypoint = shlex.join(
        ["python", "-u", "-m", "tuner", *command, "--storage", strip_password(storage)]
    )
    client = _client(address)
    if storage.startswith("sqlite"):
        logger.warning(
            "the study store is an SQLite file (%s): the job's workers must see the same path "
            "(a shared file system); a cluster usually wants PostgreSQL",
            mask_url(storage),
        )
    try:
        job_id = client.submit_job(
            entrypoint=entrypoint, runtime_env=runtime_env, metadata=metadata or {}
        )
    except Exception as e:  # noqa: BLE001 - upload, auth and HTTP errors: one line for the user
        raise BackendError(f"cannot submit to the Ray cluster at {address}: {_first(e)}") from None
    logger.info("submitted %s as Ray job %s", entrypoint, job_id)
    return Submitted(job_id=job_id, entrypoint=entrypoint, address=address)


def follow_job(
    job: Submitted, *, on_log: Callable[[str], None], stop_on_interrupt: bool
) -> JobOutcome:
    """Pass the job's log to `on_log` as it comes, until the job ends; returns how it ended.

    On Ctrl-C (or SIGTERM turned into one), a foreground run (`stop_on_interrupt`) stops the
    job, shows its last lines while it stops, and raises KeyboardInterrupt; a submitted one
    raises at once and the job keeps running."""
    client = _client(job.address)
    chunks: queue.Queue[Any] = queue.Queue()
    # The log arrives on a websocket in a thread of its own: the main thread only waits on the
    # queue, so Ctrl-C lands here and never inside an event loop.
    threading.Thread(target=_tail, args=(client, job.job_id, chunks), daemon=True).start()
    try:
        _show(chunks, on_log, job)
    except KeyboardInterrupt:
        if not stop_on_interrupt:
            raise
        _stop(client, job)
        with contextlib.suppress(KeyboardInterrupt, TimeoutError):  # a second Ctrl-C: go now
            _show(chunks, on_log, job, timeout=STOP_WAIT_S)
        raise
    return _outcome(client, job.job_id)


def _tail(client: Any, job_id: str, chunks: queue.Queue[Any]) -> None:
    import asyncio

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            chunks.put(chunk)

    try:
        asyncio.run(tail())
    except Exception as e:  # noqa: BLE001 - handed to the main thread, which reports it
        chunks.put(e)
    chunks.put(None)  # the end of the log: the job has ended


def _show(
    chunks: queue.Queue[Any], on_log: Callable[[str], None], job: Submitted, timeout: float = 0
) -> None:
    deadline = time.monotonic() + timeout if timeout else None
    while True:
        try:
            # A short wait, so that Ctrl-C is seen at once whatever the platform.
            chunk = chunks.get(timeout=0.5)
        except queue.Empty:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError from None
            continue
        if chunk is None:
            return
        if isinstance(chunk, Exception):
            raise BackendError(
                f"lost the log of Ray job {job.job_id} at {job.address}: {_first(chunk)}; "
                f"it may still run: ray job status {job.job_id} --address {job.address}"
            )
        on_log(chunk)


def _stop(client: Any, job: Submitted) -> None:
    try:
        client.stop_job(job.job_id)
    except Exception as e:  # noqa: BLE001
        raise BackendError(
            f"could not stop Ray job {job.job_id}: {_first(e)}; "
            f"stop it with: ray job stop {job.job_id} --address {job.address}"
        ) from None


def _outcome(client: Any, job_id: str, wait_s: float = 30) -> JobOutcome:
    """How the job ended. The log ends as the job does; its status may lag a moment."""
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + wait_s
    while True:
        info = client.get_job_info(job_id)
        if info.status.is_terminal() or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    code = info.driver_exit_code
    if info.status == JobStatus.SUCCEEDED:
        exit_code = 0
    elif info.status == JobStatus.STOPPED:
        exit_code = INTERRUPTED  # Ray records no exit code for a stopped job
    elif code is not None and code != 0:
        exit_code = code if code > 0 else 128 - code  # killed by a signal: 128 + its number
    else:
        exit_code = 1  # failed before its entrypoint ran (runtime env set-up, say)
    message = (info.message or "").strip().splitlines()
    return JobOutcome(job_id, str(info.status.value), exit_code, message[0] if message else "")


def _client(address: str) -> Any:
    """A client of the job API at `address`, sending Ray's token if this machine has one."""
    extras.require("ray", what=f"the Ray job API at {address}")
    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available,
    )
    from ray.job_submission import JobSubmissionClient

    # The client sends the token only in token mode; Ray's own drivers turn it on when a token
    # is found (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token), and so do we. Its note
    # that "this cluster" now has token auth is about a cluster it starts, which this is not.
    quiet = logging.getLogger(maybe_enable_token_auth_if_token_available.__module__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    finally:
        quiet.setLevel(level)
    try:
        return JobSubmissionClient(address)
    except Exception as e:  # noqa: BLE001 - connection, auth and version errors
        raise BackendError(f"cannot reach the Ray job API at {address}: {_first(e)}") from None


def _first(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else type(error).__name__
