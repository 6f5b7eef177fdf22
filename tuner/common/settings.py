"""Settings read from the environment (``TUNER_*``), with defaults for one machine."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tuner.common.errors import TunerError

DEFAULT_SQLITE_FILE = "tuner.db"
DEFAULT_ARTIFACT_DIR = "tuner_artifacts"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNER_", extra="ignore")

    storage: str | None = Field(
        default=None,
        description="Study store URL; default: an SQLite file `tuner.db` in the working directory.",
    )
    artifacts: str | None = Field(
        default=None,
        description="Where a new study keeps its artifacts (adapters, checkpoints, reports, the "
        "tokenised data): a local path or s3://BUCKET/PREFIX. Read by `study create` only, after "
        "`--artifacts` and before the space's `artifacts:`; default: `tuner_artifacts/` beside "
        "the store. Recorded in the study, so every worker finds it.",
    )
    cache: Path | None = Field(
        default=None,
        description="This machine's cache folder (the tokenised data of studies whose artifacts "
        "are in S3); default: $XDG_CACHE_HOME/tuner, else ~/.cache/tuner.",
    )
    torch_threads: int | None = Field(
        default=None,
        gt=0,
        description="torch's threads in each trial worker; default: the worker's share of the "
        "CPUs (this machine's cores / --jobs, or the space's cpus_per_trial on Ray). 1 suits a "
        "machine shared with other work: threads that wait for a core spin on it.",
    )
    heartbeat_interval: int = Field(
        default=30, gt=0, description="Seconds between a running trial's heartbeats."
    )
    grace_period: int = Field(
        default=120,
        gt=0,
        description="A RUNNING trial with no heartbeat for this long is failed as stale.",
    )

    @model_validator(mode="after")
    def _beats_within_grace(self) -> Settings:
        # Otherwise every trial goes stale between two beats, and is failed as dead while it
        # trains.
        if self.grace_period <= self.heartbeat_interval:
            raise ValueError(
                f"TUNER_GRACE_PERIOD ({self.grace_period}) must be greater than "
                f"TUNER_HEARTBEAT_INTERVAL ({self.heartbeat_interval}), or every trial goes stale"
            )
        return self


def get_settings() -> Settings:
    """The settings; a bad TUNER_* value is one line naming the variable (TunerError)."""
    try:
        return Settings()
    except ValidationError as e:
        error = e.errors()[0]
        if error["loc"]:
            name = "TUNER_" + str(error["loc"][0]).upper()
            got = os.environ.get(name, "")
            raise TunerError(f"{name}: {error['msg'].lower()} (got {got!r})") from None
        raise TunerError(str(error["msg"]).removeprefix("Value error, ")) from None


def node_cache_dir(settings: Settings | None = None) -> Path:
    """This machine's own cache folder: never shared, so never a place another node reads."""
    settings = settings or get_settings()
    if settings.cache is not None:
        return settings.cache.expanduser().resolve()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tuner"
