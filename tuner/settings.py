"""Settings read from the environment (``TUNER_*``), with defaults for one machine."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_SQLITE_FILE = "tuner.db"
DEFAULT_ARTIFACT_DIR = "tuner_artifacts"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNER_", extra="ignore")

    storage: str | None = Field(
        default=None,
        description="Study store URL; default: an SQLite file `tuner.db` in the working directory.",
    )
    artifacts: Path | None = Field(
        default=None,
        description="Where trial adapters are stored; default: `tuner_artifacts/` beside the store "
        "(recorded in the study, so every worker finds it).",
    )
    heartbeat_interval: int = Field(
        default=30, gt=0, description="Seconds between a running trial's heartbeats."
    )
    grace_period: int = Field(
        default=120,
        gt=0,
        description="A RUNNING trial with no heartbeat for this long is failed as stale.",
    )


def get_settings() -> Settings:
    return Settings()
