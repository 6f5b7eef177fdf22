"""A folder as one object of an artifact store (a tar): the tokenised-data cache's entries and
the ranks' parts of a checkpoint, written whole so that a reader sees all of a folder or none."""

from __future__ import annotations

import contextlib
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any


def put_folder(store: Any, artifact_id: str, folder: Path) -> None:
    """Write the files under `folder` as one tar object: a reader sees all of them or none."""
    with tempfile.TemporaryFile() as buffer:
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    tar.add(path, arcname=str(path.relative_to(folder)))
        buffer.seek(0)
        store.write(artifact_id, buffer)


def get_folder(store: Any, artifact_id: str, dest: Path) -> None:
    """Unpack an object `put_folder` wrote into `dest`; ArtifactNotFound when there is none.
    Read into a temporary file first: an S3 body cannot seek, and tarfile needs to."""
    with tempfile.TemporaryFile() as buffer:
        with contextlib.closing(store.open_reader(artifact_id)) as body:
            shutil.copyfileobj(body, buffer)
        buffer.seek(0)
        with tarfile.open(fileobj=buffer, mode="r") as tar:
            tar.extractall(dest, filter="data")
