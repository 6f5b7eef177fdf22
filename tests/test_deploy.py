"""The deploy files parse and keep secrets out (no Docker engine here: parse, don't run)."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_compose_file_is_valid_and_has_no_literal_password() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    postgres = compose["services"]["postgres"]
    assert "POSTGRES_PASSWORD" not in postgres.get("environment", {})
    assert postgres["env_file"] == "deploy/postgres/.env"
    assert postgres["healthcheck"]["test"]
    assert all(p.startswith("127.0.0.1:") for p in postgres["ports"])
    assert "studies" in compose["volumes"]
    assert (ROOT / "deploy/postgres/init.sql").exists()
