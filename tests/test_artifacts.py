"""The study's artifact location (tuner/store/_artifacts.py): chosen at create, stored on the study,
and on S3 the one place the nodes of a cluster share.

The S3 tests run against moto's standalone server on localhost (a real S3 HTTP API, started by
the `s3_endpoint` fixture): the same boto3 calls as against AWS, MinIO or Ceph.
"""

from __future__ import annotations

import io
import json
import os
import urllib.request
from pathlib import Path

import optuna
import pytest
from conftest import S3, run_cli, small_space, write_space
from test_dashboard import dashboard, get_json, study_id

from tuner.core.study import create_study
from tuner.store import attrs, open_study


def _node(root: Path, name: str) -> tuple[Path, dict[str, str]]:
    """A machine of its own: a working directory and a home (its ~/.cache) that no other
    node sees. XDG_CACHE_HOME and TUNER_CACHE are unset, so the cache goes under that home."""
    work = root / name
    (work / "home").mkdir(parents=True)
    return work, {"HOME": str(work / "home"), "XDG_CACHE_HOME": "", "TUNER_CACHE": ""}


def _env(*parts: dict[str, str]) -> dict[str, str]:
    merged = {k: v for part in parts for k, v in part.items()}
    return merged


def _clean_env(env: dict[str, str]) -> dict[str, str]:
    """os.environ with `env` on top, empty values removed (unset)."""
    full = {**os.environ, **env}
    return {k: v for k, v in full.items() if v != ""}


def _cli(*args: str, cwd: Path, env: dict[str, str], timeout: float = 600):
    import subprocess

    from conftest import TUNER

    return subprocess.run(
        [*TUNER, *args], cwd=cwd, env=_clean_env(env), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


# ----------------------------------------------------------------------------- choosing


@pytest.mark.parametrize(
    ("how", "bad", "named"),
    [
        ("flag", "gs://bucket/x", "--artifacts: gs:// is not supported"),
        ("flag", "s3://", "--artifacts: 's3://' has no bucket"),
        ("env", "s3:///prefix", "TUNER_ARTIFACTS: 's3:///prefix' has no bucket"),
        ("env", "s3://Bad_Bucket/x", "TUNER_ARTIFACTS: 's3://Bad_Bucket/x' has bucket"),
        ("space", "ftp://host/x", "bad.yaml: artifacts: ftp:// is not supported"),
    ],
)
@pytest.mark.slow
def test_a_bad_location_is_one_line_naming_its_source_and_nothing_is_made(
    how: str, bad: str, named: str, demo_files: Path, tmp_path: Path
) -> None:
    space = small_space(demo_files, name="bad")
    if how == "space":
        space["artifacts"] = bad
    path = write_space(tmp_path / "bad.yaml", space)
    db = tmp_path / "studies.db"
    args = ["study", "create", "--space", "bad.yaml", "--storage", f"sqlite:///{db}"]
    env = {"TUNER_ARTIFACTS": bad} if how == "env" else {}
    if how == "flag":
        args += ["--artifacts", bad]
    result = run_cli(*args, cwd=path.parent, env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert named in result.stderr, result.stderr
    assert "allowed: a local path, or s3://BUCKET[/PREFIX]" in result.stderr
    assert not db.exists() or optuna.get_all_study_names(f"sqlite:///{db}") == []
    assert not (tmp_path / "tuner_artifacts").exists()


@pytest.mark.slow
def test_the_location_comes_from_the_flag_then_the_env_then_the_space_then_the_default(
    demo_files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TUNER_ARTIFACTS", raising=False)
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    space = small_space(demo_files, name="a")
    space["artifacts"] = "from-space"  # relative: to the working directory, stored absolute
    path = write_space(tmp_path / "a.yaml", space)

    def made(name: str, **kwargs: str) -> str:
        create_study(path, name=name, storage=url, **kwargs)
        return open_study(name, url).artifacts

    assert made("space") == str(tmp_path / "from-space")
    monkeypatch.setenv("TUNER_ARTIFACTS", "s3://env-bucket/team/x/")
    assert made("env") == "s3://env-bucket/team/x"
    assert made("flag", artifacts="s3://flag-bucket") == "s3://flag-bucket"
    monkeypatch.delenv("TUNER_ARTIFACTS")
    plain = write_space(tmp_path / "b.yaml", small_space(demo_files, name="b"))
    create_study(plain, storage=url)
    assert open_study("b", url).artifacts == str(tmp_path / "tuner_artifacts")
    stored = optuna.load_study(study_name="flag", storage=url).user_attrs
    assert stored[attrs.ARTIFACTS] == "s3://flag-bucket"


@pytest.mark.slow
def test_a_study_made_before_the_location_keeps_its_folder(
    demo_files: Path, tmp_path: Path
) -> None:
    """A study created by an older tuner records `artifact_dir` only: it is still its place."""
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    create_study(write_space(tmp_path / "s.yaml", small_space(demo_files, name="new")), storage=url)
    space = optuna.load_study(study_name="new", storage=url).user_attrs[attrs.SPACE]
    old = optuna.create_study(storage=url, study_name="old")
    old.set_user_attr(attrs.ARTIFACT_DIR, str(tmp_path / "old-artifacts"))
    old.set_user_attr(attrs.SPACE, space)
    assert open_study("old", url).artifacts == str(tmp_path / "old-artifacts")


# ----------------------------------------------------------------------------- no shared disk


def test_a_sweep_on_nodes_without_a_shared_disk_keeps_everything_in_s3(
    s3: S3, pg_url: str, demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two nodes, each with its own working directory and home, run trials of one study whose
    artifacts are in S3; a third directory that knows only the storage URL and the AWS
    environment exports the best trial, reports, and downloads from the dashboard; delete takes
    everything in S3 along. Nothing is written to a local artifact folder anywhere."""
    location = f"s3://{s3.bucket}/teams/nlp"
    space = small_space(demo_dir, name="nodisk", pruner="none")
    space["budget"] = {"n_trials": 3, "keep_adapters": 1}
    a, a_env = _node(tmp_path, "node-a")
    b, b_env = _node(tmp_path, "node-b")
    fresh, fresh_env = _node(tmp_path, "fresh")
    write_space(a / "nodisk.yaml", space)
    store = {"TUNER_STORAGE": pg_url, "TUNER_ARTIFACTS": ""}

    made = _cli("study", "create", "--space", "nodisk.yaml", "--artifacts", location,
                cwd=a, env=_env(store, s3.env, a_env))  # fmt: skip
    assert made.returncode == 0, made.stderr
    ran = _cli("study", "run", "nodisk", "--n-trials", "2", cwd=a, env=_env(store, s3.env, a_env))
    assert ran.returncode == 0, ran.stderr
    ran = _cli("study", "run", "nodisk", cwd=b, env=_env(store, s3.env, b_env))
    assert ran.returncode == 0, ran.stderr

    study = optuna.load_study(study_name="nodisk", storage=pg_url)
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    # Node a tokenised once; node b, which shares no folder with it, fetched that from S3.
    assert [t.user_attrs["data_source"] for t in trials] == ["tokenized", "memory", "fetched"]
    for node in (a, b):
        assert len(list((node / "home/.cache/tuner/tokenized").iterdir())) >= 1

    # In S3, under the prefix: the best trial's adapter (keep_adapters: 1 dropped the others)
    # and the one tokenised-data entry.
    best = study.best_trial
    adapter_ids = set(best.user_attrs["adapter"].values())
    keys = s3.listed("teams/nlp/")
    assert {k for k in keys if "/tokenized/" not in k} == {f"teams/nlp/{i}" for i in adapter_ids}
    assert len([k for k in keys if k.startswith("teams/nlp/tokenized/")]) == 1
    assert s3.listed() == keys  # nothing outside the prefix

    # A fresh directory with only the storage URL and the AWS environment.
    env = _env(store, s3.env, fresh_env)
    exported = _cli("study", "export", "nodisk", "--out", "model", cwd=fresh, env=env)
    assert exported.returncode == 0, exported.stderr
    assert f"exported trial {best.number}" in exported.stdout
    provenance = json.loads((fresh / "model" / "tuner_export.json").read_text())
    assert provenance["trial"]["number"] == best.number
    assert provenance["study"]["artifacts"] == location
    reported = _cli("study", "report", "nodisk", "--out", "report.html", cwd=fresh, env=env)
    assert reported.returncode == 0, reported.stderr
    (report,) = optuna.artifacts.get_all_artifact_meta(
        optuna.load_study(study_name="nodisk", storage=pg_url)
    )
    assert f"teams/nlp/{report.artifact_id}" in s3.listed("teams/nlp/")

    monkeypatch.chdir(fresh)
    for key, value in _clean_env(env).items():
        monkeypatch.setenv(key, value)
    for key in ("XDG_CACHE_HOME", "TUNER_CACHE", "TUNER_ARTIFACTS"):
        monkeypatch.delenv(key, raising=False)
    with dashboard(pg_url) as base:
        sid = study_id(base, "nodisk")
        served = get_json(f"{base}/api/studies/{sid}")
        (attached,) = served["artifacts"]
        with urllib.request.urlopen(f"{base}/artifacts/{sid}/{attached['artifact_id']}") as r:
            assert r.read() == (fresh / "report.html").read_bytes()
        (trial,) = (t for t in served["trials"] if t["number"] == best.number)
        (config,) = (x for x in trial["artifacts"] if x["filename"] == "adapter_config.json")
        url = f"{base}/artifacts/{sid}/{trial['trial_id']}/{config['artifact_id']}"
        with urllib.request.urlopen(url) as r:
            assert json.loads(r.read())["r"] == best.user_attrs["hparams"]["lora_rank"]

    deleted = _cli("study", "delete", "nodisk", "--yes", cwd=fresh, env=env)
    assert deleted.returncode == 0, deleted.stderr
    assert s3.listed() == []  # adapters, the report and the tokenised data: the last study's
    for node in (a, b, fresh):
        assert not (node / "tuner_artifacts").exists(), node
    assert not any(p.name == "tuner_artifacts" for p in tmp_path.rglob("*"))


# ----------------------------------------------------------------------------- the S3 store


def test_the_s3_store_keeps_every_key_under_its_prefix(
    s3: S3, monkeypatch: pytest.MonkeyPatch
) -> None:
    from optuna.artifacts.exceptions import ArtifactNotFound

    from tuner.store._artifacts import open_artifacts

    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)  # boto3 finds the endpoint and the keys itself
    store = open_artifacts(f"s3://{s3.bucket}/a/b/")
    store.write("x1", io.BytesIO(b"one"))
    other = open_artifacts(f"s3://{s3.bucket}/a")  # a neighbouring prefix sees its own keys
    other.write("x1", io.BytesIO(b"two"))
    assert s3.listed() == ["a/b/x1", "a/x1"]
    assert store.open_reader("x1").read() == b"one"
    with pytest.raises(ArtifactNotFound):
        store.open_reader("missing")
    store.remove("x1")
    assert s3.listed() == ["a/x1"]


def test_tokenised_data_crosses_machines_through_s3_and_an_unreachable_s3_costs_no_trial(
    s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two caches that share no folder (two machines): the second fetches what the first built
    and published, the same tokens; with S3 unreachable, a machine tokenises for itself."""
    from trials import data as data_mod
    from trials.config import DatasetSpec, TrialConfig
    from tuner.core.demo import build_tokenizer
    from tuner.store._artifacts import shared_data_cache

    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    rows = [{"instruction": "q" * 3 * i, "output": f"a{i}"} for i in range(12)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = TrialConfig(
        model_name_or_path="demo", dataset=DatasetSpec(path=str(path)), cutoff_len=64, val_size=3
    )
    tokenizer = build_tokenizer()
    shared = shared_data_cache(f"s3://{s3.bucket}/p")

    def prepare(machine: str, cache: object) -> object:
        data_mod._CACHE.clear()  # a fresh worker process
        return data_mod.prepare(config, tokenizer, cache_dir=tmp_path / machine, shared=cache)

    built = prepare("a", shared)
    assert built.source == "tokenized"
    (key,) = s3.listed("p/tokenized/")
    fetched = prepare("b", shared)
    assert fetched.source == "fetched"
    assert fetched.train["input_ids"] == built.train["input_ids"]
    assert fetched.val_answers == built.val_answers
    assert prepare("b", shared).source == "shared"  # now in machine b's own cache
    assert not [p for p in (tmp_path / "b").iterdir() if p.name.startswith(".")]

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    offline = prepare("c", shared_data_cache(f"s3://{s3.bucket}/p"))
    assert offline.source == "tokenized"
    assert offline.train["input_ids"] == built.train["input_ids"]
