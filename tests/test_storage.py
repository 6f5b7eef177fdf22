"""Storage URLs: defaults, spellings people use, and passwords that never show."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli

from tuner.errors import StorageError
from tuner.storage import mask_text, mask_url, open_storage, resolve_url

SENTINEL = "s3cr3t-SENTINEL-pw"


def test_default_is_an_sqlite_file_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TUNER_STORAGE", raising=False)
    assert resolve_url() == f"sqlite:///{tmp_path / 'tuner.db'}"
    monkeypatch.setenv("TUNER_STORAGE", "sqlite:///other.db")
    assert resolve_url() == f"sqlite:///{tmp_path / 'other.db'}"
    assert resolve_url("sqlite:////abs/x.db") == "sqlite:////abs/x.db"


def test_postgres_spellings() -> None:
    assert resolve_url("postgres://u@h/db") == "postgresql+psycopg2://u@h/db"
    assert resolve_url("postgresql://u@h/db") == "postgresql+psycopg2://u@h/db"
    assert resolve_url("postgresql+psycopg2://u@h/db") == "postgresql+psycopg2://u@h/db"
    with pytest.raises(StorageError, match="must look like"):
        resolve_url("tuner.db")


def test_masking() -> None:
    url = f"postgresql+psycopg2://tuner:{SENTINEL}@db:5432/tuner"
    assert mask_url(url) == "postgresql+psycopg2://tuner:***@db:5432/tuner"
    assert SENTINEL not in mask_text(f"FATAL: password {SENTINEL} rejected for {url}", url)
    assert mask_url("sqlite:////x/y.db") == "sqlite:////x/y.db"


def test_unreachable_store_is_one_masked_line() -> None:
    url = f"postgresql://tuner:{SENTINEL}@127.0.0.1:1/tuner"
    with pytest.raises(StorageError) as error:
        open_storage(url)
    assert SENTINEL not in str(error.value)
    assert "postgresql+psycopg2://tuner:***@127.0.0.1:1/tuner" in str(error.value)

    result = run_cli("study", "list", "--storage", url)
    assert result.returncode == 2
    assert SENTINEL not in result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("error: cannot open the study store")


def test_postgres_store_opens_with_optuna(pg_url: str) -> None:
    import optuna

    storage = open_storage(pg_url)
    optuna.create_study(storage=storage, study_name="plain")
    assert optuna.get_all_study_names(pg_url) == ["plain"]


def test_strip_password_keeps_the_rest() -> None:
    from tuner.storage import strip_password

    assert strip_password(f"postgresql+psycopg2://tuner:{SENTINEL}@db/t") == (
        "postgresql+psycopg2://tuner@db/t"
    )
    assert strip_password("postgresql+psycopg2://tuner@db/t") == "postgresql+psycopg2://tuner@db/t"
