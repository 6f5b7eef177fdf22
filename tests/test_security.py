"""A sentinel password in the storage URL, and a sentinel S3 secret key, never appear anywhere a
person or a log could read.

The test server trusts local connections, so a URL with a password still connects; the password
(a raw `@`, `:`, `/` and `%` in it, and another in the query's `?password=`) is a sentinel that
must show up nowhere: stdout, stderr, log files, exception text, the study's and trials'
attributes in the database, summaries, model card, report, the dashboard's API. The
study's artifacts are in S3 (moto's server), reached with AWS_SECRET_ACCESS_KEY set to another
sentinel, which must show up nowhere either, the objects in the bucket included.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pytest
import sqlalchemy
from conftest import S3, TUNER, run_cli, small_space, write_space

SENTINEL = "Sentinel-Pw-7f3a91c2"
S3_SENTINEL = "Sentinel-S3-Key-0c9d4e1b"


def _all_text_in(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


def _database_text(url: str) -> str:
    """Every attribute, note and value the store holds, as text."""
    engine = sqlalchemy.create_engine(url)
    chunks = []
    with engine.connect() as conn:
        tables = conn.execute(
            sqlalchemy.text(
                "select table_name from information_schema.tables where table_schema = 'public'"
            )
        ).scalars()
        for table in list(tables):
            rows = conn.execute(sqlalchemy.text(f'select * from "{table}"')).all()
            chunks += [repr(tuple(row)) for row in rows]
    engine.dispose()
    return "\n".join(chunks)


def test_a_password_in_the_storage_url_leaks_nowhere(
    pg_url: str, demo_dir: Path, tmp_path: Path, s3: S3
) -> None:
    head, rest = pg_url.split("://", 1)
    user, location = rest.split("@", 1)
    # The password holds a raw @ : / % (RAW: each part a sentinel), and the query one more.
    url = f"{head}://{user.split(':')[0]}:{RAW}@{location}?password={QUERY_SENTINEL}"
    work = tmp_path / "work"
    work.mkdir()
    space = small_space(demo_dir, name="leak", budget={"n_trials": 2})
    space["sweep"] = {"warm_start": 1}
    path = write_space(work / "leak.yaml", space)
    env = {
        "TUNER_STORAGE": url,
        "TUNER_ARTIFACTS": f"s3://{s3.bucket}/leak",
        **s3.env,
        "AWS_SECRET_ACCESS_KEY": S3_SENTINEL,  # moto's server takes any key
    }
    outputs = []

    def cli(*args: str) -> None:
        result = run_cli(*args, cwd=work, env=env, timeout=600)
        # What tuner printed, not the command line the test typed (which holds the URL).
        outputs.append(f"{args[:2]}\n{result.stdout}\n{result.stderr}")

    cli("study", "create", "--space", str(path))
    cli("study", "create", "--space", str(path))  # an error: the study exists
    cli("study", "run", "leak")
    cli("study", "list")
    cli("study", "show", "leak", "--facts")
    cli("study", "best", "leak", "--json")
    cli("study", "report", "leak", "--out", str(work / "report.html"))
    cli("study", "export", "leak", "--out", str(work / "export"))
    cli("study", "show", "missing")  # an error naming the store
    cli("sweep", "run", "--space", str(path), "--date", "2026-11-01", "--out", str(work / "sweeps"))
    cli("sweep", "list")
    cli("study", "run", "leak", "--storage", url.replace(location.split("/")[0], "127.0.0.1:1"))

    # The dashboard: its API serves every attribute of every study and trial.
    dashboard = subprocess.Popen(
        [*TUNER, "dashboard", "--port", "0"],
        cwd=work,
        env={**os.environ, **env},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = dashboard.stderr.readline()
        outputs.append(line)
        base = re.search(r"(http://\S+?)/dashboard", line)[1]
        with urllib.request.urlopen(f"{base}/api/studies", timeout=30) as response:
            studies = json.load(response)["study_summaries"]
            outputs.append(json.dumps(studies))
        for study in studies:
            with urllib.request.urlopen(f"{base}/api/studies/{study['study_id']}") as response:
                outputs.append(response.read().decode())
    finally:
        dashboard.terminate()
        outputs.append(dashboard.communicate(timeout=30)[1])

    assert "exported trial" in "\n".join(outputs)  # the commands did their work
    assert (work / "sweeps" / "leak-2026-11-01.json").exists()
    objects = {key: _object(s3, key) for key in s3.listed()}
    assert any(key.startswith("leak/") for key in objects)  # the artifacts went to S3
    assert not (work / "tuner_artifacts").exists()
    for secret in (*SECRETS, S3_SENTINEL):
        leaks = [o[:200] for o in outputs if secret in o]
        assert not leaks, leaks
        files = [str(p) for p, data in _all_text_in(work).items() if secret.encode() in data]
        assert not files, files
        assert secret not in _database_text(pg_url)
        stored = [key for key, data in objects.items() if secret.encode() in data]
        assert not stored, stored


def _object(s3: S3, key: str) -> bytes:
    """An object's bytes; a tar of tokenised data unpacked, so its files are read too."""
    import io
    import tarfile

    data = s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read()
    if not key.endswith(".tar"):
        return data
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return b"".join(tar.extractfile(m).read() for m in tar.getmembers() if m.isfile())


# --- issue 22: i22-export ---

# A password with every character a URL gives a meaning to, each part a sentinel of its own: a
# raw `@` made SQLAlchemy end the password there and print the rest as the host.
FRAGMENTS = ("Frag-After-At", "Frag-After-Colon", "Frag-After-Slash", "Frag-After-Pct")
RAW = f"{SENTINEL}@{FRAGMENTS[0]}:{FRAGMENTS[1]}/{FRAGMENTS[2]}%{FRAGMENTS[3]}"
QUERY_SENTINEL = "Sentinel-Query-2b7c19"
SECRETS = (SENTINEL, *FRAGMENTS, QUERY_SENTINEL)

# name → (URL with HOST for host:port, the password the server should get)
URL_FORMS = {
    "user:password@": (f"postgresql://tuner:{SENTINEL}@HOST/db", SENTINEL),
    "raw @ : / %": (f"postgresql://tuner:{RAW}@HOST/db", RAW),
    "percent-encoded": (f"postgresql://tuner:{quote(RAW, safe='')}@HOST/db", RAW),
    "?password=": (f"postgresql://tuner@HOST/db?sslmode=prefer&password={QUERY_SENTINEL}", None),
    "?sslpassword=": (f"postgres://tuner@HOST/db?sslpassword={QUERY_SENTINEL}", None),
    "both": (f"postgresql+psycopg2://tuner:{RAW}@HOST/db?password={QUERY_SENTINEL}", RAW),
}


def _leaks(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


@pytest.mark.parametrize("form", URL_FORMS)
def test_every_spelling_of_a_password_is_masked_and_still_connects_as_meant(form: str) -> None:
    from sqlalchemy.engine import make_url

    from tuner.store import mask_text, mask_url, resolve_url, strip_password

    url, password = URL_FORMS[form]
    url = url.replace("HOST", "db.example:5432")
    shown = [
        mask_url(url),
        mask_url(f"could not connect to {url}: refused ('{url}')"),
        mask_text(f"FATAL: password {password or QUERY_SENTINEL} rejected for {url}", url),
        mask_url(resolve_url(url)),
    ]
    assert not [s for s in shown if _leaks(s)], shown
    assert shown[0].startswith(url.split("://")[0] + "://tuner")
    assert "db.example:5432/db" in shown[0]
    # What connects is what was meant: the whole password, the real host.
    resolved = make_url(resolve_url(url))
    assert (resolved.password, resolved.host, resolved.port) == (password, "db.example", 5432)
    assert resolved.drivername == "postgresql+psycopg2"
    stripped = strip_password(resolve_url(url))
    assert not _leaks(stripped) and make_url(stripped).host == "db.example", stripped


@pytest.mark.parametrize("form", URL_FORMS)
def test_an_unreachable_store_names_its_url_without_a_password(form: str) -> None:
    url = URL_FORMS[form][0].replace("HOST", "127.0.0.1:1")
    result = run_cli("study", "list", "--storage", url, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: cannot open the study store postgresql+psycopg2://")
    assert "127.0.0.1:1/db" in result.stderr and len(result.stderr.splitlines()) == 1
    assert not _leaks(result.stdout + result.stderr), result.stderr


def test_printed_hints_are_shell_quoted_and_masked(pg_url: str, tmp_path: Path) -> None:
    """`study run`'s details/watch/export lines are made to be pasted: a study named
    `x; echo pwned` is one word there, and the URL's password (raw `@` and `?password=`) is
    masked. The URL connects (the test server trusts local connections)."""
    from tuner.store import mask_url

    head, rest = pg_url.split("://", 1)
    user, location = rest.split("@", 1)
    url = f"{head}://{user}:{RAW}@{location}?password={QUERY_SENTINEL}"
    space = write_space(tmp_path / "s.yaml", {
        "name": "hints",
        "params": {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}},
        "fixed": {"workload": "simulated", "steps": 2, "step_seconds": 0.01},
        "pruner": "none",
    })  # fmt: skip
    name = "x; echo pwned"
    made = run_cli("study", "create", "--space", str(space), "--name", name, "--storage", url)
    assert made.returncode == 0, made.stderr
    result = run_cli("study", "run", name, "--n-trials", "1", "--storage", url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not _leaks(result.stdout + result.stderr)
    hints = {
        line.split(":", 1)[0]: shlex.split(line.split(":", 1)[1])
        for line in result.stdout.splitlines()
        if line.startswith(("details:", "watch:", "export:"))
    }
    flag = ["--storage", mask_url(url)]
    assert "***" in flag[1] and "?password=***" in flag[1]
    assert hints == {
        "details": ["tuner", "study", "show", name, *flag],
        "watch": ["tuner", "dashboard", *flag],
        "export": ["tuner", "study", "export", name, *flag, "--out", f"{name}-best"],
    }
