"""The study's artifact store: Optuna's file-system store, written atomically.

Optuna's store opens the artifact's final path and copies into it, so a full disk or a killed
worker leaves a truncated file under a real artifact id. Here a write goes to a temporary file
beside it and is renamed into place only when complete; a failed write leaves nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO

from optuna.artifacts import FileSystemArtifactStore


class AtomicFileStore(FileSystemArtifactStore):
    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        final = self._get_filepath(artifact_id)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                shutil.copyfileobj(content_body, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def open_store(directory: str | Path) -> AtomicFileStore:
    """The store at `directory` (made if missing), to write to."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    return AtomicFileStore(path)


def read_store(directory: str | Path) -> FileSystemArtifactStore:
    """The store at `directory`, to read and remove from; nothing is created."""
    return FileSystemArtifactStore(str(directory))
