"""Storage URLs: defaults, spellings people use, and passwords that never show."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli

from tuner.common.errors import StorageError
from tuner.store import mask_text, mask_url, open_storage, resolve_url

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
    from tuner.store import strip_password

    assert strip_password(f"postgresql+psycopg2://tuner:{SENTINEL}@db/t") == (
        "postgresql+psycopg2://tuner@db/t"
    )
    assert strip_password("postgresql+psycopg2://tuner@db/t") == "postgresql+psycopg2://tuner@db/t"


def _take_enqueued(url: str, out: str, barrier) -> None:
    import optuna

    study = optuna.load_study(study_name="queue", storage=open_storage(url))
    barrier.wait()  # every process asks at once: the race a sweep's first seconds have
    taken = []

    def objective(trial: optuna.Trial) -> float:
        taken.append(trial.number)
        return trial.suggest_float("x", 0, 1)

    study.optimize(objective, n_trials=6)
    Path(out).write_text(" ".join(map(str, taken)))


@pytest.mark.slow
def test_each_enqueued_trial_is_taken_by_one_worker_only(storage_url: str, tmp_path: Path) -> None:
    """Workers that ask at the same moment never run the same enqueued trial twice (SQLite
    included, whose driver would otherwise read outside the transaction that writes)."""
    import multiprocessing as mp

    import optuna

    study = optuna.create_study(study_name="queue", storage=open_storage(storage_url))
    for i in range(24):
        study.enqueue_trial({"x": i / 24})
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(4)
    outs = [str(tmp_path / f"taken{i}") for i in range(4)]
    workers = [ctx.Process(target=_take_enqueued, args=(storage_url, o, barrier)) for o in outs]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert [w.exitcode for w in workers] == [0, 0, 0, 0]
    taken = sorted(int(n) for o in outs for n in Path(o).read_text().split())
    assert taken == list(range(24))


def test_a_call_cut_off_by_a_server_restart_is_made_again(pg_url: str) -> None:
    """A connection the server closes while the store holds it (a restart mid-sweep) costs one
    reconnect, not the call: here the pool's pre-ping is off, so every pooled connection is one
    the server has closed under it."""
    import optuna
    import sqlalchemy

    from tuner.store._reconnect import ReconnectingRDBStorage

    storage = ReconnectingRDBStorage(
        pg_url, engine_kwargs={"pool_pre_ping": False, "pool_size": 1, "max_overflow": 1}
    )
    study = optuna.create_study(study_name="restart", storage=storage)
    study.enqueue_trial({"x": 0.5})

    admin = sqlalchemy.create_engine(pg_url.rsplit("/", 1)[0] + "/postgres")
    with admin.connect() as conn:
        dropped = conn.execute(
            sqlalchemy.text(
                "select count(pg_terminate_backend(pid)) from pg_stat_activity where datname = :d"
            ),
            {"d": pg_url.rsplit("/", 1)[1]},
        ).scalar()
    admin.dispose()
    assert dropped >= 1

    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    assert [t.params for t in study.get_trials()] == [{"x": 0.5}]


def test_only_errors_of_a_dead_connection_are_retried() -> None:
    """What the sweep above met under load: the connection died inside a transaction and the
    session's next query raised PendingRollbackError; psycopg2 says "connection already closed"
    for a connection dropped in use. Those are retried; an integrity error or a locked SQLite
    file is not a lost connection."""
    import optuna
    import sqlalchemy.exc

    from tuner.store._reconnect import connection_lost

    def wrapped(cause: BaseException) -> optuna.exceptions.StorageInternalError:
        error = optuna.exceptions.StorageInternalError("An exception is raised during the commit.")
        error.__cause__ = cause
        return error

    class Closed(Exception):
        pass

    pending = sqlalchemy.exc.PendingRollbackError(
        "Can't reconnect until invalid transaction is rolled back."
    )
    closed = sqlalchemy.exc.InterfaceError("SELECT 1", {}, Closed("connection already closed"))
    assert connection_lost(wrapped(pending)) and connection_lost(wrapped(closed))
    integrity = sqlalchemy.exc.IntegrityError("INSERT", {}, Closed("duplicate key value"))
    locked = sqlalchemy.exc.OperationalError("UPDATE", {}, Closed("database is locked"))
    other = sqlalchemy.exc.PendingRollbackError("This Session's transaction has been rolled back")
    assert not any(connection_lost(wrapped(e)) for e in (integrity, locked, other))
