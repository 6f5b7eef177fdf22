"""The study's artifact location: adapters, reports, checkpoints and the tokenised-data cache.

A study has one location, chosen when it is created and stored on it (user attr `artifacts`), so
every process that opens the study finds it:

- a local path (the default, `tuner_artifacts/` beside an SQLite store): one machine, or a file
  system every node mounts. Written through Optuna's file-system store, atomically;
- `s3://BUCKET/PREFIX`: any S3 API (AWS, MinIO, Ceph, R2), through Optuna's `Boto3ArtifactStore`
  with every key under PREFIX. boto3 finds the endpoint (`AWS_ENDPOINT_URL`) and the credentials
  (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `~/.aws`, an instance role) itself: tuner never
  reads, stores or prints them.

Artifacts are Optuna's: a uuid per file, its metadata in the study's storage. The tokenised data
is not one study's artifact but shared by the studies of a location, so it lives under a fixed
key per cache entry (`tokenized/KEY.tar`), found by its key alone.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

from optuna.artifacts import Boto3ArtifactStore, FileSystemArtifactStore
from optuna.artifacts.exceptions import ArtifactNotFound

from tuner.common.locations import ArtifactsError, Location, parse_location
from tuner.common.settings import Settings, get_settings
from tuner.store._folders import get_folder, put_folder
from tuner.store._urls import default_artifact_dir

logger = logging.getLogger(__name__)

TOKENIZED = "tokenized"  # the data cache's folder (local) or key prefix (S3)


def choose_location(
    flag: str | None,
    *,
    space_value: str | None,
    space_file: str,
    storage_url: str,
    settings: Settings | None = None,
) -> Location:
    """A new study's location: `--artifacts`, else `$TUNER_ARTIFACTS`, else the space's
    `artifacts:` (already checked, and absolute, when the space was read), else the default
    folder beside the store."""
    settings = settings or get_settings()
    if flag is not None:
        return parse_location(flag, source="--artifacts")
    if settings.artifacts:  # set but empty (`${X:-}` in a compose file) is unset
        return parse_location(settings.artifacts, source="TUNER_ARTIFACTS")
    if space_value is not None:
        return parse_location(space_value, source=f"{space_file}: artifacts")
    return parse_location(str(default_artifact_dir(storage_url)), source="the default")


# ----------------------------------------------------------------------------- the stores


class AtomicFileStore(FileSystemArtifactStore):
    """Optuna's file-system store, with atomic writes: Optuna's opens the artifact's final path
    and copies into it, so a full disk or a killed worker leaves a truncated file under a real
    artifact id. Here a write goes to a temporary file beside it and is renamed into place only
    when complete; a failed write leaves nothing. The folder is made on the first write, so a
    process that only reads makes nothing."""

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        final = self._get_filepath(artifact_id)
        final.parent.mkdir(parents=True, exist_ok=True)
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


class PrefixedBoto3Store(Boto3ArtifactStore):
    """Optuna's S3 store with every key under `prefix`: Optuna's puts artifact ids at the
    bucket's root, so one bucket could hold one location only."""

    def __init__(self, bucket: str, prefix: str, client: Any) -> None:
        # The writers (upload_artifact, the data cache) hand over a file they do not reuse, so
        # boto3 may stream it rather than Optuna first copying it whole into memory.
        super().__init__(bucket, client=client, avoid_buf_copy=True)
        self.prefix = prefix

    def key(self, artifact_id: str) -> str:
        return f"{self.prefix}/{artifact_id}" if self.prefix else artifact_id

    def open_reader(self, artifact_id: str) -> BinaryIO:
        return super().open_reader(self.key(artifact_id))

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        super().write(self.key(artifact_id), content_body)

    def remove(self, artifact_id: str) -> None:
        super().remove(self.key(artifact_id))

    def remove_under(self, folder: str) -> int:
        """Remove every object under `folder/` (the data cache); returns how many."""
        paginator = self.client.get_paginator("list_objects_v2")
        removed = 0
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.key(folder) + "/"):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})
                removed += len(keys)
        return removed


def open_artifacts(url: str) -> AtomicFileStore | PrefixedBoto3Store:
    """The Optuna artifact store at `url` (a study's `artifacts`): the atomic file-system store
    for a path, Optuna's Boto3 store for `s3://BUCKET/PREFIX`. Nothing is created until written."""
    location = parse_location(url, source="the study's artifact location")
    if location.path is not None:
        return AtomicFileStore(location.path)
    try:
        import boto3
    except ImportError:
        raise ArtifactsError(
            f"the artifact location {location.url} needs boto3: pip install 'lora-tuner[s3]'"
        ) from None
    # boto3 reads AWS_ENDPOINT_URL (MinIO, Ceph, R2) and the credentials from the environment
    # or ~/.aws itself; none of them passes through tuner.
    return PrefixedBoto3Store(location.bucket, location.prefix, boto3.client("s3"))


def artifact_ids(study: Any, storage: Any) -> list[str]:
    """Every artifact Optuna recorded on the study and its trials (adapters, reports), and the
    checkpoints trials left (a worker that died and was not retried). Read before the study's
    rows are deleted: they are where the ids are kept."""
    from optuna.artifacts import get_all_artifact_meta

    from tuner.store._checkpoints import parts

    ids = [meta.artifact_id for meta in get_all_artifact_meta(study, storage=storage)]
    for trial in study.get_trials(deepcopy=False):
        ids += [meta.artifact_id for meta in get_all_artifact_meta(trial, storage=storage)]
        ids += parts(trial)
    return ids


def remove_ids(store: Any, ids: list[str]) -> int:
    """Remove the artifacts `ids` from `store`; returns how many were there. One that is gone
    already is not an error, and one that cannot go does not keep the rest."""
    removed = 0
    for artifact_id in ids:
        try:
            store.remove(artifact_id)
            removed += 1
        except ArtifactNotFound:
            continue
        except Exception as e:  # noqa: BLE001 - one that cannot go must not keep the rest
            logger.warning("could not remove artifact %s: %s", artifact_id, e)
    return removed


def store_errors() -> tuple[type[BaseException], ...]:
    """What a failed write or read raises: OSError for a folder, botocore's errors for S3 (an
    unreachable endpoint, refused credentials, a missing bucket)."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return (OSError,)
    return (OSError, BotoCoreError, ClientError)


def clear_tokenized(url: str) -> None:
    """Remove the tokenised-data cache of a location (its last study was deleted)."""
    location = parse_location(url, source="the study's artifact location")
    if location.path is not None:
        shutil.rmtree(location.path / TOKENIZED, ignore_errors=True)
        return
    open_artifacts(url).remove_under(TOKENIZED)


def local_cache_dir(url: str, node_cache: Path) -> Path:
    """Where a worker keeps the tokenised data: in the location itself when it is a folder
    (shared by the workers that see it), else in this node's own cache folder."""
    location = parse_location(url, source="the study's artifact location")
    return (location.path if location.path is not None else node_cache) / TOKENIZED


# ----------------------------------------------------------------------------- the data cache


class SharedDataCache:
    """The tokenised data of an S3 location, one object per cache entry: a worker that misses
    its node's cache fetches the entry another worker built, and the worker that builds one
    publishes it. What `trials.data.prepare` takes as `shared` (trials never import tuner)."""

    def __init__(self, store: PrefixedBoto3Store) -> None:
        self.store = store

    def _id(self, key: str) -> str:
        return f"{TOKENIZED}/{key}.tar"

    def fetch(self, key: str, dest: Path) -> bool:
        """Unpack entry `key` into the new folder `dest`; False when no worker published it."""
        try:
            get_folder(self.store, self._id(key), dest)
        except ArtifactNotFound:
            return False
        return True

    def publish(self, key: str, entry: Path) -> None:
        """Upload the folder `entry` as entry `key`."""
        put_folder(self.store, self._id(key), entry)


def shared_data_cache(url: str, store: Any = None) -> SharedDataCache | None:
    """The data cache to sync with, for a location the workers do not share as a folder;
    through `store`, the location's store already open (one S3 client per worker), if given."""
    store = open_artifacts(url) if store is None else store
    return SharedDataCache(store) if isinstance(store, PrefixedBoto3Store) else None
