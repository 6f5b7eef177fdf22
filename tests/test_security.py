"""A sentinel password in the storage URL, and a sentinel S3 secret key, never appear anywhere a
person or a log could read.

The test server trusts local connections, so a URL with a password still connects; the password
is a sentinel that must show up nowhere: stdout, stderr, log files, exception text, the study's
and trials' attributes in the database, summaries, model card, report, the dashboard's API. The
study's artifacts are in S3 (moto's server), reached with AWS_SECRET_ACCESS_KEY set to another
sentinel, which must show up nowhere either, the objects in the bucket included.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.request
from pathlib import Path

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
    url = f"{head}://{user.split(':')[0]}:{SENTINEL}@{location}"
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
    for secret in (SENTINEL, S3_SENTINEL):
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
