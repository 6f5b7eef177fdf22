"""`tuner study submit`: a sweep as a Ray job, so it runs on the cluster with no terminal open.

The job's entrypoint is the `tuner study run NAME --backend ray` a person would type on the head
node; the working directory (and a requirements file, if given) travel in the job's runtime
env. The storage password never does: Ray records entrypoints and runtime envs (dashboard, job
list), so the cluster's nodes read it from PGPASSWORD or ~/.pgpass instead.
"""

from __future__ import annotations

import logging
import shlex
from dataclasses import dataclass
from pathlib import Path

from tuner.errors import BackendError, TunerError
from tuner.store import mask_url, open_study, resolve_url, strip_password

logger = logging.getLogger(__name__)

# Never uploaded with the working directory: environments, local stores, demo weights.
EXCLUDES = [".git", ".venv", "venv", "__pycache__", "*.db", "*.db-*", "tuner_artifacts", "demo"]


@dataclass(frozen=True)
class Submitted:
    job_id: str
    entrypoint: str
    address: str


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
    url = resolve_url(storage)
    if url.startswith("sqlite"):
        logger.warning(
            "the study store is an SQLite file (%s): the job's workers must see the same path "
            "(a shared file system); a cluster usually wants PostgreSQL",
            mask_url(url),
        )
    open_study(name, url)  # fail here, not on the cluster, if there is no such study
    working_dir = Path(working_dir).resolve()
    if not working_dir.is_dir():
        raise TunerError(f"--working-dir {working_dir} is not a directory")
    runtime_env: dict = {"working_dir": str(working_dir), "excludes": EXCLUDES}
    if requirements is not None:
        path = Path(requirements)
        if not path.is_file():
            raise TunerError(f"--requirements {path} does not exist")
        runtime_env["pip"] = str(path.resolve())

    # `python -m tuner`: the job runs the uploaded tree's tuner, whatever the nodes have installed.
    command = ["python", "-m", "tuner", "study", "run", name, "--backend", "ray"]
    command += ["--storage", strip_password(url)]
    if n_trials is not None:
        command += ["--n-trials", str(n_trials)]
    if timeout is not None:
        command += ["--timeout", timeout]
    entrypoint = shlex.join(command)

    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
        job_id = client.submit_job(
            entrypoint=entrypoint,
            runtime_env=runtime_env,
            metadata={"tuner_study": name},
        )
    except Exception as e:  # noqa: BLE001 - connection, auth and HTTP errors: one line for the user
        lines = str(e).strip().splitlines()
        raise BackendError(
            f"cannot submit to the Ray cluster at {address}: {lines[0] if lines else e!r}"
        ) from None
    logger.info("submitted %s as Ray job %s", entrypoint, job_id)
    return Submitted(job_id=job_id, entrypoint=entrypoint, address=address)
