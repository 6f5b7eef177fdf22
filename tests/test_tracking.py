"""`report_to`: each trial one run named STUDY/trial-N, against a real MLflow server (started by
the session, tests/conftest.py) and TensorBoard's own reader of the event files.

The sweeps are real: the demo LoRA trained a few steps by two worker processes, and the
simulated workload on a Ray head for the nesting across processes of other nodes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import optuna
import pytest
from conftest import S3, MlflowServer, run_cli, small_space, write_space
from optuna.trial import TrialState

SECRET = "sentinel-mlflow-password-4711"  # in the tracking URI; must show nowhere


def _with_password(url: str) -> str:
    return url.replace("http://", f"http://tuner:{SECRET}@")


def _client(url: str):  # noqa: ANN202
    from mlflow import MlflowClient

    return MlflowClient(url)


def _runs(url: str, experiment: str) -> dict[str, object]:
    client = _client(url)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return {run.info.run_name: run for run in client.search_runs([experiment_id])}


def test_each_trial_is_a_nested_mlflow_run_and_a_tensorboard_folder_with_two_jobs(
    mlflow_server: MlflowServer, demo_dir: Path, tmp_path: Path
) -> None:
    space = small_space(
        demo_dir,
        name="tracked",
        pruner="none",
        budget={"n_trials": 2},
        fixed={
            "max_steps": 4,
            "eval_steps": 2,
            "logging_steps": 2,
            "report_to": ["mlflow", "tensorboard"],
        },
    )
    path = write_space(tmp_path / "tracked.yaml", space)
    db = f"sqlite:///{tmp_path / 'studies.db'}"
    env = {
        "MLFLOW_TRACKING_URI": _with_password(mlflow_server.url),
        "MLFLOW_EXPERIMENT_NAME": "tracking-test",
        "OMP_NUM_THREADS": "1",
    }
    created = run_cli("study", "create", "--space", str(path), "--storage", db, env=env)
    assert created.returncode == 0, created.stderr
    ran = run_cli("study", "run", "tracked", "--storage", db, "--jobs", "2", env=env)
    assert ran.returncode == 0, ran.stderr

    study = optuna.load_study(study_name="tracked", storage=db)
    trials = study.get_trials()
    assert len(trials) == 2 and all(t.state == TrialState.COMPLETE for t in trials)
    assert {t.user_attrs["worker"] for t in trials}.__len__() == 2  # two worker processes

    # One parent run for the study, its id and page kept on the study.
    parent = study.user_attrs["mlflow"]
    runs = _runs(mlflow_server.url, "tracking-test")
    assert runs["tracked"].info.run_id == parent["run_id"]
    assert parent["url"].endswith(
        f"/#/experiments/{parent['experiment_id']}/runs/{parent['run_id']}"
    )
    assert runs["tracked"].info.status == "FINISHED"
    assert runs["tracked"].data.metrics["trials_complete"] == 2

    client = _client(mlflow_server.url)
    for t in trials:
        run = runs[f"tracked/trial-{t.number}"]
        # Nested under the study's run, though made by another process.
        assert run.data.tags["mlflow.parentRunId"] == parent["run_id"]
        assert run.data.tags["tuner.state"] == "COMPLETE" and run.info.status == "FINISHED"
        # The searched params as resolved, and the Trainer's own arguments beside them.
        hparams = t.user_attrs["hparams"]
        assert float(run.data.params["learning_rate"]) == pytest.approx(hparams["learning_rate"])
        assert run.data.params["lora_alpha"] == str(hparams["lora_alpha"])
        assert run.data.params["max_steps"] == "4"
        # The final facts, and the validation curve the Trainer logged at every evaluation.
        metrics = run.data.metrics
        assert metrics["eval_loss"] == pytest.approx(t.user_attrs["eval_loss"])
        assert metrics["steps"] == 4 and metrics["tokens_per_s"] > 0
        curve = client.get_metric_history(run.info.run_id, "eval_loss")
        assert {m.step for m in curve} >= {2, 4}
        # The link on the trial is the run's page.
        assert t.user_attrs["tracking"]["mlflow"].endswith(f"/runs/{run.info.run_id}")

    # TensorBoard: each trial's event files in the study's artifact folder, read back.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for t in trials:
        folder = Path(t.user_attrs["tracking"]["tensorboard"])
        assert (
            folder == tmp_path / "tuner_artifacts" / "tensorboard" / "tracked" / f"trial-{t.number}"
        )
        events = EventAccumulator(str(folder)).Reload()
        eval_loss = events.Scalars("eval/loss")
        assert [e.step for e in eval_loss][:2] == [2, 4]
        assert eval_loss[-1].value == pytest.approx(t.user_attrs["eval_loss"], rel=1e-5)
        assert [e.step for e in events.Scalars("train/loss")] == [2, 4]

    # The report and the dashboard show each trial's run.
    report = tmp_path / "report.html"
    done = run_cli("study", "report", "tracked", "--storage", db, "--out", str(report), env=env)
    assert done.returncode == 0, done.stderr
    page = report.read_text()
    for t in trials:
        link = t.user_attrs["tracking"]["mlflow"]
        assert f'<a href="{link}">' in page
    assert f'<a href="{parent["url"]}">' in page
    shown = _dashboard_study(db, study)
    assert parent["url"] in {a["key"]: a["value"] for a in shown["user_attrs"]}["mlflow"]
    for t in shown["trials"]:
        tracked = {a["key"]: a["value"] for a in t["user_attrs"]}
        assert trials[t["number"]].user_attrs["tracking"]["mlflow"] in tracked["tracking"]

    # The password in the tracking URI went nowhere: not the store, the logs, the report.
    stored = json.dumps([study.user_attrs, *[t.user_attrs for t in trials]])
    for text in (stored, created.stderr, ran.stderr, ran.stdout, done.stderr, page):
        assert SECRET not in text


def _dashboard_study(db: str, study: optuna.Study) -> dict:
    """The study and its trials as the dashboard's page gets them (its API, through tuner's
    app): user attrs are shown on the study's and each trial's page."""
    from wsgiref.util import setup_testing_defaults

    from tuner.face.dashboard import build_app

    app = build_app(db)
    environ: dict = {}
    setup_testing_defaults(environ)
    environ.update(PATH_INFO=f"/api/studies/{study._study_id}", QUERY_STRING="after=0")
    status: list[str] = []
    body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
    assert status[0].startswith("200"), body[:300]
    return json.loads(body)


def _simulated(name: str, **fixed: object) -> dict:
    return {
        "name": name,
        "params": {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
        "fixed": {"workload": "simulated", "steps": 3, "step_seconds": 0.01, **fixed},
        "pruner": "none",
        "budget": {"n_trials": 2},
    }


@pytest.mark.slow
def test_a_tracking_server_that_is_down_is_one_warning_and_the_trials_train(
    tmp_path: Path,
) -> None:
    from ray_nodes import free_port

    down = f"http://tuner:{SECRET}@127.0.0.1:{free_port()}"  # nothing listens there
    path = write_space(tmp_path / "down.yaml", _simulated("down", report_to="mlflow"))
    db = f"sqlite:///{tmp_path / 'studies.db'}"
    env = {"MLFLOW_TRACKING_URI": down}
    assert (
        run_cli("study", "create", "--space", str(path), "--storage", db, env=env).returncode == 0
    )
    ran = run_cli("study", "run", "down", "--storage", db, env=env)
    assert ran.returncode == 0, ran.stderr
    study = optuna.load_study(study_name="down", storage=db)
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * 2
    assert "mlflow" not in study.user_attrs
    assert all("tracking" not in t.user_attrs for t in study.get_trials())
    warnings = [line for line in ran.stderr.splitlines() if "MLflow at" in line]
    # The driver says so once, and the worker once: not once a trial, nor a traceback.
    assert len(warnings) == 2, ran.stderr
    assert "127.0.0.1" in warnings[0] and "without MLflow runs" in warnings[0]
    assert "Traceback" not in ran.stderr and SECRET not in ran.stderr


@pytest.mark.slow
def test_a_missing_tracker_package_stops_the_run_with_one_line(tmp_path: Path) -> None:
    """W&B is reached through HF's WandbCallback; where wandb is not installed, the run says
    so at once rather than failing every trial on it."""
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.fail("this test checks the message for a missing wandb; run it without wandb")
    path = write_space(tmp_path / "wb.yaml", _simulated("wb", report_to=["wandb"]))
    db = f"sqlite:///{tmp_path / 'studies.db'}"
    assert run_cli("study", "create", "--space", str(path), "--storage", db).returncode == 0
    ran = run_cli("study", "run", "wb", "--storage", db)
    assert ran.returncode == 2
    assert ran.stderr.strip().splitlines() == [
        "error: fixed.report_to: wandb needs the wandb package where trials run "
        "(pip install 'lora-tuner[wandb]')"
    ]
    assert optuna.load_study(study_name="wb", storage=db).get_trials() == []


@pytest.mark.ray
def test_trial_runs_nest_under_the_study_run_from_ray_workers(
    mlflow_server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Ray workers are processes of the head, started without MLFLOW_TRACKING_URI: they
    learn the server and the parent run from the study alone."""
    import subprocess

    from ray_nodes import RAY, start_head

    from tuner.core.study import create_study, run_study

    url = mlflow_server.url
    path_env = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(RAY_AUTH_MODE="token", PATH=path_env)
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    head, address = start_head(
        "--num-cpus=2",
        "--num-gpus=0",
        "--include-dashboard=false",
        env=env,
        temp_dir=Path(f"/tmp/ray-track-{os.getpid()}"),
        log=tmp_path / "head.log",
    )
    try:
        monkeypatch.setenv("RAY_AUTH_MODE", "token")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tracking-ray")
        space = _simulated("on-ray", report_to="mlflow")
        space["resources"] = {"gpus_per_trial": 0, "cpus_per_trial": 1}
        db = f"sqlite:///{tmp_path / 'studies.db'}"
        name = create_study(write_space(tmp_path / "ray.yaml", space), storage=db)
        progress = run_study(name, storage=db, n_trials=2, backend="ray", address=address)
        assert progress.complete == 2
    finally:
        import ray

        ray.shutdown()
        head.stop()
    study = optuna.load_study(study_name=name, storage=db)
    parent = study.user_attrs["mlflow"]
    runs = _runs(url, "tracking-ray")
    for t in study.get_trials():
        assert t.user_attrs["worker"].startswith("ray-")
        run = runs[f"on-ray/trial-{t.number}"]
        assert run.data.tags["mlflow.parentRunId"] == parent["run_id"]
        assert float(run.data.params["learning_rate"]) == pytest.approx(
            t.user_attrs["hparams"]["learning_rate"]
        )
        assert run.data.tags["tuner.state"] == "COMPLETE"


def test_tensorboard_events_of_an_s3_location_are_uploaded_when_the_trial_ends(
    s3: S3, demo_dir: Path, tmp_path: Path
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    space = small_space(
        demo_dir,
        name="tb-s3",
        pruner="none",
        budget={"n_trials": 1},
        fixed={"max_steps": 2, "eval_steps": 2, "logging_steps": 1, "report_to": "tensorboard"},
    )
    path = write_space(tmp_path / "tb.yaml", space)
    db = f"sqlite:///{tmp_path / 'studies.db'}"
    env = {**s3.env, "TUNER_CACHE": str(tmp_path / "node-cache"), "OMP_NUM_THREADS": "1"}
    location = f"s3://{s3.bucket}/sweeps"
    args = ("--storage", db)
    created = run_cli(
        "study", "create", "--space", str(path), *args, "--artifacts", location, env=env
    )
    assert created.returncode == 0, created.stderr
    ran = run_cli("study", "run", "tb-s3", *args, env=env)
    assert ran.returncode == 0, ran.stderr
    (trial,) = optuna.load_study(study_name="tb-s3", storage=db).get_trials()
    assert trial.state == TrialState.COMPLETE
    assert trial.user_attrs["tracking"] == {"tensorboard": f"{location}/tensorboard/tb-s3/trial-0"}
    keys = s3.listed("sweeps/tensorboard/")
    assert keys and all(k.startswith("sweeps/tensorboard/tb-s3/trial-0/events.out") for k in keys)
    folder = tmp_path / "downloaded"
    folder.mkdir()
    for key in keys:
        s3.client().download_file(s3.bucket, key, str(folder / Path(key).name))
    events = EventAccumulator(str(folder)).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    assert not list((tmp_path / "node-cache").glob("tensorboard/**/events*"))  # moved, not copied
