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


def test_the_dashboard_proxy_authenticates_and_keeps_the_dashboard_on_loopback() -> None:
    conf = (ROOT / "deploy/dashboard/nginx.conf").read_text()
    directives = [line.split("#")[0].strip() for line in conf.splitlines()]
    directives = [d for d in directives if d]
    assert "proxy_pass http://127.0.0.1:8080;" in directives
    assert "auth_basic_user_file /etc/nginx/tuner.htpasswd;" in directives
    assert "listen 443 ssl;" in directives
    # The dashboard's cross-origin check compares Origin with the Host the browser used.
    assert "proxy_set_header Host $http_host;" in directives
    assert "--host 127.0.0.1" in conf
